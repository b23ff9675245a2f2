"""DeiT with the NOAH head on ImageNet-1k: the reference's DeiT recipe.

  python main.py --config=configs/vit_noah.py:variant=tiny --workdir=runs/deit_tiny_noah

300 epochs, AdamW (lr 5e-4 x batch/512, weight decay 0.05), 5 warm-up epochs then
cosine to 1e-5, label smoothing 0.1, drop path 0.1, EMA 0.99996, global batch 1024;
bicubic crops, evaluation bicubic at crop ratio 0.875, ImageNet mean/std.
Expected ImageNet top-1 (paper, baseline -> NOAH): tiny_050 51.36 -> 56.66,
tiny_075 62.55 -> 66.64, tiny 72.16 -> 74.29, small 79.78 -> 80.56, base 81.85 -> 82.22.
`head=linear` trains the class-token baseline with the same recipe.

  python main.py --config=configs/vit_noah.py:variant=base_384 --workdir=runs/deit_base_384_noah

DeiT-B/16 at 384 px (deit_base_patch16_384: 576 tokens, 86.86M parameters with the
NOAH head, the count the reference README gives for DeiT-Base): the same recipe on
384 px crops (eval: resize bicubic to 384/0.875, centre crop 384). The reference defines this
model but trains none at 384 px, so the paper has no number for it.

  python main.py --config=configs/vit_noah.py:demo --workdir=runs/demo

The demo: a 4-block NOAH DeiT-Tiny (8 px patches) on the embedded
digits at 32 px; about 96-99% test top-1 in a few minutes on 2 CPU cores.

  python main.py --config=configs/vit_noah.py:demo,multilabel --workdir=runs/demo_multilabel

The multi-label demo: the same model on 64 px canvases of 1 to 4 digits
(noah_jax/data/digits_multilabel.py), with 16 px patches so that it keeps the 4x4
tokens and the cost per step of the digits demo (8 px patches would give 64 tokens,
3.5 times slower per step), sigmoid loss, 15 epochs (930 steps). Expected: test mAP
about 0.75 (random scores: about 0.23), still rising at the end.

Arguments: variant=tiny_050|tiny_075|tiny|small|base|base_384, head=noah|linear, demo,
multilabel (with demo).
"""

from configs import common

# variant=tiny is deit_tiny_patch16_224, base_384 is deit_base_patch16_384.
MODELS = ("deit_{}_patch16_224", ("{}_384", "deit_{}_patch16_384"))


def get_config(arg=None):
    a = common.parse_arg(arg, variant="tiny", head="noah", demo=False, multilabel=False)
    dataset = common.demo_dataset(a.demo, a.multilabel)
    c = common.deit_recipe(common.registry_model("variant", a.variant, *MODELS), a.head)
    if a.variant == "base_384":
        c.dataset.image_size = 384
    c.ema_decay = 0.99996

    if a.demo:
        # The multi-label canvases are 64 px: 16 px patches keep the digits demo's 4x4
        # tokens and its cost per step (8 px patches: 64 tokens, 3.5 times slower).
        size = common.MULTILABEL_DEMO_IMAGE_SIZE if a.multilabel else 32
        common.apply_demo(c, size, dataset, img_size=size, patch_size=size // 4, depth=4,
                          drop_path_rate=0.0)
    return c
