"""The reference's PyTorch state_dicts <-> our Flax variables: names, layouts, checks.

`torch_to_flax` and `flax_to_torch` convert in memory; `noah_jax.convert` is the
command that reads and writes files with them. The optimiser's weight-decay rules
read the reference's parameter names from here too (`torch_parameter_keys`).

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
                NOAH   grouped 1x1 conv [N*K, Cin/G, 1, 1] -> ProjectionWeights kernel
                       [G, Cin/G, N*K/G]: reshape to [G, N*K/G, Cin/G], swap the last two.
                everything else (biases, norms, pos_embed, cls_token) unchanged.

Mismatches fail loudly: one ConversionError lists every missing key, unexpected key and
shape mismatch by name (the command prints them counted, three of each kind by name, and
the zoo models and heads whose layout the file has: `fitting_models`). Nothing is
skipped silently; `drop_head=True` drops the head's weights (and ignores them in the
state_dict) on purpose, for fine-tuning on other labels.
Values are cast to float32, the dtype of our parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from noah_jax import errors
from noah_jax.models import create_model, list_models, model_class, model_overrides
from noah_jax.models.heads import NOAHHead
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
        return "grouped"  # heads.ProjectionWeights, the only 3-D kernel of the zoo
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
        n = model.head_setting("num_heads")
        if rows % n:
            if drop_head:
                return None, overrides
            raise ConversionError(
                f"{found} has {rows} rows, not a multiple of num_heads={n}: the "
                f"checkpoint's NOAH head has another number of heads; pass num_heads=N")
        rows //= n
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
