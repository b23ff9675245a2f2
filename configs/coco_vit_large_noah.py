"""ViT-Large/16 with the NOAH head, multi-label MS-COCO 2017 at 448 px.

  python main.py --config=configs/coco_vit_large_noah.py:init=DIR --workdir=runs/coco_vitl_noah

Fine-tunes an ImageNet ViT-L/16 checkpoint at 448 px: the 14 x 14 position embeddings
are resized to 28 x 28 (bicubic) on loading and the 1000-class head is replaced by a
new 80-class one. Drop path 0.1, gradient clipping at 1.0, FSDP over the data axis
(ViT-L's AdamW state is ~3.6 GB). The paper reports +1.1 mAP for NOAH over the linear
head with ViT-Large. Arguments: init=DIR (required), head=noah|linear,
loss=sigmoid_xent|asl, dataset=coco/2017|voc/2007.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, init="", head="noah", loss="sigmoid_xent", dataset="coco/2017")
    c = common.multilabel_config("vit_large_patch16_224", a.head, a.dataset, a.init)
    c.loss = a.loss
    c.model.overrides.img_size = 448
    c.model.overrides.drop_path_rate = 0.1
    c.grad_clip_norm = 1.0
    c.fsdp = True
    c.optimizer.weight_decay = 0.05
    return c
