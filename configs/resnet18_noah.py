"""ResNet-18 with the NOAH head on ImageNet-1k: the reference's ResNet-18 recipe.

  python main.py --config=configs/resnet18_noah.py --workdir=runs/resnet18_noah

100 epochs, SGD (momentum 0.9, lr 0.1 at batch 256, weight decay 1e-4 on every
parameter), lr x0.1 at epochs 30, 60 and 90; RandomResizedCrop 224 and flips;
evaluation resizes to 256 and centre-crops 224; BatchNorm over 32 images. Head: N=4, r=1/2, dropout 0.1.
Expected ImageNet top-1 (paper): 71.81% (baseline with head=linear: 70.25%).
Arguments: head=noah|linear, depth=18|34 (ResNet-34 shares the recipe, and so do the
deeper ResNets of configs/resnet50_noah.py).
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, head="noah", depth=18)
    return common.resnet_recipe(common.registry_model("depth", a.depth, "resnet{}"), a.head)
