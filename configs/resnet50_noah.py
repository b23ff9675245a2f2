"""ResNet-50/101/152 with the NOAH head on ImageNet-1k (the ResNet-18 recipe, deeper nets).

  python main.py --config=configs/resnet50_noah.py --workdir=runs/resnet50_noah
  python main.py --config=configs/resnet50_noah.py:depth=101 --workdir=runs/resnet101_noah

100 epochs, SGD (momentum 0.9, lr 0.1 at batch 256, weight decay 1e-4 on every
parameter), lr x0.1 at epochs 30, 60 and 90; BatchNorm over 32 images. Head: N=4, r=1/8, dropout
0.1. Expected ImageNet top-1 (paper, baseline -> NOAH): ResNet-50 76.23 -> 77.25,
ResNet-101 77.41 -> 78.22, ResNet-152 78.16 -> 78.57.
Arguments: head=noah|linear, depth=50|101|152.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, head="noah", depth=50)
    return common.resnet_recipe(common.registry_model("depth", a.depth, "resnet{}"), a.head)
