"""PVT v1 with the NOAH head on ImageNet-1k: the reference's PVT recipe.

  python main.py --config=configs/pvt_noah.py:variant=tiny --workdir=runs/pvt_tiny_noah

The reference trains PVT with DeiT's recipe (its `vit/pvt/classification/main.py` and
`configs/pvt/*.py`): 300 epochs, AdamW (lr 5e-4 x batch/512, weight decay 0.05), 5
warm-up epochs then cosine to 1e-5, label smoothing 0.1, drop path 0.1, DeiT's
augmentation, global batch 1024 (128 per GPU on 8 GPUs). Unlike DeiT it keeps no EMA of
the weights, and its configs turn gradient clipping off (clip_grad=None).
Expected ImageNet top-1 (paper, baseline -> NOAH): tiny 75.10 -> 76.51, tiny_075
71.81 -> 74.22, tiny_050 65.33 -> 68.50. Small, Medium and Large are defined by the
reference's code only (no reported results). `head=linear` trains the class-token
baseline with the same recipe.

  python main.py --config=configs/pvt_noah.py:demo --workdir=runs/pvt_demo

The demo: a NOAH pvt_tiny at the x0.5 widths (32/64/160/256), one block per stage, on
the embedded digits at 32 px with 2 px patches (stage maps 16, 8, 4, 2: every spatial
reduction leaves a 2x2 map and the head sees 4 tokens; 1.67M parameters). 99.17% test
top-1 in one run; its 880 steps took about 6 minutes of CPU time on 2 cores (12 minutes
wall on a busy shared machine).

Arguments: variant=tiny_050|tiny_075|tiny|small|medium|large, head=noah|linear, demo.
"""

from configs import common

VARIANTS = ("tiny_050", "tiny_075", "tiny", "small", "medium", "large")


def get_config(arg=None):
    a = common.parse_arg(arg, variant="tiny", head="noah", demo=False)
    if a.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {a.variant!r}")
    c = common.imagenet_config(f"pvt_{a.variant}", a.head)
    c.model.overrides.drop_path_rate = 0.1
    c.batch_size = 1024
    c.eval_batch_size = 1024
    c.num_epochs = 300.0

    c.optimizer.name = "adamw"
    c.optimizer.weight_decay = 0.05
    c.schedule.name = "cosine"
    c.schedule.base_lr = 5e-4
    c.schedule.base_batch_size = 512
    c.schedule.warmup_epochs = 5.0
    c.schedule.end_lr = 1e-5
    c.label_smoothing = 0.1
    # No EMA and no gradient clipping: the base config's (0 = off).
    # DeiT's augmentation, as configs/vit_noah.py: RandAugment rand-m9-mstd0.5-inc1,
    # random erasing 0.25 (pixel mode), mixup 0.8 / cutmix 1.0 (switch 0.5), repeated
    # augmentation x3. The colour jitter 0.4 is ignored by timm when RandAugment is on.
    c.augment.rand_augment_layers = 2
    c.augment.random_erasing = 0.25
    c.augment.mixup_alpha = 0.8
    c.augment.cutmix_alpha = 1.0
    c.augment.repeats = 3
    c.checkpoint_every_steps = 2000

    if a.demo:
        common.apply_demo(c, patch_size=2, embed_dims=(32, 64, 160, 256), depths=(1, 1, 1, 1),
                          drop_path_rate=0.0)
    return common.declare_model_overrides(c)
