"""MLP-Mixer with the NOAH head on ImageNet-1k: the reference's Mixer/gMLP recipe.

  python main.py --config=configs/mixer_noah.py:variant=s16 --workdir=runs/mixer_s16_noah

300 epochs, AdamW (eps 1e-6, lr 7e-4 at the reference's global batch 8 x 192 = 1536,
weight decay 0.067), 20 warm-up epochs then cosine to 1e-5, label smoothing 0.1, dropout
0.0233, drop path 0.1, gradient clipping at norm 1.0, EMA 0.99992; crops of aspect ratio
0.67 to 1.5 resized bilinear or bicubic at random, RandAugment rand-m6-n3-mstd1.0-inc1;
inputs normalised with mean = std = 0.5 and evaluated bicubic at crop ratio 0.9 (the
family's, noah_jax/models/mixer.py). Head: N=4, r=1/2, dropout 0.1. Expected ImageNet
top-1 (paper, baseline -> NOAH): S/16 74.18 -> 75.09, S/16 x0.75 71.13 -> 72.32, S/16
x0.5 65.22 -> 66.81, B/16 77.14 -> 77.49.
Arguments: variant=s16|s16_075|s16_050|b16, head=noah|linear, demo (the embedded digits),
multilabel.

`demo`: 4 blocks of width 128, 8 px patches, on the digits at 32 px.
`demo,multilabel`: the same on the 64 px canvases of 1 to 4 digits
(noah_jax/data/digits_multilabel.py) with 16 px patches (the same 4x4 tokens),
sigmoid loss, mAP and CF1/OF1.
"""

from configs import common

def get_config(arg=None):
    a = common.parse_arg(arg, variant="s16", head="noah", demo=False, multilabel=False)
    dataset = common.demo_dataset(a.demo, a.multilabel)
    c = common.mlp_recipe(common.registry_model("variant", a.variant, "mixer_{}_224"), a.head)
    if a.demo:
        # The multi-label canvases are 64 px: 16 px patches keep the 4x4 tokens of 32 px.
        size = common.MULTILABEL_DEMO_IMAGE_SIZE if a.multilabel else 32
        common.apply_demo(c, size, dataset, img_size=size, patch_size=size // 4, num_blocks=4,
                          embed_dim=128, drop_rate=0.0, drop_path_rate=0.0)
    return c
