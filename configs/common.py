"""Shared parts of the configs: the argument parser and the base config.

Every recipe config builds on `base_config()`, which names every field the trainer
reads (none hides as a code default), and parses its argument string with
`parse_arg("variant=tiny_050,head=linear,runlocal", variant="tiny", head="noah", ...)`.
Durations are given in epochs or steps; `noah_jax.train.durations` converts them to steps in
one place.
"""

from __future__ import annotations

import re

import ml_collections

from noah_jax.data import catalog, preprocess


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses 'key=value,flag,...' against `defaults`, which fix the keys and types.

    A bare `flag` sets a boolean default to True. Unknown keys raise a ValueError
    listing the valid ones.
    """
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            result[key] = True
        elif isinstance(default, bool):
            result[key] = value.lower() in ("1", "true", "yes", "y")
        elif default is None or isinstance(default, str):
            result[key] = value
        else:
            result[key] = type(default)(value)
    return result


def registry_model(argument: str, value, *patterns: str | tuple[str, str]) -> str:
    """The registered model that a recipe's `argument=value` names.

    Each pattern is a model name with '{}' for the argument's value
    ('gmlp_{}_224': variant=ti16 is gmlp_ti16_224), or (argument pattern, model pattern)
    where the value carries more ('{}_384', 'deit_{}_patch16_384': base_384 is
    deit_base_patch16_384). The valid values are those of the registered models that
    match (noah_jax.models.list_models); another ends in a ValueError listing them.
    """
    from noah_jax.models import list_models  # the registry; configs keep no table of it

    pairs = [("{}", p) if isinstance(p, str) else p for p in patterns]
    choices = {}
    for model in list_models():
        for argument_pattern, model_pattern in pairs:
            match = re.fullmatch("(.+)".join(map(re.escape, model_pattern.split("{}"))), model)
            if match:
                choices.setdefault(argument_pattern.format(match.group(1)), model)
    name = choices.get(str(value))
    if name is None:
        raise ValueError(f"{argument} must be one of {', '.join(choices)}, got {value!r}")
    return name


def evaluation(type: str, *, dataset: str = "", split: str = "", prefix: str = "",
               every_steps=0, final_only: bool = False, skip_if_missing: bool = False,
               **options) -> ml_collections.ConfigDict:
    """An entry of config.evals: evaluator `type` (single | real | multilabel, or one
    registered from outside) on `dataset` ('' = the training dataset's) `split` ('' =
    its evaluation split), its metrics as eval/<prefix>/<metric>, run every
    `every_steps` steps (0 = once per epoch) or with `final_only` only at the end;
    `skip_if_missing` skips a dataset that is not prepared; `options` are the
    evaluator's own fields."""
    return ml_collections.ConfigDict(dict(
        type=type, dataset=dataset, split=split, prefix=prefix, every_steps=every_steps,
        final_only=final_only, skip_if_missing=skip_if_missing, **options))


def imagenet_extra_evals(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds ImageNet-V2 and ImageNet-ReaL (ReaL top-1), scored at the end of training and
    with eval_only, when prepared in data_dir (else skipped with a log line)."""
    c.evals.imagenet_v2 = evaluation("single", dataset="imagenet_v2", prefix="imagenet_v2",
                                     final_only=True, skip_if_missing=True)
    c.evals.imagenet2012_real = evaluation("real", dataset="imagenet2012_real",
                                           prefix="imagenet2012_real", final_only=True,
                                           skip_if_missing=True)
    return c


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # --- Model: create_model(name, num_classes=dataset.num_classes, head=head, **overrides).
    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet18"
    c.model.head = "noah"
    # Keyword overrides of create_model (head num_heads/key_ratio/dropout, drop_path_rate,
    # drop_rate, img_size, architecture fields): a recipe sets those it changes. main.py
    # declares the model's others when it loads the config (None: the reference's
    # value), so any can be set from a flag (noah_jax/cli.py declare_model_overrides).
    c.model.overrides = ml_collections.ConfigDict()
    c.dtype = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)

    # --- Data.
    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "imagenet2012"  # digits | digits_multilabel (demos) | synthetic | TFDS
    c.dataset.data_dir = ""           # TFDS data_dir ('' = the TFDS default)
    c.dataset.image_size = 224
    c.dataset.num_classes = 1000      # used by synthetic; checked against real datasets
    c.dataset.num_train_examples = 0  # synthetic only (0 = one epoch of 1024 images)
    c.dataset.num_eval_examples = 0   # synthetic only
    # The model family's input (noah_jax/models/input_preprocessing.py), None = the
    # family's, resolved when training starts: mean and std per RGB channel on [0, 1]
    # pixels, and the evaluation resize ('bilinear' | 'bicubic') of the shorter side to
    # image_size / eval_crop_ratio before the centre crop. E.g. ResNet: ImageNet's,
    # bilinear, 0.875; DeiT/PVT: ImageNet's, bicubic, 0.875; Mixer/gMLP: 0.5, bicubic, 0.9.
    c.dataset.update(preprocess.family_fields_config())
    c.dataset.train_split = ""        # '' = the dataset's own (TFDS split / folder name)
    c.dataset.eval_split = ""
    c.dataset.shuffle_buffer = 50_000  # encoded images per process (ImageNet: ~5.5 GB)
    c.dataset.shuffle_pieces = 16     # sub-splits per process, interleaved anew each epoch
    c.dataset.drop_unlabeled = True   # COCO/VOC: leave out images with no annotated object
    # Images with more pixels are skipped, never decoded (headers give sizes); 0 = no limit.
    c.dataset.max_image_pixels = preprocess.MAX_IMAGE_PIXELS

    # --- Augmentation of the tf.data sources (noah_jax/data/pipeline.py); the
    # in-memory demo sources ignore it. Every field, with its default (the CNN recipe:
    # Inception crop and flips), comes from noah_jax/data/preprocess.py's `Preprocess`,
    # which documents them; recipes change what they need.
    c.augment = preprocess.augment_config()
    c.batch_size = 256                # global, over all devices and hosts
    c.eval_batch_size = 256           # global
    c.grad_accum_steps = 1            # micro-batches per step (batch_size % it == 0)

    # --- Duration: set exactly one of num_epochs / total_steps (> 0); the other 0.
    c.num_epochs = 100.0
    c.total_steps = 0

    # --- Optimiser and schedule (noah_jax/train/optim.py).
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"          # sgd | adamw
    c.optimizer.momentum = 0.9        # sgd
    c.optimizer.nesterov = False      # sgd
    c.optimizer.b1 = 0.9              # adamw
    c.optimizer.b2 = 0.999            # adamw
    c.optimizer.eps = 1e-8            # adamw
    c.optimizer.weight_decay = 1e-4
    # Which parameters are decayed, by the reference's parameter names (noah_jax/train/optim.py):
    # 'all' (main.py without --nowd-bn), 'nowd_bn' (utils/misc.py get_parameters) or
    # 'timm' (timm's optimiser factory: no vectors, biases or model.no_weight_decay()).
    c.optimizer.decay_rule = "all"
    c.grad_clip_norm = 0.0            # 0 = off

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "step"          # step | cosine | linear | constant
    c.schedule.base_lr = 0.1          # at batch size base_batch_size
    c.schedule.base_batch_size = 256  # lr = base_lr * batch_size / base_batch_size
    # Warm-up and the step schedule's boundaries in epochs or in steps: set one unit of
    # each, 0 / () the other (noah_jax/train/durations.py converts them).
    c.schedule.warmup_epochs = 0.0
    c.schedule.warmup_steps = 0
    c.schedule.warmup_start_lr = 0.0  # the warm-up's first lr (timm's warmup_lr_init)
    c.schedule.end_lr = 0.0           # cosine / linear floor
    c.schedule.decay_epochs = (30.0, 60.0, 90.0)  # step schedule boundaries
    c.schedule.decay_steps = ()
    c.schedule.decay_factor = 0.1     # step schedule multiplier at each boundary
    # The reference sets the lr once per epoch (main.py adjust_learning_rate, timm's
    # epoch schedulers); False follows the same curve at every step.
    c.schedule.per_epoch = True
    # Epoch e trains at the curve's value for e - epoch_lag (>= 0): 1 for DeiT/PVT,
    # whose loop calls timm's scheduler.step(epoch) after each epoch.
    c.schedule.epoch_lag = 0

    # --- Loss: softmax_xent (single-label) | sigmoid_xent | asl (multi-label).
    c.loss = "softmax_xent"
    c.asl = ml_collections.ConfigDict()  # asymmetric loss (noah_jax/train/losses.py)
    c.asl.gamma_neg = 4.0
    c.asl.gamma_pos = 0.0
    c.asl.clip = 0.05
    c.label_smoothing = 0.0           # softmax_xent; with mixup/cutmix, smooths their targets
    c.ema_decay = 0.0                 # 0 = no EMA of parameters

    # --- Parallelism: mesh axes (data, model); -1 = all remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.model = 1
    c.fsdp = False                    # shard parameters and optimiser state over 'data'
    c.fsdp_min_size = 2**18           # arrays smaller than this stay replicated

    # --- Loop, logging, checkpoints.
    c.log_every_steps = 100
    c.eval_every_steps = 0            # 0 = once per epoch; the schedule of evals.val
    # --- Evaluation: named evaluators, each with its data and schedule
    # (noah_jax/train/evaluators.py); `evaluation` below lists the fields. The training
    # dataset's evaluation split, top-1/top-5/loss as eval/top1, ..., every
    # eval_every_steps (a reference: setting either sets both).
    c.evals = ml_collections.ConfigDict()
    c.evals.val = evaluation("single", every_steps=c.get_ref("eval_every_steps"))
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.init_from = ml_collections.ConfigDict()
    c.init_from.path = ""             # a checkpoint dir (another run's, or convert's)
    c.init_from.drop_head = False     # keep this model's new head
    c.eval_only = False               # evaluate the workdir's or init_from's checkpoint
    # After training, draw each NOAH head's attention maps for this many evaluation
    # images into WORKDIR/attention.png (0 = none; one process runs only). main.py and
    # noah_jax.study draw it when the trainer returns (visualize.run_attention_figure).
    c.attention_figure_images = 0
    # A TensorBoard profiler trace of training steps first .. first + count - 1 into
    # WORKDIR/plugins/profile (process 0; TensorBoard's Profile tab reads it). (0, 0) = off.
    c.profile_steps = (0, 0)
    return c


DEMO_DATASETS = ("digits", "digits_multilabel")
MULTILABEL_DEMO_IMAGE_SIZE = 64  # the canvases' side: room for four digits of 16-24 px


def demo_dataset(demo: bool, multilabel: bool) -> str:
    """The dataset of a recipe's `demo` argument: the digits, or with `multilabel` the
    canvases of 1 to 4 digits (noah_jax/data/digits_multilabel.py). `multilabel` alone
    would be silently ignored by an ImageNet recipe, so it is refused."""
    if multilabel and not demo:
        raise ValueError("the config argument 'multilabel' picks the demo's multi-label "
                         "digit canvases; use it with 'demo' (e.g. :demo,multilabel)")
    return "digits_multilabel" if multilabel else "digits"


def apply_demo(c: ml_collections.ConfigDict, image_size: int = 32, dataset: str = "digits",
               **model_overrides) -> ml_collections.ConfigDict:
    """Turns a recipe into the laptop demo: the embedded digits at `image_size` px (32; a
    CNN that downsamples 32x needs 64 for its head to see a map), a tiny model.

    `model_overrides` shrink the recipe's model (patch size, depth, width) so that it
    trains to >= 95% test top-1 in a few minutes on 2 CPU cores. A model built for one
    input size (ViT, Mixer, PVT) is given `img_size=image_size` among them by its recipe.

    dataset='digits_multilabel' trains on the canvases of 1 to 4 digits instead (at
    MULTILABEL_DEMO_IMAGE_SIZE px, given by the recipe): multi-hot labels, so the sigmoid
    loss (the trainer refuses a softmax on multi-label data) without label smoothing
    (it smooths softmax targets only), scored by mAP and CF1/OF1; 4,000 training
    canvases make an epoch 2.8 times the digits', so it trains for 15 epochs, not 40
    (930 steps at batch 64, the digits demo's 880).
    """
    if dataset not in DEMO_DATASETS:
        raise ValueError(f"the demo's dataset is one of {DEMO_DATASETS}, got {dataset!r}")
    multilabel = dataset == "digits_multilabel"
    c.dataset.name = dataset
    c.dataset.image_size = image_size
    c.dataset.num_classes = 10
    c.model.overrides.update(model_overrides)
    c.batch_size = 64
    c.eval_batch_size = 120
    c.num_epochs = 15.0 if multilabel else 40.0
    c.total_steps = 0
    c.optimizer.name = "adamw"
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.05
    c.grad_clip_norm = 1.0
    c.schedule.name = "cosine"
    c.schedule.base_lr = 1e-3
    c.schedule.base_batch_size = 64
    c.schedule.warmup_epochs = 2.0
    c.schedule.warmup_start_lr = 0.0
    c.schedule.end_lr = 1e-5
    # Per step: a warm-up from 0 set once per epoch would spend the demo's first epoch at
    # lr 0. The family's weight-decay rule stays.
    c.schedule.per_epoch = False
    c.schedule.epoch_lag = 0
    c.loss = "sigmoid_xent" if multilabel else "softmax_xent"
    c.label_smoothing = 0.0 if multilabel else 0.1
    c.ema_decay = 0.0
    c.log_every_steps = 50
    c.eval_every_steps = 0
    # The digits' test split only, scored as the labels are.
    c.evals = ml_collections.ConfigDict()
    c.evals.val = evaluation("multilabel" if multilabel else "single",
                             every_steps=c.get_ref("eval_every_steps"))
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 2
    c.attention_figure_images = 4
    return c


def imagenet_config(model: str, head: str) -> ml_collections.ConfigDict:
    """The base config on ImageNet-1k at 224 px for `model` with `head`."""
    c = base_config()
    c.model.name = model
    c.model.head = head
    # The base config's dataset is ImageNet-1k at 224 px already. Also scored on
    # ImageNet-V2 and ReaL when they are prepared in data_dir.
    return imagenet_extra_evals(c)


# The reference trains with DistributedDataParallel on 8 GPUs without SyncBN: each
# BatchNorm normalises one GPU's share of the global batch (main.py:132 divides
# --train-batch by the world size): 256 / 8 = 32 images (ShuffleNetV2: 1024 / 8 = 128).
REFERENCE_GPUS = 8


def cnn_recipe(model: str, head: str) -> ml_collections.ConfigDict:
    """The base config on ImageNet with BatchNorm over the reference's per-GPU batch."""
    c = imagenet_config(model, head)
    c.model.overrides.bn_group_size = c.batch_size // REFERENCE_GPUS
    return c


def resnet_recipe(model: str, head: str) -> ml_collections.ConfigDict:
    """The reference's ResNet recipe: 100 epochs of SGD (momentum 0.9, weight decay
    1e-4 on every parameter, lr 0.1 at batch 256, x0.1 at epochs 30/60/90), Inception
    crop and flips, BatchNorm over 32 images. These are the base config's own values
    (cnn_recipe adds the BatchNorm groups), so nothing is restated here."""
    return cnn_recipe(model, head)


def deit_recipe(model: str, head: str) -> ml_collections.ConfigDict:
    """DeiT's recipe, which the reference also trains PVT with: 300 epochs of AdamW (lr
    5e-4 x batch/512, weight decay 0.05) at global batch 1024, 5 warm-up epochs then
    cosine to 1e-5, label smoothing 0.1, drop path 0.1 and DeiT's augmentation. DeiT
    adds an EMA of the weights (configs/vit_noah.py); PVT does not."""
    c = imagenet_config(model, head)
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
    c.schedule.warmup_start_lr = 1e-6
    c.schedule.end_lr = 1e-5
    c.schedule.epoch_lag = 1          # vit/deit/main.py: lr_scheduler.step(epoch) after it
    c.optimizer.decay_rule = "timm"   # timm create_optimizer (vit/deit/main.py)
    c.label_smoothing = 0.1
    # Bicubic crops (the reference's vit/deit/main.py:100 and vit/pvt/classification/
    # main.py:100, --train-interpolation bicubic), RandAugment rand-m9-mstd0.5-inc1
    # (magnitude, std and increasing are the base config's), random erasing 0.25 (pixel
    # mode), mixup 0.8 / cutmix 1.0 (switch 0.5, the base's), repeated augmentation x3.
    # DeiT also sets colour jitter 0.4 (PVT 0.3), which timm ignores when RandAugment is
    # on: left off.
    c.augment.train_interpolation = "bicubic"
    c.augment.rand_augment_layers = 2
    c.augment.random_erasing = 0.25
    c.augment.mixup_alpha = 0.8
    c.augment.cutmix_alpha = 1.0
    c.augment.repeats = 3
    c.checkpoint_every_steps = 2000
    return c


def mlp_recipe(model: str, head: str) -> ml_collections.ConfigDict:
    """The reference's Mixer / gMLP recipe (the DeiT-style recipe of the MLP papers, its
    mlp/configs/default_noah.yaml run by timm's train.py)."""
    c = imagenet_config(model, head)
    c.model.overrides.drop_rate = 0.0233
    c.model.overrides.drop_path_rate = 0.1
    c.batch_size = 1536
    c.eval_batch_size = 1536
    c.num_epochs = 300.0
    c.optimizer.name = "adamw"
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.067
    c.schedule.name = "cosine"
    c.schedule.base_lr = 7e-4
    c.schedule.base_batch_size = 1536
    c.schedule.warmup_epochs = 20.0
    c.schedule.warmup_start_lr = 1e-6  # mlp/configs/default_noah.yaml warmup_lr
    c.schedule.end_lr = 1e-5
    c.optimizer.decay_rule = "timm"    # timm create_optimizer_v2 (train.py)
    c.grad_clip_norm = 1.0
    c.label_smoothing = 0.1
    c.ema_decay = 0.99992
    # mlp/configs/default_noah.yaml: crops of aspect ratio (0.67, 1.5) (lines 66-68)
    # resized bilinear or bicubic at random (train_interpolation: random, line 86),
    # RandAugment rand-m6-n3-mstd1.0-inc1 (line 1: the increasing variants, the base
    # config's), mixup 0.5 / cutmix 1.0. The yaml also sets colour jitter 0.4, which timm
    # ignores when RandAugment is on, and no random erasing. Mean/std 0.5 and the
    # evaluation's bicubic resize at crop ratio 0.9 are the family's (dataset fields).
    c.augment.crop_ratio = (0.67, 1.5)
    c.augment.train_interpolation = "random"
    c.augment.rand_augment_layers = 3
    c.augment.rand_augment_magnitude = 6.0
    c.augment.rand_augment_std = 1.0
    c.augment.mixup_alpha = 0.5
    c.augment.cutmix_alpha = 1.0
    c.checkpoint_every_steps = 2000
    return c


def multilabel_config(model: str, head: str, dataset: str, init: str
                      ) -> ml_collections.ConfigDict:
    """Multi-label fine-tuning (COCO / VOC) at 448 px from an ImageNet checkpoint.

    Not the paper's recipe (the reference ships none): the common practice of ML-GCN /
    ASL. Whole images squashed to 448 x 448 (train and eval), flips and RandAugment,
    sigmoid BCE, AdamW at 1e-4 (batch 128) with one warm-up epoch and a cosine decay
    over 40 epochs, EMA of the weights; initialised from an ImageNet checkpoint
    (`init`) without its 1000-class head.
    """
    if not init:
        raise ValueError("multi-label training starts from an ImageNet checkpoint: pass "
                         "init=DIR (a training workdir's checkpoints/ or the output of "
                         "`python -m noah_jax.convert`)")
    c = base_config()
    c.model.name = model
    c.model.head = head
    c.dataset.name = dataset
    spec = catalog.DATASETS.get(dataset)
    if spec is None or not spec.multilabel:
        raise ValueError(f"dataset={dataset!r} is not a multi-label dataset; choose one of "
                         f"{[n for n, d in catalog.DATASETS.items() if d.multilabel]}")
    c.dataset.num_classes = spec.num_classes
    c.dataset.image_size = 448
    c.dataset.shuffle_buffer = 20_000
    c.augment.train_crop = "resize"
    c.augment.eval_crop = "resize"
    c.augment.rand_augment_layers = 2   # m9 mstd0.5, the base config's magnitude
    c.loss = "sigmoid_xent"
    c.evals.val.type = "multilabel"     # loss, mAP, CF1/OF1 as eval/mAP, ...
    c.batch_size = 128
    c.eval_batch_size = 128
    c.num_epochs = 40.0
    c.optimizer.name = "adamw"          # weight decay 1e-4, the base config's
    c.optimizer.decay_rule = "timm"     # none on vectors and biases
    c.schedule.name = "cosine"
    c.schedule.base_lr = 1e-4
    c.schedule.base_batch_size = 128
    c.schedule.warmup_epochs = 1.0
    c.ema_decay = 0.9997
    c.init_from.path = init
    c.init_from.drop_head = True
    return c
