"""PVT v1 with the NOAH head on ImageNet-1k: the reference's PVT recipe.

  python main.py --config=configs/pvt_noah.py:variant=tiny --workdir=runs/pvt_tiny_noah

The reference trains PVT with DeiT's recipe (its `vit/pvt/classification/main.py` and
`configs/pvt/*.py`): 300 epochs, AdamW (lr 5e-4 x batch/512, weight decay 0.05), 5
warm-up epochs then cosine to 1e-5, label smoothing 0.1, drop path 0.1, DeiT's
augmentation (bicubic crops; evaluation bicubic at crop ratio 0.875), global batch 1024
(128 per GPU on 8 GPUs). Unlike DeiT it keeps no EMA of
the weights, and its configs turn gradient clipping off (clip_grad=None).
Expected ImageNet top-1 (paper, baseline -> NOAH): tiny 75.10 -> 76.51, tiny_075
71.81 -> 74.22, tiny_050 65.33 -> 68.50. Small, Medium and Large are defined by the
reference's code only (no reported results). `head=linear` trains the class-token
baseline with the same recipe.

  python main.py --config=configs/pvt_noah.py:demo --workdir=runs/pvt_demo

The demo: a NOAH pvt_tiny at the x0.5 widths (32/64/160/256), one block per stage, on
the embedded digits at 32 px with 2 px patches (stage maps 16, 8, 4, 2: every spatial
reduction leaves a 2x2 map and the head sees 4 tokens; 1.67M parameters). Expected:
about 99% test top-1 after its 880 steps.

`demo,multilabel`: the same model on the 64 px canvases of 1 to 4 digits
(noah_jax/data/digits_multilabel.py) with 4 px patches (the same stage maps), sigmoid
loss, mAP and CF1/OF1, 15 epochs.

Arguments: variant=tiny_050|tiny_075|tiny|small|medium|large, head=noah|linear, demo,
multilabel.
"""

from configs import common

def get_config(arg=None):
    a = common.parse_arg(arg, variant="tiny", head="noah", demo=False, multilabel=False)
    dataset = common.demo_dataset(a.demo, a.multilabel)
    # DeiT's recipe; no EMA and no gradient clipping (the base config's: off).
    c = common.deit_recipe(common.registry_model("variant", a.variant, "pvt_{}"), a.head)

    if a.demo:
        # The multi-label canvases are 64 px: 4 px patches keep the stage maps of 32 px.
        size = common.MULTILABEL_DEMO_IMAGE_SIZE if a.multilabel else 32
        common.apply_demo(c, size, dataset, img_size=size, patch_size=size // 16,
                          embed_dims=(32, 64, 160, 256), depths=(1, 1, 1, 1),
                          drop_path_rate=0.0)
    return c
