"""What the tf.data pipelines do to each image, as a plain dataclass (no TensorFlow).

`Preprocess` holds every augmentation setting with its default, the one home of
those defaults: the base config's `augment` section is made from it
(`augment_config()`), and `Preprocess.from_config` reads that section back.
`noah_jax/data/pipeline.py` applies it. `MAX_IMAGE_PIXELS` is the one home of the
default of dataset.max_image_pixels, `IMAGENET_MEAN` / `IMAGENET_STD` of ImageNet's
normalisation.

Normalisation and the evaluation resize belong to the model family: the base config
leaves dataset.mean, std, eval_interpolation and eval_crop_ratio (`FAMILY_FIELDS`)
None, and `noah_jax.models.input_preprocessing.resolve` fills them in from the
family's `InputPreprocessing` before training. `from_config` refuses a None there.
What a checkpoint records of its evaluation preprocessing (`eval_record`, the meta
keys `EVAL_RECORD_FIELDS`) is read back with `from_eval_record`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from noah_jax.errors import ConfigError


TRAIN_CROPS = ("inception", "resize")
EVAL_CROPS = ("center", "resize")
INTERPOLATIONS = ("bilinear", "bicubic")
# 'random': bilinear or bicubic for each image, with equal chances (timm's
# RandomResizedCropAndInterpolation with interpolation='random').
TRAIN_INTERPOLATIONS = (*INTERPOLATIONS, "random")
# torchvision's and timm's IMAGENET_DEFAULT_MEAN / _STD (timm/data/constants.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Images with more pixels are skipped, never decoded. Pillow's decompression-bomb limit
# (PIL.Image.MAX_IMAGE_PIXELS): 89,478,485 pixels, 256 MiB as uint8 RGB, which no
# training photo comes near, while a 1.2 MB PNG can declare 20000 x 20000 (1.2 GB).
MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """What the pipelines do to each image; `from_config` reads config.augment.

    train_crop: 'inception' (random-resized crop, ImageNet) or 'resize' (the whole
    image squashed to size x size, the usual multi-label COCO practice).
    train_interpolation: how training crops are resized: 'bilinear' (torchvision's
    RandomResizedCrop, the CNN recipes), 'bicubic' (DeiT, PVT) or 'random' (each
    image bilinear or bicubic with equal chances, drawn from its seed: Mixer, gMLP).
    eval_crop: 'center' (resize the shorter side to size / eval_crop_ratio, centre
    crop) or 'resize' (squash to size x size); eval_interpolation: 'bilinear' or
    'bicubic', how it resizes.
    mean, std: per RGB channel, on [0, 1] pixels: images become (x - mean) / std.
    max_image_pixels: images with more pixels (read from their headers) are left out
    of training and evaluation without being decoded; 0 = no limit.

    The defaults of mean, std, eval_interpolation and eval_crop_ratio (ImageNet's,
    bilinear, 0.875) are what every run trained with before they were settings, and
    what a config without them (an old config.json) means.
    """

    image_size: int
    train_crop: str = "inception"
    train_interpolation: str = "bilinear"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    rand_augment_layers: int = 0          # 0 = off
    rand_augment_magnitude: float = 9.0
    rand_augment_std: float = 0.5
    rand_augment_increasing: bool = True
    color_jitter: float = 0.0             # 0 = off
    random_erasing: float = 0.0           # probability; 0 = off
    mixup_alpha: float = 0.0              # 0 = off
    cutmix_alpha: float = 0.0             # 0 = off
    mix_switch_prob: float = 0.5
    mix_prob: float = 1.0
    mix_label_smoothing: float = 0.0      # applied to the mixed targets (timm)
    repeats: int = 1                      # repeated augmentation (DeiT: 3)
    eval_crop: str = "center"
    eval_crop_ratio: float = 0.875
    eval_interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self):
        for name in FAMILY_FIELDS:
            if getattr(self, name) is None:
                raise ConfigError(
                    f"dataset.{name} is None (the model family's) and was not resolved: "
                    "pass the config through noah_jax.models.input_preprocessing.resolve")
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ConfigError(f"dataset.{name} needs 3 values (R, G, B), got {value}")
            object.__setattr__(self, name, value)  # JSON's lists become tuples
        if min(self.std) <= 0:
            raise ConfigError(f"dataset.std must be positive, got {self.std}")
        _check_choice("augment.train_crop", self.train_crop, TRAIN_CROPS)
        _check_choice("augment.eval_crop", self.eval_crop, EVAL_CROPS)
        _check_choice("augment.train_interpolation", self.train_interpolation,
                      TRAIN_INTERPOLATIONS)
        _check_choice("dataset.eval_interpolation", self.eval_interpolation, INTERPOLATIONS)
        if self.repeats < 1:
            raise ConfigError(f"augment.repeats must be >= 1, got {self.repeats}")
        if not 0 < self.eval_crop_ratio <= 1:
            raise ConfigError(f"dataset.eval_crop_ratio must be in (0, 1], got "
                              f"{self.eval_crop_ratio}")
        if self.max_image_pixels < 0:
            raise ConfigError(f"dataset.max_image_pixels must be >= 0 (0 = no limit), got "
                              f"{self.max_image_pixels}")

    @property
    def mixes(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @property
    def rand_augment_fill(self) -> tuple[int, int, int]:
        """RandAugment's fill colour: the mean in uint8, as timm's transforms_imagenet_train
        gives it (`img_mean`: min(255, round(255 * m)), Python's rounding)."""
        return tuple(min(255, round(255 * m)) for m in self.mean)

    @classmethod
    def from_config(cls, dataset: ml_collections.ConfigDict, a: ml_collections.ConfigDict,
                    label_smoothing: float = 0.0) -> "Preprocess":
        """From config.dataset (`DATASET_FIELDS`) and config.augment (`a`, whose fields
        are this class's `AUGMENT_FIELDS`). Fields that came after a config was written
        (`ADDED_FIELDS`, absent from an old config.json) take the defaults, which are
        what it ran with."""
        def read(section, name):
            if name in ADDED_FIELDS and name not in section:
                return DEFAULTS[name]
            value = section[name]
            return tuple(value) if isinstance(value, (list, tuple)) else value

        return cls(mix_label_smoothing=label_smoothing,
                   **{name: read(dataset, name) for name in DATASET_FIELDS},
                   **{name: read(a, name) for name in AUGMENT_FIELDS})

    def eval_record(self) -> dict[str, Any]:
        """What a checkpoint's meta records of the evaluation preprocessing
        (`EVAL_RECORD_FIELDS`), JSON-ready; `from_eval_record` reads it back."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in ((n, getattr(self, n)) for n in EVAL_RECORD_FIELDS)}

    @classmethod
    def from_eval_record(cls, meta: Mapping[str, Any], **changes) -> "Preprocess":
        """The evaluation preprocessing a checkpoint's meta records (`eval_record`), with
        `changes` (e.g. another image_size for a CNN)."""
        return cls(**{**{name: meta[name] for name in EVAL_RECORD_FIELDS}, **changes})


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{field} must be one of {choices}, got {value!r}")


DEFAULTS = {f.name: f.default for f in dataclasses.fields(Preprocess)
            if f.default is not dataclasses.MISSING}
# The model family's settings in config.dataset: None there means the family's
# (noah_jax.models.input_preprocessing.InputPreprocessing has these fields).
FAMILY_FIELDS = ("mean", "std", "eval_interpolation", "eval_crop_ratio")
# The fields a config sets in `config.dataset`; `config.augment` holds all the others
# (`AUGMENT_FIELDS`) but the mixed targets' smoothing, config.label_smoothing.
DATASET_FIELDS = ("image_size", *FAMILY_FIELDS, "max_image_pixels")
AUGMENT_FIELDS = tuple(f.name for f in dataclasses.fields(Preprocess)
                       if f.name not in (*DATASET_FIELDS, "mix_label_smoothing"))
# Fields newer than some written configs: absent, they mean their defaults.
ADDED_FIELDS = ("mean", "std", "eval_interpolation", "train_interpolation")
# What a checkpoint's meta records about its evaluation input (meta keys).
EVAL_RECORD_FIELDS = ("image_size", "eval_crop", *FAMILY_FIELDS)


def augment_config() -> ml_collections.ConfigDict:
    """`config.augment` with this class's defaults (the CNN recipe), for base configs."""
    return ml_collections.ConfigDict({name: DEFAULTS[name] for name in AUGMENT_FIELDS})


def family_fields_config() -> dict[str, Any]:
    """`FAMILY_FIELDS` for a base config's dataset section: each None (the model
    family's), typed so that a flag can set it (--config.dataset.mean='(0.5,0.5,0.5)')."""
    kinds = {"mean": tuple, "std": tuple, "eval_interpolation": str, "eval_crop_ratio": float}
    return {name: ml_collections.config_dict.placeholder(kinds[name])
            for name in FAMILY_FIELDS}
