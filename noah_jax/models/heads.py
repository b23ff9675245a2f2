"""Classification heads: NOAH (pairwise object category attention) and the baselines.

NOAH replaces "global pooling + linear" with attention over positions. The head
splits the feature map into keys and values, splits each again into N channel
groups, and feeds group h to the h-th pairwise object category attention (POCA)
block; the N blocks' class logits are merged:

  x [B, L, C] --split--> keys x[..., :Ck], values x[..., Ck:]      (Ck = int(C * r))
  each part --split--> N contiguous channel groups, group h -> POCA block h
  POCA block h: q, v = 1x1 projections (with bias) of its keys, values to K classes
               a = softmax(q) over the positions L   (float32, no scaling)
               v = dropout(v)                         (training only)
               logit[b, k] = sum_l a[b, l, k] * v[b, l, k]
  logits = merge (sum, mean or max) over the N blocks

`poca_blocks` is this, in einsums. The parameters are stored as the reference's grouped
1x1 convolution stores them: `kernel` [G, Cin/G, N*K/G] (G = N groups, or 1 without
head_split) and `bias` [N*K], ordered head-major (output h*K + k is head h, class k), so
the reference's weight [N*K, Cin/G, 1, 1] maps onto it with one reshape and one transpose.

On CPU the head computes the same blocks by `noah_cpu.poca_blocks`, which is faster there
(`NOAHHead.implementation`); both draw the same dropout mask (`noah_cpu.keep_mask`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from noah_jax.errors import ConfigError
from noah_jax.models import noah_cpu

Array = jax.Array
Initializer = Callable[..., Array]

MERGE_OPERATORS = ("sum", "mean", "max")
IMPLEMENTATIONS = ("auto", "readable", "cpu")

# Kaiming-normal with fan_out = N*K, as the reference initialises its head.
# On a [G, Cin/G, N*K/G] kernel, variance_scaling's fan_out is the last axis
# times the "receptive field" (all axes but the last two), i.e. N*K/G * G = N*K.
noah_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# LeCun-normal with fan_in = Cin/G (the per-group input width), as the
# reference's Mixer/gMLP re-initialise every convolution.
noah_lecun_kernel_init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))


def _flatten_positions(x: Array) -> Array:
    """[B, H, W, C] or [B, L, C] -> [B, L, C]."""
    if x.ndim == 3:
        return x
    if x.ndim == 4:
        return x.reshape(x.shape[0], -1, x.shape[-1])
    raise ValueError(
        f"the head takes a channels-last feature map [B, H, W, C] or tokens [B, L, C]; "
        f"got an input of shape {x.shape}")


def poca_blocks(keys: Array, values: Array, query: tuple[Array, Array],
                value: tuple[Array, Array], num_heads: int, keep: Optional[Array] = None,
                rate: float = 0.0, dtype: Any = jnp.float32) -> tuple[Array, Array, Array]:
    """NOAH's N POCA blocks at once.

    keys [B, L, Ck], values [B, L, Cv]; query, value: (kernel [G, Cin/G, N*K/G], bias
    [N*K]); keep: the dropout mask [N, K, B, L] (True: kept) or None. Returns the blocks'
    logits [B, N, K], the attention maps a [B, N, K, L] and the values v [B, N, K, L]
    (float32, after dropout), so that the logits are sum_l a * v.
    """
    def project(x, kernel, bias):  # grouped 1x1 conv: [B, L, Cin] -> [B, L, N, K]
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
        groups = kernel.shape[0]
        x = x.reshape(*x.shape[:2], groups, -1)                      # [B, L, G, Cin/G]
        y = jnp.einsum("blgc,gco->blgo", x, kernel).reshape(*x.shape[:2], -1) + bias
        return y.reshape(*x.shape[:2], num_heads, -1)

    q = project(keys, *query).astype(jnp.float32)       # attention logits [B, L, N, K]
    v = project(values, *value).astype(jnp.float32)     # values [B, L, N, K]
    a = jax.nn.softmax(q, axis=1)                       # over the positions
    if keep is not None:                                # inverted dropout on the values
        v = jnp.where(keep.transpose(2, 3, 0, 1), v / (1.0 - rate), 0.0)
    logits = jnp.einsum("blnk,blnk->bnk", a, v)
    return logits, a.transpose(0, 2, 3, 1), v.transpose(0, 2, 3, 1)


def _blocks_of(implementation: str) -> Callable[..., tuple[Array, Array, Array]]:
    """The POCA blocks' computation an `implementation` names: 'readable'
    (`poca_blocks`), 'cpu' (`noah_cpu.poca_blocks`), or 'auto': the backend's."""
    if implementation == "auto":
        implementation = "cpu" if jax.default_backend() == "cpu" else "readable"
    if implementation == "readable":
        return poca_blocks
    if implementation == "cpu":
        return noah_cpu.poca_blocks
    raise ConfigError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


class ProjectionWeights(nn.Module):
    """The parameters of a 1x1 convolution over `groups` contiguous channel groups, as the
    reference stores them: `kernel` [G, Cin/G, features/G] and `bias` [features]."""

    features: int
    groups: int = 1
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = noah_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array, Array]:
        g = self.groups
        kernel = self.param("kernel", self.kernel_init,
                            (g, in_features // g, self.features // g), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        return kernel, bias


class _KeepMask(nn.Module):
    """Draws `noah_cpu.keep_mask` of `shape` from the 'dropout' stream. Named 'Dropout_0'
    (the nn.Dropout whose key the mask has always been drawn from), so the masks, and
    training, repeat across versions."""

    rate: float

    @nn.compact
    def __call__(self, shape: tuple[int, ...]) -> Array:
        return noah_cpu.keep_mask(self.make_rng("dropout"), self.rate, shape)


class POCA(nn.Module):
    """One pairwise object category attention (POCA) block.

    The block learns, for every object category k, where to look: a 1x1 projection of
    its key channels gives one attention logit per (position, class), and the softmax
    over the L positions turns it into the class's attention map a[:, k]. A second 1x1
    projection of its value channels gives the class's value map v[:, k], and the
    block's logit for class k is the attention-weighted sum over positions,
    sum_l a[l, k] * v[l, k]. Unlike global pooling, each class pools its own positions.

    Attributes:
      num_classes: K.
      dropout: rate applied to the values in training.
      dtype: compute dtype of the projections; the softmax, the weighted sum and the
        returned logits are float32.
      kernel_init, bias_init: initialisers of both projections.
      implementation: as NOAHHead's.

    Call with key channels [B, L, Ck], value channels [B, L, Cv] (any widths; in NOAH,
    one channel group each) and `train`; returns float32 logits [B, K]. The attention
    map [B, K, L] is sown into `intermediates` as 'attention', and the values the sum
    weighs (float32, after dropout) as 'values' [B, K, L]. The parameters, `query` and
    `value` with `kernel` [1, Cin, K] and `bias` [K], are those of a one-head NOAHHead,
    so a block alone is the head with num_heads=1.
    """

    num_classes: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = noah_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    implementation: str = "auto"

    @nn.compact
    def __call__(self, keys: Array, values: Array, train: bool = False) -> Array:
        k = self.num_classes
        weights = dict(param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                       bias_init=self.bias_init)
        query = ProjectionWeights(k, **weights, name="query")(keys.shape[-1])
        value = ProjectionWeights(k, **weights, name="value")(values.shape[-1])
        keep = None
        if train and self.dropout > 0:
            keep = _KeepMask(self.dropout, name="Dropout_0")((1, k, *keys.shape[:2]))
        logits, attention, values = _blocks_of(self.implementation)(
            keys, values, query, value, 1, keep, self.dropout, self.dtype)
        self.sow("intermediates", "attention", attention[:, 0])
        self.sow("intermediates", "values", values[:, 0])
        return logits[:, 0]


class NOAHHead(nn.Module):
    """Non-glObal Attentive Head: N POCA blocks over channel groups, merged.

    Attributes:
      num_classes: K.
      num_heads: N, the number of POCA blocks.
      key_ratio: r; the first int(C * r) channels are keys, the rest values.
      dropout: rate applied to the values in training.
      head_split: False gives every block all key (value) channels instead of one of N
        groups: the ablation with one dense projection (groups=1) to N*K channels, of
        which block h owns the columns h*K .. h*K + K - 1.
      kv_split: False lets keys and values both read all C channels.
      merge: how heads are combined after the sum over positions: 'sum' (the
        reference), 'mean' or 'max' (the paper's merge ablation).
      dtype: compute dtype of the projections; the softmax, the weighted sum and
        the returned logits are float32.
      kernel_init: initialiser of both projection kernels (backbones override it).
      implementation: how the blocks are computed, never what: 'readable'
        (`poca_blocks`, einsums), 'cpu' (`noah_cpu.poca_blocks`, tuned for XLA on CPU),
        or 'auto': 'cpu' on a CPU backend, 'readable' on accelerators. Parameters,
        initial values and dropout masks are the same for all.

    Call with `train` and a feature map [B, H, W, C] or tokens [B, L, C]; returns
    float32 logits [B, K]. The attention maps a [B, N, K, L] are sown into the
    `intermediates` collection as 'attention' (apply(..., mutable=['intermediates'])),
    the blocks' values v [B, N, K, L] as 'values': block h's logits are
    sum_l a[:, h] * v[:, h], and `merge_blocks` of those is the head's output.
    The parameters are `query` and `value`, each the grouped layout of the module
    docstring, initialised as whole tensors (fan_out N*K, fan_in Cin/G); block h's
    slice is `head_view(stored)[h]`.
    """

    num_classes: int
    # It attends over every position, so a backbone hands it all of them (a CNN's map,
    # every token) rather than a pooled vector or a class token.
    wants_positions: ClassVar[bool] = True
    # It sows 'attention' and 'values' [B, N, K, L]; its logits merge their products.
    attention_maps: ClassVar[bool] = True
    # Its projections are 1x1 convolutions: it takes the family's `conv_init`.
    init_role: ClassVar[str] = "conv"
    # `implementation` changes how the blocks are computed, never what (noah_cpu).
    settings: ClassVar[tuple[str, ...]] = ("num_heads", "key_ratio", "dropout", "head_split",
                                           "kv_split", "merge", "implementation")

    num_heads: int = 4
    key_ratio: float = 0.5
    dropout: float = 0.0
    head_split: bool = True
    kv_split: bool = True
    merge: str = "sum"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = noah_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    implementation: str = "auto"

    def channel_split(self, channels: int) -> tuple[int, int]:
        """(Ck, Cv) for an input of `channels` channels; raises ValueError if invalid."""
        n = self.num_heads
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_heads must be a positive integer, got {n!r}")
        if not 0.0 < self.key_ratio < 1.0:
            raise ValueError(f"key_ratio must lie strictly between 0 and 1, got {self.key_ratio}")
        if self.merge not in MERGE_OPERATORS:
            raise ValueError(f"merge must be one of {MERGE_OPERATORS}, got {self.merge!r}")
        if self.kv_split:
            ck = int(channels * self.key_ratio)
            cv = channels - ck
        else:
            ck = cv = channels
        if ck == 0 or cv == 0 or ck % n or cv % n:
            raise ValueError(
                f"NOAH head: C={channels} channels with key_ratio={self.key_ratio} give "
                f"Ck={ck} key and Cv={cv} value channels; both must be positive multiples of "
                f"num_heads={n}. Choose num_heads dividing both, or another key_ratio.")
        return ck, cv

    @nn.nowrap
    def head_view(self, stored: Array) -> Array:
        """A stored projection tensor -> its N blocks' slices, stacked on a leading axis.

        bias [N*K] -> [N, K]; kernel [G, Cin/G, N*K/G] -> [N, 1, Cin/G, K], a block's
        POCA kernel. With head_split the group axis is the head axis and both are
        reshapes; without it (G=1) block h's columns h*K .. h*K + K - 1 are moved out.
        """
        return noah_cpu.per_block(stored, self.num_heads, self.head_split)

    @nn.nowrap
    def stored_layout(self, view: Array) -> Array:
        """The inverse of `head_view`."""
        if view.ndim == 2:
            return view.reshape(-1)
        n, _, cin, k = view.shape
        if self.head_split:
            return view.reshape(n, cin, k)
        return view.transpose(1, 2, 0, 3).reshape(1, cin, n * k)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = _flatten_positions(x)
        batch, length, channels = x.shape
        n, k = self.num_heads, self.num_classes
        ck, cv = self.channel_split(channels)
        blocks = _blocks_of(self.implementation)
        keys, values = (x[..., :ck], x[..., ck:]) if self.kv_split else (x, x)
        weights = dict(groups=n if self.head_split else 1, param_dtype=self.param_dtype,
                       kernel_init=self.kernel_init, bias_init=self.bias_init)
        query = ProjectionWeights(n * k, **weights, name="query")(ck)
        value = ProjectionWeights(n * k, **weights, name="value")(cv)
        keep = None
        if train and self.dropout > 0:  # one mask for all blocks
            keep = _KeepMask(self.dropout, name="Dropout_0")((n, k, batch, length))
        per_head, attention, values = blocks(keys, values, query, value, n, keep,
                                             self.dropout, self.dtype)
        self.sow("intermediates", "attention", attention)
        self.sow("intermediates", "values", values)
        return merge_blocks(per_head, self.merge)


def merge_blocks(per_head: Array, merge: str) -> Array:
    """The N blocks' logits [..., N, K] -> the head's logits [..., K], as NOAHHead merges
    them ('sum', 'mean' or 'max' over the head axis)."""
    if merge == "sum":
        return per_head.sum(axis=-2)
    if merge == "mean":
        return per_head.mean(axis=-2)
    if merge == "max":
        return per_head.max(axis=-2)
    raise ValueError(f"merge must be one of {MERGE_OPERATORS}, got {merge!r}")


class LinearHead(nn.Module):
    """The baseline head: average pooling over positions if there are any, then a linear
    layer.

    pool='avg' takes [B, H, W, C] or [B, L, C] and averages the positions (CNNs,
    MLP-Mixer, gMLP), and takes features pooled already, [B, C], as they are (the DeiT
    class token); pool='none' takes [B, C] only. Returns float32 logits [B, K].
    """

    # One vector per image: it pools positions itself or is handed a class token.
    wants_positions: ClassVar[bool] = False
    attention_maps: ClassVar[bool] = False
    # A linear classifier: it takes the family's `dense_init`.
    init_role: ClassVar[str] = "dense"
    settings: ClassVar[tuple[str, ...]] = ()

    num_classes: int
    pool: str = "avg"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.01)
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train  # the baseline heads have no dropout
        if self.pool not in ("avg", "none"):
            raise ValueError(f"pool must be 'avg' or 'none', got {self.pool!r}")
        if self.pool == "avg" and x.ndim != 2:
            x = _flatten_positions(x).mean(axis=1)
        # Own parameters ('head/kernel' [C, K], 'head/bias' [K]) rather than a nested
        # Dense, so a checkpoint's head maps onto one name per tensor.
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.num_classes),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.num_classes,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return (x @ kernel + bias).astype(jnp.float32)


# ---------------------------------------------------------------------------------------
# The head registry: the heads a model can end with, by the name models and configs use
# (`create_model(..., head=...)`).
#
# A head is a linen module built as `cls(num_classes, **settings, dtype=..., name='head',
# [kernel_init=...])` and called as `head(features, train=train)`, returning float32
# logits [B, K]. Its class attributes say what other code may ask of it:
#   settings:        its fields a user may set (create_model overrides), each with a
#                    default;
#   wants_positions: True if it reads every position ([B, h, w, C] or [B, L, C]), False
#                    if one vector per image will do (backbones then may pool, or hand it
#                    a class token [B, C]);
#   attention_maps:  True if it sows 'attention' and 'values' [B, N, K, L] into
#                    'intermediates' and has a `merge` ('sum', 'mean' or 'max') such that
#                    its logits are merge_blocks(sum_l attention * values, merge)
#                    (noah_jax.models.explain, the attention figures);
#   init_role:       which of the family's initialisers its kernel_init takes: 'dense'
#                    (a linear classifier's) or 'conv' (1x1 convolutions'); see
#                    `Classifier.classify`.
# ---------------------------------------------------------------------------------------

INIT_ROLES = ("dense", "conv")

_HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str, cls: Optional[type[nn.Module]] = None):
    """Adds the head class `cls` under `name` (new); returns `cls`. Without `cls`, a
    class decorator: `@register_head('toy')`. See the registry's comment for what the
    class declares."""
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _HEADS:
            raise ValueError(f"register_head: head {name!r} is already registered")
        _check_head(name, cls)
        _HEADS[name] = cls
        return cls
    return add if cls is None else add(cls)


def unregister_head(name: str) -> None:
    """Removes a head added by `register_head` (tests clean up with it)."""
    _HEADS.pop(name, None)


def registered_heads() -> tuple[str, ...]:
    """The names `create_model(..., head=...)` accepts, in registration order."""
    return tuple(_HEADS)


def head_class(name: str) -> type[nn.Module]:
    """The head class registered as `name`; ConfigError naming the registered heads."""
    if name not in _HEADS:
        raise ConfigError(f"unknown head {name!r}: head must be one of the registered heads "
                          f"({', '.join(_HEADS)})")
    return _HEADS[name]


def head_setting_defaults(cls: type[nn.Module]) -> dict[str, Any]:
    """{setting: default} of a head class's `settings`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return {name: fields[name].default for name in cls.settings}


def head_setting_hints(cls: type[nn.Module]) -> dict[str, Any]:
    """{setting: its type annotation} of a head class's `settings`."""
    hints = typing.get_type_hints(cls)
    return {name: hints.get(name, object) for name in cls.settings}


def _check_head(name: str, cls: type[nn.Module]) -> None:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_head({name!r}): {cls!r} is not a linen Module class")
    for attribute, kind in (("settings", tuple), ("wants_positions", bool),
                            ("attention_maps", bool), ("init_role", str)):
        if not isinstance(getattr(cls, attribute, None), kind):
            raise TypeError(f"register_head({name!r}): {cls.__name__} must declare "
                            f"{attribute}: ClassVar[{kind.__name__}]")
    if cls.init_role not in INIT_ROLES:
        raise TypeError(f"register_head({name!r}): {cls.__name__}.init_role must be one of "
                        f"{INIT_ROLES}, got {cls.init_role!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for setting in cls.settings:
        field = fields.get(setting)
        if field is None or field.default is dataclasses.MISSING:
            raise TypeError(f"register_head({name!r}): setting {setting!r} must be a field "
                            f"of {cls.__name__} with a default")


register_head("noah", NOAHHead)
register_head("linear", LinearHead)


class Classifier(nn.Module):
    """Fields every model of the zoo shares: the class count and the head.

    Backbones subclass it, compute their features and call `self.classify`, which
    builds the registered head named by `head` as the submodule 'head'.

    Attributes:
      num_classes: K.
      head: a registered head's name (`registered_heads()`).
      head_settings: (setting, value) pairs of that head's `settings`, sorted by name;
        the others keep the head's defaults. `create_model` fills it from its overrides
        and the family's VARIANTS table (which states the reference's NOAH settings).
      dtype: compute dtype.
    """

    num_classes: int = 1000
    head: str = "noah"
    head_settings: tuple[tuple[str, Any], ...] = ()
    dtype: Any = jnp.float32

    @property
    def head_class(self) -> type[nn.Module]:
        """The registered class of `head`; ask it what the head can do (`wants_positions`,
        `attention_maps`), never the head's name."""
        return head_class(self.head)

    @property
    def head_wants_positions(self) -> bool:
        """Whether the head reads every position (NOAH) rather than one vector per image
        (the baseline: pooled features, or a class token). Backbones ask this, never the
        head's name: e.g. DeiT adds a class token only when it is False."""
        return self.head_class.wants_positions

    def head_config(self) -> dict[str, Any]:
        """{setting: value} of every setting of the head, its defaults included."""
        return {**head_setting_defaults(self.head_class), **dict(self.head_settings)}

    def head_setting(self, name: str) -> Any:
        """One setting of the head (e.g. 'num_heads' of a NOAH head)."""
        config = self.head_config()
        if name not in config:
            raise KeyError(f"head {self.head!r} has no setting {name!r}; its settings: "
                           f"{sorted(config)}")
        return config[name]

    def no_weight_decay(self) -> frozenset[str]:
        """The reference model's `no_weight_decay()`: the state_dict keys that timm's
        optimiser factory leaves undecayed besides vectors and biases (the 'timm'
        decay rule of noah_jax.train.optim). None here; DeiT and PVT name theirs."""
        return frozenset()

    def adapt_checkpoint(self, variables: dict, target: dict) -> dict:
        """A family's loading quirks: stored `variables` ({'params', 'batch_stats'}, as
        the checkpoint holds them) made to fit `target` (the model's variables or their
        eval_shape) where the family knows how, e.g. DeiT's position embeddings of
        another image size. Returns `variables` itself when nothing needs adapting,
        and leaves what it cannot adapt for the loading check to report. Written with
        jax.numpy: the check runs it on shapes (`jax.eval_shape`). None here."""
        del target
        return variables

    def classify(self, features: Array, *, train: bool, dense_init: Optional[Initializer] = None,
                 conv_init: Optional[Initializer] = None) -> Array:
        """Builds the head 'head' on `features` ([B, h, w, C] or [B, L, C]; for a head that
        does not want positions also pooled features [B, C]).

        `dense_init` and `conv_init` are the initialisers the family's reference gives a
        linear classifier and a 1x1 convolution of its head; the head takes the one of its
        `init_role`, or keeps its own default where the family gives None.
        """
        cls = self.head_class
        init = {"dense": dense_init, "conv": conv_init}[cls.init_role]
        kwargs = dict(self.head_settings)
        if init is not None:
            kwargs["kernel_init"] = init
        return cls(self.num_classes, dtype=self.dtype, name="head", **kwargs)(features,
                                                                             train=train)
