"""How the reference fed a family's images to its models: normalisation and evaluation resize.

Each family states its values next to its model, as a class attribute of the module:
`input_preprocessing = InputPreprocessing(...)`, citing where the reference sets them
(torchvision's transforms for the CNNs, DeiT's and PVT's datasets.py, timm's
default_cfg with the reference's yaml for Mixer and gMLP). A family that states
none gets `TORCHVISION_IMAGENET`, the CNNs' values, which are also the `Preprocess`
defaults: what every run trained with before these were settings.

The config keeps them one field away: config.dataset.mean, std, eval_interpolation
and eval_crop_ratio are None (the family's) unless set, and `resolve(config)` fills
them in, once, where training starts; the run's config.json and each checkpoint's meta
then record the values used (`noah_jax.inference` reads them back).
Training-time resizing (augment.train_interpolation) belongs to the recipe, not here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import ml_collections

from noah_jax.data.preprocess import (FAMILY_FIELDS, IMAGENET_MEAN, IMAGENET_STD,
                                      Preprocess)

__all__ = ["InputPreprocessing", "TORCHVISION_IMAGENET", "IMAGENET_MEAN", "IMAGENET_STD",
           "REFERENCE_IMAGE_SIZE", "for_model", "reference_eval", "resolve"]

# The side the reference trains and evaluates every ImageNet model at, unless the model
# is built for another (a ViT's, Mixer's or PVT's img_size).
REFERENCE_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class InputPreprocessing:
    """A family's input normalisation and evaluation resize (the fields of config.dataset
    of the same names; `Preprocess` documents them).

    mean, std: per RGB channel, on [0, 1] pixels.
    eval_interpolation: 'bilinear' or 'bicubic', the evaluation resize.
    eval_crop_ratio: the evaluation resizes the shorter side to
      int(image_size / eval_crop_ratio) and centre-crops image_size.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    eval_interpolation: str
    eval_crop_ratio: float

    def __post_init__(self):
        # The checks of Preprocess, so that a family's typo fails on import.
        Preprocess(image_size=1, **dataclasses.asdict(self))


# torchvision's ImageNet evaluation (Resize(256) + CenterCrop(224): 0.875, PIL bilinear,
# ImageNet mean/std), read from the Preprocess defaults, their one home.
TORCHVISION_IMAGENET = InputPreprocessing(
    **{name: getattr(Preprocess, name) for name in FAMILY_FIELDS})


def for_model(model: Any) -> InputPreprocessing:
    """The family's values for a zoo name, a model or its class (`TORCHVISION_IMAGENET`
    for a family that states none)."""
    if isinstance(model, str):
        from noah_jax.models import model_class  # the registry imports the families

        model = model_class(model)
    cls = model if isinstance(model, type) else type(model)
    return getattr(cls, "input_preprocessing", TORCHVISION_IMAGENET)


def reference_eval(model: Any, image_size: Optional[int] = None) -> Preprocess:
    """The reference's evaluation preprocessing of a built `model`: its family's values,
    resize and centre crop, at `image_size` (default: the model's img_size if it has one,
    else REFERENCE_IMAGE_SIZE). What a converted checkpoint records and is fed."""
    size = image_size or getattr(model, "img_size", None) or REFERENCE_IMAGE_SIZE
    return Preprocess(image_size=size, eval_crop="center",
                      **dataclasses.asdict(for_model(model)))


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose dataset fields mean, std, eval_interpolation and
    eval_crop_ratio that are None hold config.model.name's family values; the others
    stay as set. (A config written before these fields existed lacks them, and
    `Preprocess.from_config` reads that as what such runs used.)"""
    family = for_model(config.model.name)
    resolved = config.copy_and_resolve_references()
    for name in FAMILY_FIELDS:
        if name in resolved.dataset and resolved.dataset[name] is None:
            resolved.dataset[name] = getattr(family, name)
    return resolved
