"""The model zoo: `create_model(name, num_classes=..., head='noah'|'linear', **overrides)`.

Names follow the reference implementation (`resnet18`, `mobilenetv2_050`,
`deit_tiny_patch16_224`, `mixer_s16_075_224`, `pvt_tiny`, ...); the NOAH and baseline
variants of a backbone share its name and differ by `head`.

Adding a family takes one model file and, for training recipes, one config:

1. Write `noah_jax/models/<family>.py` with a linen module that subclasses
   `noah_jax.models.heads.Classifier`, computes its features and ends with
   `self.classify(features, train=train, dense_init=..., conv_init=...)`, the
   initialisers its reference gives a linear classifier and a head's 1x1 convolutions
   (the head takes the one it uses). Where the baseline and NOAH need different
   features (a class token, pooling before a last layer), ask
   `self.head_wants_positions`, never the head's name. CNN layers with
   PyTorch's padding, init and BatchNorm settings are in `noah_jax.models.layers`.
2. Name submodules after the reference's state_dict, integer indices joined by '_'
   (`features.3.conv.1` -> `features_3/conv_1`), and give the module a class attribute
   `torch_names = TorchNames(...)` (`noah_jax.models.torch_names`) for what that
   generic rule does not cover: the torch names of the two heads, top-level renames,
   where the token count shows. `noah_jax.convert` then converts it both ways.
   Its class attribute `input_preprocessing = InputPreprocessing(...)`
   (`noah_jax.models.input_preprocessing`) states the mean/std and evaluation resize
   the reference fed it (without one: torchvision's ImageNet values).
3. Declare `VARIANTS = {name: (ModuleClass, constructor kwargs)}` in the file, the
   kwargs including the reference's head defaults (num_heads, key_ratio, dropout).

Every module of this package with a `VARIANTS` table is found on first use; a family
defined elsewhere (a test, a user's project) joins with `register_family(VARIANTS)`.
Heads are a registry too (`register_head(name, HeadClass)`, here or in
`noah_jax.models.heads`, whose registry comment says what a head class declares): a head
registered from outside the package is chosen with `create_model(..., head=name)` and
takes its own settings as overrides.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import importlib
import pkgutil
import typing
from typing import Optional

import flax.linen as nn

from noah_jax.models import heads
from noah_jax.models.heads import (Classifier, register_head, registered_heads,  # noqa: F401
                                   unregister_head)
from noah_jax.errors import ConfigError, UnknownSettingError

Variants = dict[str, tuple[type[nn.Module], dict]]

# Families registered from outside the package (register_family), in order.
_EXTERNAL: Variants = {}


@functools.cache
def _package_families() -> Variants:
    # Built on first use, so importing one family module does not import the others.
    registry: Variants = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: _FAMILY_ORDER.get(
            m.name, len(_FAMILY_ORDER))):
        module = importlib.import_module(f"{__name__}.{info.name}")
        variants = getattr(module, "VARIANTS", None)
        if variants is not None:
            _check_new(variants, registry, module.__name__)
            registry.update(variants)
    return registry


# The order `list_models` shows the package's families in (the paper's tables first);
# a family missing here comes after them, alphabetically.
_FAMILY_ORDER = {name: i for i, name in enumerate(
    ("resnet", "mobilenetv2", "vit", "mixer", "mobilenetv3", "shufflenetv2", "pvt"))}


def _registry() -> Variants:
    return {**_package_families(), **_EXTERNAL}


def _check_new(variants: Variants, registry: Variants, source: str) -> None:
    taken = sorted(set(variants) & set(registry))
    if taken:
        raise ValueError(f"{source}: model name(s) {taken} are already registered")
    for name, entry in variants.items():
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], type)
                and issubclass(entry[0], Classifier) and isinstance(entry[1], dict)):
            raise TypeError(f"{source}: VARIANTS[{name!r}] must be (a Classifier subclass, "
                            f"its constructor kwargs), got {entry!r}")


def register_family(variants: Variants) -> None:
    """Adds models defined outside this package: `variants` as a family file's
    `VARIANTS` ({name: (Classifier subclass, constructor kwargs)}). Names must be new."""
    _check_new(variants, _registry(), "register_family")
    _EXTERNAL.update(variants)


def unregister_family(variants: Variants) -> None:
    """Removes models added by `register_family` (tests clean up with it)."""
    for name in variants:
        _EXTERNAL.pop(name, None)


def list_models() -> list[str]:
    """Names accepted by `create_model`, in registry order."""
    return list(_registry())


def model_overrides(name: str, head: Optional[str] = "noah") -> list[str]:
    """The keyword overrides `create_model(name, head=head, ...)` reads (see
    `model_override_types`)."""
    return sorted(model_override_types(name, head))


def model_override_types(name: str, head: Optional[str] = "noah") -> dict[str, type]:
    """{override: its Python type} for `create_model(name, head=head, ...)`: the
    backbone's fields and the head's settings; int, float, bool, str, tuple (sequences),
    or object (`dtype`). head=None: the settings of every registered head (what a config
    declares, so that one config serves every head)."""
    cls, _ = _lookup(name)
    types = _python_types(typing.get_type_hints(cls), _backbone_fields(cls))
    chosen = heads.registered_heads() if head is None else (head,)
    for head_name in chosen:
        hints = heads.head_setting_hints(heads.head_class(head_name))
        for setting, kind in _python_types(hints, hints).items():
            types.setdefault(setting, kind)
    return types


# Classifier fields that create_model sets itself.
_NOT_OVERRIDES = ("parent", "name", "num_classes", "head", "head_settings")


def _backbone_fields(cls: type[nn.Module]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_OVERRIDES]


def _python_types(hints: dict, names) -> dict[str, type]:
    types = {}
    for name in names:
        hint = hints.get(name, object)
        origin = typing.get_origin(hint)
        if hint in (int, float, bool, str):
            types[name] = hint
        elif origin is tuple or origin is collections.abc.Sequence:
            types[name] = tuple
        else:
            types[name] = object
    return types


def model_class(name: str) -> type[nn.Module]:
    """The module class `create_model(name, ...)` builds (its family's class attributes:
    `torch_names`, `input_preprocessing`)."""
    return _lookup(name)[0]


def _lookup(name: str) -> tuple[type[nn.Module], dict]:
    registry = _registry()
    if name in registry:
        return registry[name]
    hint = ""
    if name.startswith("noah_") and name[len("noah_"):] in registry:
        hint = (f" The reference's '{name}' is '{name[len('noah_'):]}' here, with head='noah'"
                " (the default).")
    else:
        close = difflib.get_close_matches(name, registry, n=3)
        if close:
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?"
    raise ConfigError(f"unknown model {name!r}.{hint} Known models: {', '.join(registry)}")


def create_model(name: str, *, num_classes: int, head: str = "noah", **overrides) -> nn.Module:
    """Builds a zoo model as a linen Module.

    `model.init(rng, images)` / `model.apply(variables, images, train=False)` take
    float images [B, H, W, 3] and return float32 logits [B, num_classes]. In
    training, pass `train=True`, `rngs={'dropout': key}` and `mutable=['batch_stats']`
    (the CNNs keep BatchNorm statistics there).

    head: a registered head (`noah_jax.models.heads.registered_heads()`).
    overrides: any field of the family's module (the backbone's `drop_path_rate`
    (transformers and MLPs), the compute `dtype`, ...) or setting of the head (NOAH's
    `num_heads`, `key_ratio`, `dropout`, `head_split`, `kv_split`, `merge`); each goes
    to the head if it is one of the head's settings, else to the backbone. The
    family's VARIANTS table gives the defaults, its head settings applying to whichever
    head has a setting of that name. An override given as None keeps the model's own
    value (the configs declare every override that way); a setting of another
    registered head than `head` is ignored, so that one config serves every head (a
    study runs both with one config).
    """
    cls, defaults = _lookup(name)
    chosen = heads.head_class(head)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    valid = model_overrides(name, head)
    other_heads = {setting for other in heads.registered_heads() if other != head
                   for setting in heads.head_class(other).settings} - set(chosen.settings)
    unknown = sorted(set(overrides) - set(valid) - other_heads)
    if unknown:
        raise UnknownSettingError(f"create_model({name!r}): unknown override(s) {unknown}; "
                                  f"valid overrides for this model: {valid}")
    backbone = set(_backbone_fields(cls))
    clash = sorted(backbone & (other_heads | set(chosen.settings)))
    if clash:
        raise TypeError(f"{cls.__name__}: field(s) {clash} are also head settings; rename them")
    settings = {**defaults, **overrides}
    head_settings = tuple(sorted((k, v) for k, v in settings.items() if k in chosen.settings))
    # Other heads' settings (a VARIANTS table's NOAH ones under another head) stay out.
    kwargs = {k: v for k, v in settings.items()
              if k not in chosen.settings and k not in other_heads}
    return cls(num_classes=num_classes, head=head, head_settings=head_settings, **kwargs)
