"""The reference's PyTorch state_dicts <-> our Flax variables, and a command to convert files.

    variables = torch_to_flax(state_dict, "resnet18", head="noah")       # a zoo model
    variables = torch_to_flax(state_dict, "noah_head", num_heads=4, key_ratio=0.5)  # NOAHHead
    state_dict = flax_to_torch(variables, "resnet18")                    # the way back

    python -m noah_jax.convert --model resnet18 --head noah --input ckpt.pth --output DIR \
        [--num-classes K] [--drop-head] [--class-names FILE] [--override key_ratio=0.25 ...]

A state_dict is a mapping from the reference's keys to numpy arrays (torch tensors are
accepted too). The class count comes from the head's weights, and for ViT/PVT/Mixer/gMLP the
image size from the number of tokens (e.g. a 448 px ViT); other settings that change
shapes (the head's num_heads, key_ratio, head_split, kv_split, ...) are given as
`create_model` overrides, the reference's defaults otherwise.

How names map. The target's structure is read from the abstract variables of the
model we build (`jax.eval_shape` of its `init`), never guessed from the state_dict:
every Flax leaf gives the one torch key it expects, with a layout rule, and the
state_dict must supply exactly those keys.

  module path   Flax segments `name_3_0` are torch's `name.3.0` (the models name their
                submodules so: `layer1_0/downsample_1` is `layer1.0.downsample.1`).
                What this generic rule does not cover, each family states next to its
                model (`torch_names`, a `noah_jax.models.torch_names.TorchNames`): the
                torch names of its two heads (the reference's name first, then aliases
                accepted on the way in: ResNet's baseline `head.2`, or torchvision's
                `fc`), top-level renames (DeiT: `patch_embed` -> `patch_embed.proj`) and
                where the token count shows (the image size of a ViT, PVT, Mixer or gMLP).
                The NOAH head alone (`noah_head`) is `query` / `value`.
  leaf name     kernel, scale -> weight (Conv/Linear, BatchNorm/LayerNorm); batch_stats
                mean, var -> running_mean, running_var; bias, pos_embed, cls_token as is.
                BatchNorm's `num_batches_tracked` (in real torchvision checkpoints, not
                in the fixtures) is accepted and dropped: our BatchNorm has no counter.
  layout        Conv   torch OIHW [O, I/G, kh, kw] -> HWIO [kh, kw, I/G, O] (grouped and
                       depthwise convs too: depthwise [C, 1, kh, kw] -> [kh, kw, 1, C])
                Linear [out, in] -> [in, out]. DeiT's packed qkv Linear [3D, D] keeps
                       torch's output order (q, k, v; then attention heads), so it is
                       this transpose and nothing more.
                NOAH   grouped 1x1 conv [N*K, Cin/G, 1, 1] -> GroupedProjection kernel
                       [G, Cin/G, N*K/G]: reshape to [G, N*K/G, Cin/G], swap the last two.
                everything else (biases, norms, pos_embed, cls_token) unchanged.

Mismatches fail loudly: one ConversionError lists every missing key, unexpected key and
shape mismatch by name (the command prints them counted, three of each kind by name, and
the zoo models and heads whose layout the file has: `fitting_models`). Nothing is
skipped silently; `drop_head=True` drops the head's weights (and ignores them in the
state_dict) on purpose, for fine-tuning on other labels.
Values are cast to float32, the dtype of our parameters.

Class names. The checkpoint's meta records them for predictions (`noah_jax.predict`):
`--class-names FILE` (one per line, as many as the head has classes), else, for a
1000-class head, ImageNet-1k's (`catalog.imagenet_class_names`, WordNet synset ids).
The meta also records the evaluation input the reference fed the model (image_size,
eval_crop, eval_crop_ratio, eval_interpolation, mean, std: its family's values,
`noah_jax.models.input_preprocessing.reference_eval`), which `noah_jax.inference` uses.

Files (`load_state_dict`): `.pth`/`.pt`/`.pth.tar` through `torch.load(...,
weights_only=True)` (torch is optional and only needed for these), `.safetensors` (read
here from the format's spec, no package needed) and `.npz` (entries named `__x__` are
metadata, as in the parity fixtures, not weights). A checkpoint wrapped as
{'state_dict': ...} or {'model': ...} is unwrapped, DataParallel `module.` prefixes are
removed. A file that is not what its extension says (empty, cut short, a safetensors
header with a missing or mistyped field, a .npz that is no zip archive) raises a
WeightsFileError, a ValueError whose one line names the file and the problem; the
command prints that line and exits with status 1, as it does for every error.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import math
import os
import pickle
import re
import sys
import zipfile
from typing import Any, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from noah_jax import checkpoint, cli, errors
from noah_jax.data import catalog
from noah_jax.errors import UserError
from noah_jax.heads import NOAHHead
from noah_jax.models import (create_model, input_preprocessing, list_models, model_class,
                             model_overrides)
from noah_jax.models.torch_names import GENERIC, TorchNames

HEAD_ONLY = "noah_head"  # torch_to_flax's model name for a NOAH head on its own

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
               "var": "running_var"}
_BATCH_NORM_COUNTER = "num_batches_tracked"


class ConversionError(ValueError):
    """A state_dict does not fit the model; the message lists every problem by name.

    `problems`: for a mismatch of keys or shapes, each problem by kind ('missing',
    'unexpected', 'shape', 'dtype'), one short text each, for `summary`; `target`
    then describes the model it does not fit."""

    def __init__(self, message: str, problems: Optional[Mapping[str, list[str]]] = None,
                 target: str = ""):
        super().__init__(message)
        self.problems, self.target = dict(problems or {}), target


# ---------------------------------------------------------------------------------------
# Layout rules.
# ---------------------------------------------------------------------------------------


def _kernel_layout(path: tuple[str, ...], shape: tuple[int, ...]) -> str:
    if len(shape) == 4:
        return "conv"
    if len(shape) == 2:
        return "linear"
    if len(shape) == 3 and len(path) >= 2 and path[-2] in ("query", "value"):
        return "grouped"  # heads.GroupedProjection, the only 3-D kernel of the zoo
    raise NotImplementedError(f"no torch layout rule for the kernel {'/'.join(path)} of shape "
                              f"{shape}; add one to noah_jax/convert.py")


def _torch_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if layout == "conv":
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    if layout == "linear":
        return (shape[1], shape[0])
    if layout == "grouped":
        groups, cin, cout = shape
        return (groups * cout, cin, 1, 1)
    return tuple(shape)


def _to_flax_layout(layout: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if layout == "conv":
        value = value.transpose(2, 3, 1, 0)
    elif layout == "linear":
        value = value.T
    elif layout == "grouped":
        groups, cin, cout = shape
        value = value.reshape(groups, cout, cin).transpose(0, 2, 1)
    return np.ascontiguousarray(value)


def _to_torch_layout(layout: str, value: np.ndarray) -> np.ndarray:
    if layout == "conv":
        value = value.transpose(3, 2, 0, 1)
    elif layout == "linear":
        value = value.T
    elif layout == "grouped":
        groups, cin, cout = value.shape
        value = value.transpose(0, 2, 1).reshape(groups * cout, cin, 1, 1)
    return np.ascontiguousarray(value)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One Flax leaf and the torch tensor it comes from."""

    torch_key: str
    collection: str           # 'params' or 'batch_stats'
    path: tuple[str, ...]     # inside the collection
    layout: str               # 'same', 'conv', 'linear', 'grouped'
    shape: tuple[int, ...]    # Flax shape
    dtype: Any

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return _torch_shape(self.layout, self.shape)


def _generic_segment(segment: str) -> str:
    """`layer1_0` -> `layer1.0`, `conv_1_0` -> `conv.1.0`, `mlp_tokens` -> `mlp_tokens`."""
    match = re.fullmatch(r"(.*?)((?:_\d+)+)", segment)
    if not match:
        return segment
    return ".".join([match.group(1), *match.group(2)[1:].split("_")])


def _torch_module(path: tuple[str, ...], renames: Mapping[str, str]) -> str:
    if not path:
        return ""
    first = renames.get(path[0], _generic_segment(path[0]))
    return ".".join([first, *(_generic_segment(s) for s in path[1:])])


def _layout(variables: Mapping[str, Any], renames: Mapping[str, str]) -> list[_Entry]:
    """Every leaf of `variables` (concrete or abstract) with its torch key and layout."""
    entries, seen = [], {}
    for collection in ("params", "batch_stats"):
        for path, leaf in flatten_dict(dict(variables.get(collection, {}))).items():
            module, name = path[:-1], path[-1]
            shape = tuple(leaf.shape)
            layout = _kernel_layout(path, shape) if name == "kernel" else "same"
            prefix = _torch_module(module, renames)
            leaf_name = _LEAF_NAMES.get(name, name)
            key = f"{prefix}.{leaf_name}" if prefix else leaf_name
            if key in seen:  # a programming error in the rules, not the user's
                raise AssertionError(f"{collection}/{'/'.join(path)} and {seen[key]} both map "
                                     f"to the torch key {key}")
            seen[key] = f"{collection}/{'/'.join(path)}"
            entries.append(_Entry(key, collection, path, layout, shape, leaf.dtype))
    return entries


def _batch_norm_modules(entries: Iterable[_Entry]) -> set[str]:
    """Torch prefixes of the BatchNorms (modules with running statistics)."""
    return {e.torch_key.rsplit(".", 1)[0] for e in entries if e.collection == "batch_stats"}


# ---------------------------------------------------------------------------------------
# The model side: which model the state_dict describes.
# ---------------------------------------------------------------------------------------


def _abstract_variables(module: nn.Module, input_shape: Sequence[int]) -> dict:
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(input_shape, jnp.float32))
    return {col: shapes[col] for col in ("params", "batch_stats") if col in shapes}


def _model_input_shape(model: nn.Module) -> tuple[int, ...]:
    size = getattr(model, "img_size", 224)  # CNNs take any size; 224 as the reference
    return (1, size, size, 3)


def _torch_names(model: nn.Module) -> TorchNames:
    """The model family's naming rules (the `torch_names` its module class declares)."""
    return getattr(type(model), "torch_names", GENERIC)


def _under(key: str, module: str) -> bool:
    return key == module or key.startswith(module + ".")


def _apply_aliases(state_dict: dict[str, np.ndarray], canonical: str,
                   aliases: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Renames keys under an alias module (e.g. torchvision's `fc`) to the canonical one.

    Only when the canonical module is absent; otherwise the alias keys stay and are
    reported as unexpected. Returns the state_dict and {new key: original key}.
    """
    if any(_under(k, canonical) for k in state_dict):
        return state_dict, {}
    for alias in aliases:
        if any(_under(k, alias) for k in state_dict):
            renamed, origin = {}, {}
            for key, value in state_dict.items():
                if _under(key, alias):
                    new = canonical + key[len(alias):]
                    origin[new] = key
                    key = new
                renamed[key] = value
            return renamed, origin
    return state_dict, {}


def infer_model_settings(state_dict: Mapping[str, Any], model_name: str, *, head: str = "noah",
                         num_classes: Optional[int] = None, drop_head: bool = False,
                         **overrides) -> tuple[Optional[int], dict]:
    """The class count and `create_model` overrides that `state_dict` needs.

    The class count is read from the head: rows of `head.query.weight` / num_heads
    (NOAH) or rows of the linear head's weight. `num_classes`, if given, must agree,
    unless `drop_head` (then it is the intended count of the new head and is returned
    as is; None if neither is known). `img_size` is inferred from the number of tokens
    (pos_embed, token-mixing weights) where the model has one and it is not given.
    """
    state_dict = _as_numpy_dict(state_dict)
    model = create_model(model_name, num_classes=1, head=head, **overrides)
    torch_names = _torch_names(model)
    attends = model.head_wants_positions
    overrides = dict(overrides)

    if "img_size" in model_overrides(model_name) and "img_size" not in overrides:
        img_size = torch_names.image_size(model, state_dict)
        if img_size is not None and img_size != model.img_size:
            overrides["img_size"] = img_size

    if drop_head and num_classes is not None:
        return num_classes, overrides  # the new head's count; the old head is not read
    names = torch_names.head_names(attends)
    # The NOAH head's query projection has N*K rows, the linear head's weight K.
    weight_keys = ([f"{name}.query.weight" for name in names] if attends
                   else [f"{name}.weight" for name in names])
    found = next((k for k in weight_keys if k in state_dict), None)
    if found is None:
        if drop_head or num_classes is not None:
            return num_classes, overrides
        raise ConversionError(
            f"cannot tell the class count of {model_name} (head={head}): the state_dict has "
            f"none of {weight_keys}. Pass num_classes (the head's keys are then reported "
            f"missing), or drop_head=True to convert the backbone only.")
    rows = state_dict[found].shape[0] if state_dict[found].ndim else 0
    if attends:
        if rows % model.num_heads:
            if drop_head:
                return None, overrides
            raise ConversionError(
                f"{found} has {rows} rows, not a multiple of num_heads={model.num_heads}: the "
                f"checkpoint's NOAH head has another number of heads; pass num_heads=N")
        rows //= model.num_heads
    if num_classes is not None and num_classes != rows:
        raise ConversionError(f"num_classes={num_classes} was asked for, but {found} holds a "
                              f"{rows}-class head")
    return rows, overrides


def _head_only_target(state_dict: dict[str, np.ndarray], overrides: dict) -> tuple[NOAHHead, int]:
    """The NOAHHead and its input width C implied by query/value weights and settings."""
    fields = sorted(f.name for f in dataclasses.fields(NOAHHead)
                    if f.name not in ("parent", "name", "num_classes"))
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(f"torch_to_flax({HEAD_ONLY!r}): unknown setting(s) {unknown}; "
                        f"valid: {fields}")
    settings = NOAHHead(num_classes=1, **overrides)
    missing = [k for k in ("query.weight", "value.weight") if k not in state_dict]
    if missing:
        raise ConversionError(f"a NOAH head's state_dict needs {missing} (keys present: "
                              f"{sorted(state_dict)})")
    query, value = state_dict["query.weight"], state_dict["value.weight"]
    n = settings.num_heads
    if query.ndim != 4 or value.ndim != 4 or query.shape[0] % n:
        raise ConversionError(
            f"query.weight {list(query.shape)} / value.weight {list(value.shape)} are not "
            f"grouped 1x1 conv weights [N*K, Cin/G, 1, 1] with N=num_heads={n}")
    groups = n if settings.head_split else 1
    key_channels, value_channels = groups * query.shape[1], groups * value.shape[1]
    channels = key_channels + value_channels if settings.kv_split else key_channels
    return NOAHHead(num_classes=query.shape[0] // n, **overrides), channels


# ---------------------------------------------------------------------------------------
# Conversion.
# ---------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        import torch  # the value is a torch tensor, so torch is installed
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy cannot take torch's bfloat16
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _as_numpy_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"a state_dict is a mapping from keys to arrays, got {type(state_dict)}")
    return {str(k): _to_numpy(v) for k, v in state_dict.items()}


# How each kind of problem reads in ConversionError's listing (`summary` counts them).
_PROBLEM_LINES = {"missing": "missing", "unexpected": "unexpected",
                  "shape": "shape mismatch", "dtype": "not numeric"}


def _problems(state_dict: Mapping[str, np.ndarray], entries: Sequence[_Entry],
              origin: Mapping[str, str]) -> dict[str, list[str]]:
    """Every way `state_dict` does not fit `entries`, by kind (`_PROBLEM_LINES`); empty
    lists where it fits."""
    expected = {e.torch_key: e for e in entries}
    counters = {f"{m}.{_BATCH_NORM_COUNTER}" for m in _batch_norm_modules(entries)}
    shown = lambda key: f"{origin[key]} (read as {key})" if key in origin else key  # noqa: E731
    return {
        "missing": [f"{key} {list(e.torch_shape)} (-> {e.collection}/{'/'.join(e.path)})"
                    for key, e in expected.items() if key not in state_dict],
        "unexpected": [f"{shown(key)} {list(np.shape(v))}" for key, v in state_dict.items()
                       if key not in expected and key not in counters],
        "shape": [f"{shown(key)}: model expects {list(e.torch_shape)}, state_dict has "
                  f"{list(state_dict[key].shape)}" for key, e in expected.items()
                  if key in state_dict and tuple(state_dict[key].shape) != e.torch_shape],
        "dtype": [f"{shown(key)} (dtype {state_dict[key].dtype})" for key in expected
                  if key in state_dict
                  and not (np.issubdtype(state_dict[key].dtype, np.number)
                           or state_dict[key].dtype == jnp.bfloat16)],
    }


def summary(problems: Mapping[str, Sequence[str]], examples: int = 3) -> str:
    """ConversionError.problems in one line: a count per kind, with a few examples
    ('120 keys missing (e.g. a; b; c), 40 unexpected keys (...)')."""
    return errors.count_differences(
        {kind: [text.split(" (-> ")[0] for text in listed] for kind, listed in problems.items()},
        examples)


def _convert(state_dict: dict[str, np.ndarray], entries: list[_Entry], origin: Mapping[str, str],
             description: str) -> dict:
    problems = _problems(state_dict, entries, origin)
    lines = [f"{_PROBLEM_LINES[kind]}: {text}" for kind, listed in problems.items()
             for text in listed]
    if lines:
        raise ConversionError(f"the state_dict does not fit {description}: {len(lines)} "
                              "problem(s):\n  " + "\n  ".join(lines), problems, description)

    expected = {e.torch_key: e for e in entries}
    flat = {}
    for key, e in expected.items():
        value = _to_flax_layout(e.layout, state_dict[key], e.shape)
        flat[(e.collection, *e.path)] = value.astype(np.dtype(e.dtype), copy=False)
    return unflatten_dict(flat)


def torch_to_flax(state_dict: Mapping[str, Any], model_name: str, *, head: str = "noah",
                  num_classes: Optional[int] = None, drop_head: bool = False,
                  **overrides) -> dict:
    """Converts the reference's state_dict into Flax variables {'params', 'batch_stats'}.

    Args:
      state_dict: the reference's keys -> arrays (numpy, or torch tensors).
      model_name: a zoo name (`create_model`), or 'noah_head' for a NOAHHead alone (its
        keys `query.*`, `value.*`; pass its num_heads, key_ratio, head_split, kv_split).
      head: 'noah' or 'linear', the head the checkpoint has.
      num_classes: checked against the head's weights (the count is read from them).
      drop_head: leave the head out (its weights, if any, are ignored): the backbone for
        fine-tuning with a new head.
      **overrides: `create_model` overrides (e.g. num_heads, key_ratio, img_size), or the
        NOAHHead's settings for 'noah_head'.

    Returns the variables of `create_model(model_name, head=head, num_classes=K,
    **overrides)` as numpy float32 arrays ('batch_stats' only where the model has it).
    Raises ConversionError listing every missing, unexpected and mis-shaped key.
    """
    state_dict = _as_numpy_dict(state_dict)
    if model_name == HEAD_ONLY:
        if drop_head:
            raise ValueError(f"drop_head=True leaves nothing of {HEAD_ONLY!r} to convert")
        module, channels = _head_only_target(state_dict, overrides)
        if num_classes is not None and num_classes != module.num_classes:
            raise ConversionError(f"num_classes={num_classes} was asked for, but query.weight "
                                  f"holds a {module.num_classes}-class head")
        entries = _layout(_abstract_variables(module, (1, 1, channels)), {})
        description = (f"NOAHHead(num_classes={module.num_classes}, num_heads="
                       f"{module.num_heads}, key_ratio={module.key_ratio}, head_split="
                       f"{module.head_split}, kv_split={module.kv_split}) on C={channels}")
        return _convert(state_dict, entries, {}, description)

    return _convert(*_plan(state_dict, model_name, head=head, num_classes=num_classes,
                           drop_head=drop_head, overrides=overrides))


def _plan(state_dict: dict[str, np.ndarray], model_name: str, *, head: str,
          num_classes: Optional[int], drop_head: bool, overrides: Mapping[str, Any]
          ) -> tuple[dict[str, np.ndarray], list[_Entry], dict[str, str], str]:
    """What `_convert` takes: the state_dict with the head's aliases applied (or the
    head's keys dropped), the target's entries, {renamed key: original}, and the
    model's description."""
    num_classes, overrides = infer_model_settings(state_dict, model_name, head=head,
                                                  num_classes=num_classes,
                                                  drop_head=drop_head, **overrides)
    entries = _model_entries(model_name, head, num_classes or 1, drop_head,
                             tuple(sorted((k, _hashable(v)) for k, v in overrides.items())))
    model = create_model(model_name, num_classes=num_classes or 1, head=head, **overrides)
    torch_names = _torch_names(model)
    if drop_head:
        every_head = set(torch_names.noah_head) | set(torch_names.linear_head)
        state_dict = {k: v for k, v in state_dict.items()
                      if not any(_under(k, name) for name in every_head)}
        origin = {}
    else:
        names = torch_names.head_names(model.head_wants_positions)
        state_dict, origin = _apply_aliases(state_dict, names[0], names[1:])
    settings = "".join(f", {k}={v!r}" for k, v in sorted(overrides.items()))
    description = (f"{model_name} (head={head}, "
                   + ("head dropped" if drop_head else f"num_classes={num_classes}")
                   + f"{settings})")
    return state_dict, list(entries), origin, description


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


@functools.lru_cache(maxsize=None)  # a model's layout is built once per process
def _model_entries(model_name: str, head: str, num_classes: int, drop_head: bool,
                   overrides: tuple[tuple[str, Any], ...]) -> tuple[_Entry, ...]:
    model = create_model(model_name, num_classes=num_classes, head=head, **dict(overrides))
    target = _abstract_variables(model, _model_input_shape(model))
    if drop_head:
        target = {col: {k: v for k, v in tree.items() if k != "head"}
                  for col, tree in target.items()}
    renames = _torch_names(model).module_renames(model.head_wants_positions)
    return tuple(_layout(target, renames))


def fitting_models(state_dict: Mapping[str, Any], *, near: Optional[str] = None,
                   num_classes: Optional[int] = None, drop_head: bool = False,
                   overrides: Optional[Mapping[str, Any]] = None) -> list[tuple[str, str]]:
    """(model, head) pairs of the zoo that `state_dict` converts into as it is: the
    same keys and shapes, with the class count and image size read from it, and
    `overrides` where a model takes them (else the reference's settings). The family
    of `near` (the model asked for) is searched first; the other families only when
    none of it fits, those whose smallest model shares most of the file's keys
    first. Each model's layout comes from `jax.eval_shape`, once per process."""
    state_dict = _as_numpy_dict(state_dict)
    overrides = dict(overrides or {})
    keys = {k for k in state_dict if not k.endswith(f".{_BATCH_NORM_COUNTER}")}
    families: dict[type, list[str]] = {}
    for name in list_models():
        families.setdefault(model_class(name), []).append(name)

    def fits(name: str, head: str) -> bool:
        accepted = set(model_overrides(name))
        try:
            plan = _plan(state_dict, name, head=head, num_classes=num_classes,
                         drop_head=drop_head,
                         overrides={k: v for k, v in overrides.items() if k in accepted})
        except (ValueError, TypeError):  # not this model's head, or its settings
            return False
        return not any(_problems(plan[0], plan[1], plan[2]).values())

    def shared(names: list[str]) -> float:  # key overlap with a family's smallest model
        theirs = {e.torch_key for e in _model_entries(names[0], "noah", 1, drop_head, ())}
        return len(theirs & keys) / max(len(theirs | keys), 1)

    first = [names for names in families.values() if near in names]
    others = sorted((names for names in families.values() if near not in names),
                    key=shared, reverse=True)
    for names in first + [n for n in others if shared(n) >= 0.5]:
        found = [(name, head) for name in names for head in ("noah", "linear")
                 if fits(name, head)]
        if found:
            return found
    return []


def flax_to_torch(variables: Mapping[str, Any], model_name: str, *,
                  num_batches_tracked: bool = False) -> dict[str, np.ndarray]:
    """Our variables as the reference's state_dict (numpy arrays, the reference's keys).

    The inverse of `torch_to_flax` (linear heads get the reference's name, e.g.
    `head.2` in the CNNs). num_batches_tracked=True adds every BatchNorm's counter as
    an int64 zero (we do not count batches), for loaders that insist on the key;
    PyTorch's own `load_state_dict` fills it in when it is absent.
    """
    variables = {col: dict(variables[col]) for col in ("params", "batch_stats")
                 if col in variables}
    if model_name == HEAD_ONLY:
        renames = {}
    else:
        head_params = variables.get("params", {}).get("head", {})
        model = create_model(model_name, num_classes=1,
                             head="noah" if "query" in head_params else "linear")
        renames = _torch_names(model).module_renames(model.head_wants_positions)
    entries = _layout(variables, renames)
    state_dict = {}
    for e in entries:
        value = variables[e.collection]
        for name in e.path:
            value = value[name]
        state_dict[e.torch_key] = _to_torch_layout(e.layout, np.asarray(value))
    if num_batches_tracked:
        for module in sorted(_batch_norm_modules(entries)):
            state_dict[f"{module}.{_BATCH_NORM_COUNTER}"] = np.zeros((), np.int64)
    return state_dict


def torch_parameter_keys(params: Mapping[str, Any], model: Optional[nn.Module] = None
                         ) -> dict[tuple[str, ...], tuple[str, tuple[int, ...]]]:
    """{Flax path of each parameter: (the reference's state_dict key, its torch shape)}.

    `params` may be concrete or abstract; `model` gives the family's names (its
    TorchNames and head); without it, the generic rule alone (for a module that needs
    no renames). The optimiser's weight-decay rules are stated on these names, as the
    reference states them on `named_parameters()`.
    """
    renames = ({} if model is None
               else _torch_names(model).module_renames(model.head_wants_positions))
    return {e.path: (e.torch_key, e.torch_shape)
            for e in _layout({"params": params}, renames)}


# ---------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------

_TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar")
_SUFFIXES = (*_TORCH_SUFFIXES, ".safetensors", ".npz")
_STATE_DICT_WRAPPERS = ("state_dict", "model")


def unwrap_state_dict(obj: Any) -> dict[str, Any]:
    """The state_dict inside a training checkpoint.

    Descends into {'state_dict': ...} or {'model': ...} (first match, repeatedly), then
    removes DataParallel's `module.` prefix if every key has it.
    """
    while isinstance(obj, Mapping):
        inner = next((obj[w] for w in _STATE_DICT_WRAPPERS if isinstance(obj.get(w), Mapping)),
                     None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state_dict (a mapping from names to tensors), got "
                         f"{type(obj).__name__}")
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


class WeightsFileError(UserError, ValueError):
    """A weights file that cannot be read as its extension says; the message names the
    file and what is wrong with it, in one line."""


def _reason(error: BaseException) -> str:
    """The first sentence of an error's message: libraries append advice and internals
    in further sentences and lines, which do not fit one line."""
    lines = str(error).strip().splitlines()
    return lines[0].split(". ")[0] if lines else ""


def _load_torch(path: str) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch, an optional dependency of noah_jax: pip install "
            "torch --index-url https://download.pytorch.org/whl/cpu (the CPU build; plain "
            "`pip install torch` also pulls CUDA libraries), or save the state_dict as "
            ".safetensors or .npz where torch is installed"
        ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message runs to several paragraphs; it stays in the chain.
        raise WeightsFileError(
            f"{path} was refused by torch.load(weights_only=True), which never runs pickled "
            "code: it holds Python objects besides tensors, or is not a PyTorch file. If you "
            "trust the file, keep only its weights: torch.save(torch.load(path, "
            "weights_only=False)['model'], 'weights.pth') (or ['state_dict'])") from e
    except OSError:
        raise  # the file system's problem, not the file's content
    except Exception as e:
        # A truncated or foreign file fails deep inside torch with whatever error the
        # step that ran out of data raises (EOFError, RuntimeError from the zip reader,
        # KeyError for a missing archive member, ...): all mean the file is not one.
        reason = _reason(e)
        raise WeightsFileError(f"{path} is not a valid PyTorch file: torch.load failed with "
                               f"{type(e).__name__}{': ' + reason if reason else ''}") from e


# safetensors' dtype names (https://github.com/huggingface/safetensors, format spec).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def _is_count(value: Any) -> bool:
    """A JSON non-negative integer (JSON's true/false arrive as Python bools, ints too)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safetensors_entry(name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry; a ValueError saying what is wrong
    with it otherwise."""
    if not isinstance(info, dict):
        raise ValueError(f"tensor {name!r} is described by a JSON {type(info).__name__}, "
                         "not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise ValueError(f"tensor {name!r} has no {field!r} in its header")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {dtype!r}; readable dtypes: "
                         f"{', '.join(_SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(map(_is_count, shape)):
        raise ValueError(f"tensor {name!r} has shape {shape!r}, not a list of non-negative "
                         "integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise ValueError(f"tensor {name!r} has data_offsets {offsets!r}, not a [start, end] "
                         "pair of non-negative integers")
    return np.dtype(_SAFETENSORS_DTYPES[dtype]), tuple(shape), offsets[0], offsets[1]


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a .safetensors file: u64 little-endian header size, JSON header, raw data.

    Done here rather than with `safetensors.numpy.load_file` because that loader has no
    bfloat16 (numpy lacks the type; here it is ml_dtypes' bfloat16, as in JAX), and
    checkpoints are often saved in bfloat16. The package serves the tests as an
    independent writer of the format. A file that does not follow the format raises a
    WeightsFileError that names the first problem found.
    """
    def invalid(problem: str) -> WeightsFileError:
        return WeightsFileError(f"{path} is not a valid safetensors file: {problem}")

    size = os.path.getsize(path)
    if size < 8:  # np.memmap cannot map an empty file, so this comes first
        raise invalid(f"it has {size} bytes, fewer than the 8 of its header size")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    header_size = int.from_bytes(data[:8].tobytes(), "little")
    if 8 + header_size > data.size:
        raise invalid(f"its header size {header_size} reaches beyond the file's "
                      f"{data.size} bytes")
    try:
        text = data[8:8 + header_size].tobytes().decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("its header is not UTF-8 text") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise invalid(f"its header is not JSON ({_reason(e)})") from None
    if not isinstance(header, dict):
        raise invalid(f"its header is a JSON {type(header).__name__}, not an object")
    body = data[8 + header_size:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, start, end = _safetensors_entry(name, info)
        except ValueError as e:
            raise invalid(str(e)) from None
        if not start <= end <= body.size or end - start != math.prod(shape) * dtype.itemsize:
            raise invalid(f"tensor {name!r} ({info['dtype']} {list(shape)}) does not fit "
                          f"its data_offsets [{start}, {end}] in {body.size} bytes of data")
        tensors[name] = np.frombuffer(body[start:end].tobytes(), dtype).reshape(shape)
    return tensors


def _load_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of a .npz (a zip of .npy files), without its `__x__` metadata entries;
    never unpickles (allow_pickle=False)."""
    # np.load decides what a file is from its first bytes: without this check a .npy or
    # a pickle named .npz would come back as something other than an archive.
    if not zipfile.is_zipfile(path):
        raise WeightsFileError(f"{path} is not a valid .npz file: it is not a zip archive")
    tensors = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:
                if re.fullmatch(r"__.*__", name):
                    continue
                tensors[name] = npz[name]
                if not isinstance(tensors[name], np.ndarray):  # a member that is no .npy
                    raise ValueError(f"entry {name!r} is not a numpy array")
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        raise WeightsFileError(f"{path} is not a valid .npz file: {_reason(e)}") from None
    return tensors


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a state_dict from .pth/.pt/.pth.tar, .safetensors or .npz (see module doc).

    A missing path or a folder raises FileNotFoundError / IsADirectoryError, a file that
    is not what its extension says a WeightsFileError (a ValueError); each message is
    one line naming the file.
    """
    path = os.fspath(path)
    name = os.path.basename(path).lower()
    if not name.endswith(_SUFFIXES):
        raise ValueError(f"cannot read {path}: unknown extension; supported: "
                         f"{', '.join(_SUFFIXES)}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a weights file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.getsize(path) == 0:
        raise WeightsFileError(f"{path} is empty (0 bytes)")
    if name.endswith(_TORCH_SUFFIXES):
        obj = _load_torch(path)
    elif name.endswith(".safetensors"):
        obj = _load_safetensors(path)
    else:
        obj = _load_npz(path)
    try:
        return _as_numpy_dict(unwrap_state_dict(obj))
    except ValueError as e:
        raise WeightsFileError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare string


def read_class_names(path: str) -> list[str]:
    """Class names from a text file, one per line in label order (surrounding spaces
    and trailing empty lines dropped); an empty line among them is a mistake."""
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f.read().splitlines()]
    while names and not names[-1]:
        names.pop()
    if "" in names:
        raise ConversionError(f"{path}: line {names.index('') + 1} is empty; the file needs "
                              "one class name per line, in label order")
    return names


def _class_names(path: Optional[str], num_classes: Optional[int], *, drop_head: bool
                 ) -> Optional[list[str]]:
    """The names to record: those of `path`, checked against the head's class count;
    without a file, ImageNet-1k's (WordNet synset ids) for a kept 1000-class head; else
    None (a dropped head's classes are the fine-tuning dataset's, recorded by training)."""
    if path is None:
        if num_classes == 1000 and not drop_head:
            return catalog.imagenet_class_names()
        return None
    names = read_class_names(path)
    if num_classes is not None and len(names) != num_classes:
        raise ConversionError(f"{path} has {len(names)} class names (one per line), but the "
                              f"model has {num_classes} classes")
    return names


def _does_not_fit(args: argparse.Namespace, state_dict: dict[str, np.ndarray],
                  error: ConversionError) -> str:
    """The command's one line for a file that does not convert into --model: what does
    not fit, counted (the full listing, a line per key, would run to hundreds of
    lines), and which zoo models the file fits instead."""
    if error.problems:
        message = f"{args.input} does not fit {error.target}: {summary(error.problems)}"
    else:  # e.g. no head of that kind in the file: its message says what it looked for
        message = str(error).rstrip(".")
    if args.model == HEAD_ONLY:
        return message
    found = fitting_models(state_dict, near=args.model, drop_head=args.drop_head,
                           overrides=dict(args.override))
    if (args.model, args.head) in found:  # the layout fits; the message names the problem
        return message
    if found:
        return message + "; its layout fits " + " or ".join(
            f"--model {name} --head {head}" for name, head in found)
    if error.problems:
        return message + ("; its layout fits no zoo model with the reference's settings "
                          "(settings that change shapes, such as num_heads, are given as "
                          "--override KEY=VALUE)")
    return message


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m noah_jax.convert",
        description="Convert a reference PyTorch checkpoint into an Orbax checkpoint that "
                    "training (config.init_from) and evaluation read.")
    parser.add_argument("--model", required=True, help="zoo name, e.g. resnet18")
    parser.add_argument("--head", choices=("noah", "linear"), default="noah",
                        help="the head the checkpoint has")
    parser.add_argument("--input", required=True,
                        help="checkpoint: " + ", ".join(_SUFFIXES))
    parser.add_argument("--output", required=True, help="new Orbax checkpoint directory")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="checked against the head's weights; with --drop-head, the class "
                             "count of the new head, recorded in the checkpoint's meta")
    parser.add_argument("--drop-head", action="store_true",
                        help="write the backbone only (fine-tuning on another label set)")
    parser.add_argument("--class-names", metavar="FILE", default=None,
                        help="text file of the class names in label order, one per line, "
                             "recorded in the checkpoint's meta (predictions show them); "
                             "without it a 1000-class model records ImageNet-1k's")
    parser.add_argument("--override", action="append", type=_parse_override, default=[],
                        metavar="KEY=VALUE",
                        help="create_model override, e.g. key_ratio=0.25 or head_split=False "
                             "(repeatable; values are Python literals)")
    args = parser.parse_args(argv)

    if checkpoint.latest_step(args.output) is not None:
        parser.error(f"{args.output} already holds a checkpoint; choose a new directory")
    try:
        state_dict = load_state_dict(args.input)
        try:
            num_classes, overrides = infer_model_settings(
                state_dict, args.model, head=args.head, num_classes=args.num_classes,
                drop_head=args.drop_head, **dict(args.override))
            variables = torch_to_flax(state_dict, args.model, head=args.head,
                                      num_classes=num_classes, drop_head=args.drop_head,
                                      **overrides)
        except ConversionError as e:
            raise ConversionError(_does_not_fit(args, state_dict, e)) from None
        class_names = _class_names(args.class_names, num_classes, drop_head=args.drop_head)
    except OSError as e:
        # The file system's errors read "[Errno 13] Permission denied: 'x.pth'" by default.
        message = f"cannot read {e.filename}: {e.strerror}" if e.filename and e.strerror else e
        parser.exit(1, f"{parser.prog}: error: {message}\n")
    except (ValueError, TypeError, ImportError) as e:  # the messages say it all
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    # The reference's evaluation input for this model (its family's mean/std, resize
    # and crop ratio at the size it is built for), which inference feeds it.
    model = create_model(args.model, num_classes=1, head=args.head, **overrides)
    meta = {"model": args.model, "head": args.head, "num_classes": num_classes,
            "overrides": overrides, "source": os.path.abspath(args.input),
            "dropped_head": args.drop_head,
            **input_preprocessing.reference_eval(model).eval_record()}
    if class_names is not None:
        meta["class_names"] = class_names
    try:
        checkpoint.save_model(args.output, variables, meta)
    except (UserError, OSError) as e:  # an output folder that cannot be written
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    count = sum(x.size for x in jax.tree.leaves(variables.get("params", {})))
    print(f"{args.input}: {len(state_dict)} tensors -> {args.output}: {args.model} "
          f"head={args.head}{' (dropped)' if args.drop_head else ''}, num_classes={num_classes}, "
          f"overrides={overrides}, {count:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
