"""ResNet-101 with the NOAH head, multi-label MS-COCO 2017 at 448 px.

  python main.py --config=configs/coco_resnet101_noah.py:init=runs/resnet101_noah/checkpoints \
      --workdir=runs/coco_resnet101_noah
  python main.py --config=configs/coco_resnet101_noah.py:init=DIR,head=linear --workdir=...

Fine-tunes an ImageNet ResNet-101 checkpoint (its 1000-class head is dropped and a new
80-class head is trained) with sigmoid BCE; reports mAP and CF1/OF1 at 0.5 on the whole
val2017 set. The recipe is `common.multilabel_config`. The paper reports +3.6 mAP for
NOAH over the linear head with ResNet-101 (its exact COCO recipe is not published).
Arguments: init=DIR (required), head=noah|linear, loss=sigmoid_xent|asl,
dataset=coco/2017|voc/2007.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, init="", head="noah", loss="sigmoid_xent", dataset="coco/2017")
    c = common.multilabel_config("resnet101", a.head, a.dataset, a.init)
    c.loss = a.loss
    return c
