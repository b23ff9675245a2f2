"""What the tf.data pipelines do to each image, as a plain dataclass (no TensorFlow).

`Preprocess` holds every augmentation setting with its default, the one home of
those defaults: the base config's `augment` section is made from it
(`augment_config()`), and `Preprocess.from_config` reads that section back.
`noah_jax/data/pipeline.py` applies it. `MAX_IMAGE_PIXELS` is the one home of the
default of dataset.max_image_pixels.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from noah_jax.errors import ConfigError


TRAIN_CROPS = ("inception", "resize")
EVAL_CROPS = ("center", "resize")
# Images with more pixels are skipped, never decoded. Pillow's decompression-bomb limit
# (PIL.Image.MAX_IMAGE_PIXELS): 89,478,485 pixels, 256 MiB as uint8 RGB, which no
# training photo comes near, while a 1.2 MB PNG can declare 20000 x 20000 (1.2 GB).
MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """What the pipelines do to each image; `from_config` reads config.augment.

    train_crop: 'inception' (random-resized crop, ImageNet) or 'resize' (the whole
    image squashed to size x size, the usual multi-label COCO practice).
    eval_crop: 'center' (resize the shorter side to size / eval_crop_ratio, centre
    crop) or 'resize' (squash to size x size).
    max_image_pixels: images with more pixels (read from their headers) are left out
    of training and evaluation without being decoded; 0 = no limit.
    """

    image_size: int
    train_crop: str = "inception"
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
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self):
        if self.train_crop not in TRAIN_CROPS:
            raise ConfigError(f"augment.train_crop must be one of {TRAIN_CROPS}, "
                              f"got {self.train_crop!r}")
        if self.eval_crop not in EVAL_CROPS:
            raise ConfigError(f"augment.eval_crop must be one of {EVAL_CROPS}, "
                              f"got {self.eval_crop!r}")
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

    @classmethod
    def from_config(cls, dataset: ml_collections.ConfigDict, a: ml_collections.ConfigDict,
                    label_smoothing: float = 0.0) -> "Preprocess":
        """From config.dataset (image_size, eval_crop_ratio, max_image_pixels) and
        config.augment (`a`), whose fields are this class's `AUGMENT_FIELDS`."""
        fields = {name: tuple(a[name]) if isinstance(a[name], (list, tuple)) else a[name]
                  for name in AUGMENT_FIELDS}
        return cls(image_size=dataset.image_size, eval_crop_ratio=dataset.eval_crop_ratio,
                   max_image_pixels=dataset.max_image_pixels,
                   mix_label_smoothing=label_smoothing, **fields)


# The fields a config sets in `config.augment`: all but those it sets elsewhere
# (dataset.image_size, dataset.eval_crop_ratio, dataset.max_image_pixels, and
# label_smoothing for the mixed targets).
AUGMENT_FIELDS = tuple(f.name for f in dataclasses.fields(Preprocess)
                       if f.name not in ("image_size", "eval_crop_ratio", "max_image_pixels",
                                         "mix_label_smoothing"))


def augment_config() -> ml_collections.ConfigDict:
    """`config.augment` with this class's defaults (the CNN recipe), for base configs."""
    defaults = {f.name: f.default for f in dataclasses.fields(Preprocess)}
    return ml_collections.ConfigDict({name: defaults[name] for name in AUGMENT_FIELDS})
