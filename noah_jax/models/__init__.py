"""The model zoo: `create_model(name, num_classes=..., head='noah'|'linear', **overrides)`.

Names follow the reference implementation (`resnet18`, `mobilenetv2_050`,
`deit_tiny_patch16_224`, `mixer_s16_075_224`, `gmlp_ti16_050_224`, ...); the NOAH
and baseline variants of a backbone share its name and differ by `head`. Each
family module declares `VARIANTS = {name: (ModuleClass, constructor kwargs)}`,
the kwargs including the reference's head defaults (N, r, dropout) for it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import importlib
import typing

import flax.linen as nn

from noah_jax.heads import HEAD_KINDS
from noah_jax.errors import ConfigError, UnknownSettingError

_FAMILIES = ("resnet", "mobilenetv2", "vit", "mixer")


@functools.cache
def _registry() -> dict[str, tuple[type[nn.Module], dict]]:
    # Built on first use, so importing one family module does not import the others.
    registry = {}
    for family in _FAMILIES:
        registry.update(importlib.import_module(f"noah_jax.models.{family}").VARIANTS)
    return registry


def list_models() -> list[str]:
    """Names accepted by `create_model`, in registry order."""
    return list(_registry())


def model_overrides(name: str) -> list[str]:
    """The keyword overrides `create_model(name, ...)` accepts."""
    return sorted(model_override_types(name))


def model_override_types(name: str) -> dict[str, type]:
    """{override: its Python type} for `create_model(name, ...)`: int, float, bool, str,
    tuple (sequences), or object (`dtype`)."""
    cls, _ = _lookup(name)
    hints = typing.get_type_hints(cls)
    types = {}
    for field in dataclasses.fields(cls):
        if field.name in ("parent", "name", "num_classes", "head"):
            continue
        hint = hints.get(field.name, object)
        origin = typing.get_origin(hint)
        if hint in (int, float, bool, str):
            types[field.name] = hint
        elif origin is tuple or origin is collections.abc.Sequence:
            types[field.name] = tuple
        else:
            types[field.name] = object
    return types


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

    overrides: any field of the family's module, e.g. the head's `num_heads`,
    `key_ratio`, `dropout`, `head_split`, `kv_split`, `merge`, the backbone's
    `drop_path_rate` (transformers and MLPs) and the compute `dtype`. An override given
    as None keeps the model's own value (the configs declare every override that way).
    """
    cls, defaults = _lookup(name)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if head not in HEAD_KINDS:
        raise ConfigError(f"head must be one of {HEAD_KINDS}, got {head!r}")
    valid = model_overrides(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise UnknownSettingError(f"create_model({name!r}): unknown override(s) {unknown}; "
                                  f"valid overrides for this model: {valid}")
    return cls(num_classes=num_classes, head=head, **{**defaults, **overrides})
