"""gMLP with the NOAH head on ImageNet-1k: the reference's Mixer/gMLP recipe.

  python main.py --config=configs/gmlp_noah.py:variant=ti16 --workdir=runs/gmlp_ti16_noah

The recipe is Mixer's, hyperparameter for hyperparameter (configs/mixer_noah.py
describes it; both are common.mlp_recipe), and so are the inputs (the family's,
noah_jax/models/mixer.py: mean = std = 0.5, bicubic at crop ratio 0.9). Head: N=4,
r=1/2, dropout 0.1. Expected ImageNet top-1 (paper, baseline -> NOAH): Ti/16
72.05 -> 73.39, Ti/16 x0.75 65.95 -> 67.71, Ti/16 x0.5 54.99 -> 56.89, S/16
79.65 -> 79.95.
Arguments: variant=ti16|ti16_075|ti16_050|s16|b16, head=noah|linear, demo, multilabel.

`demo`: 4 blocks, 8 px patches, on the embedded digits at 32 px. `demo,multilabel`:
the same on the 64 px canvases of 1 to 4 digits (noah_jax/data/digits_multilabel.py)
with 16 px patches (the same 4x4 tokens), sigmoid loss, mAP and CF1/OF1.
"""

from configs import common

def get_config(arg=None):
    a = common.parse_arg(arg, variant="ti16", head="noah", demo=False, multilabel=False)
    dataset = common.demo_dataset(a.demo, a.multilabel)
    c = common.mlp_recipe(common.registry_model("variant", a.variant, "gmlp_{}_224"), a.head)
    if a.demo:
        # The multi-label canvases are 64 px: 16 px patches keep the 4x4 tokens of 32 px.
        size = common.MULTILABEL_DEMO_IMAGE_SIZE if a.multilabel else 32
        common.apply_demo(c, size, dataset, img_size=size, patch_size=size // 4, num_blocks=4,
                          drop_rate=0.0, drop_path_rate=0.0)
    return c
