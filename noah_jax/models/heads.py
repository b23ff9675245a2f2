"""Classification heads: NOAH (pairwise object category attention) and the baselines.

NOAH replaces "global pooling + linear" with attention over positions. The head
splits the feature map into keys and values, splits each again into N channel
groups, and feeds group h to the h-th pairwise object category attention (POCA)
block; the N blocks' class logits are merged:

  x [B, L, C] --split--> keys x[..., :Ck], values x[..., Ck:]      (Ck = int(C * r))
  each part --split--> N contiguous channel groups, group h -> POCA block h
  POCA block:  q, v = 1x1 projections (with bias) of its keys, values to K classes  [K, B, L]
               a = softmax(q) over the positions L   (float32, no scaling)
               v = dropout(v)                         (training only; `keep_mask`)
               logit[b, k] = sum_l a * v              (`attention_pool`: one pass each way;
                                                       `dropout_attention_pool` in training)
  logits = merge (sum, mean or max) over the N blocks

Parameter layout. The head stores its blocks' projections together, as the reference's
grouped 1x1 convolution does: `kernel` [G, Cin/G, N*K/G] (group axis first) and `bias`
[N*K], ordered head-major (channel h*K + k is head h, class k), so the reference's weight
[N*K, Cin/G, 1, 1] maps onto it with one reshape and one transpose. Each block sees its
slice of these tensors (`NOAHHead.head_view`).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from noah_jax.errors import ConfigError

Array = jax.Array
Initializer = Callable[..., Array]

MERGE_OPERATORS = ("sum", "mean", "max")

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


class GroupedProjection(nn.Module):
    """A 1x1 convolution with `groups` contiguous channel groups, over [B, L, Cin].

    Returns [B, L, features], or with `classes_first` [features, B, L]: the layout in
    which POCA's softmax and sum over positions read contiguous memory and, on CPU, the
    matrix products of both directions need no transposed copy of their large operand.
    """

    features: int
    groups: int = 1
    classes_first: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = noah_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        g = self.groups
        kernel = self.param("kernel", self.kernel_init,
                            (g, in_features // g, self.features // g), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        x = x.reshape(*x.shape[:-1], g, in_features // g)
        if self.classes_first:
            y = _classes_first_projection(kernel, x)
            return y.reshape(self.features, *y.shape[2:]) + bias[:, None, None]
        y = jnp.einsum("blgc,gco->blgo", x, kernel)
        return y.reshape(*y.shape[:-2], self.features) + bias


@jax.custom_vjp
def _classes_first_projection(kernel: Array, x: Array) -> Array:
    """kernel [G, c, O], x [B, L, G, c] -> [G, O, B, L], the per-group products.

    Its gradient is written out so that each of the three matrix products has the
    [G, O, B*L] array as a plain (untransposed) operand: autodiff asks for dx in x's
    layout, and XLA on CPU then copies the large array into [G, B*L, O] first.
    """
    return jax.lax.dot_general(kernel, x, (((1,), (3,)), ((0,), (2,))))


def _classes_first_projection_forward(kernel, x):
    return _classes_first_projection(kernel, x), (kernel, x)


def _classes_first_projection_backward(saved, g):
    kernel, x = saved
    # d kernel [G, O, c] = g [G, O, (B, L)] . x [(B, L), G, c]
    g_kernel = jax.lax.dot_general(g, x, (((2, 3), (0, 1)), ((0,), (2,))))
    # d x [G, c, B, L] = kernel [G, c, O] . g [G, O, B, L]
    g_x = jax.lax.dot_general(kernel, g, (((2,), (1,)), ((0,), (0,))))
    return jnp.swapaxes(g_kernel, 1, 2), jnp.transpose(g_x, (2, 3, 0, 1))


_classes_first_projection.defvjp(_classes_first_projection_forward,
                                 _classes_first_projection_backward)


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

    Call with key channels [B, L, Ck], value channels [B, L, Cv] (any widths; in NOAH,
    one channel group each) and `train`; returns float32 logits [B, K]. The attention
    map [B, K, L] is sown into `intermediates` as 'attention', and the values the sum
    weighs (float32, after dropout) as 'values' [B, K, L], so that the logit is
    exactly sum_l attention * values (noah_jax.models.explain reads both). The parameters,
    `query` and `value` with `kernel` [1, Cin, K] and `bias` [K], are laid out as
    those of a one-head NOAHHead, so a block alone is the head with num_heads=1.
    """

    num_classes: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = noah_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, keys: Array, values: Array, train: bool = False,
                 keep: Optional[Array] = None) -> Array:
        """`keep`: a boolean dropout mask [K, B, L] drawn by the caller (NOAHHead draws
        one for all its blocks at once); without it the block draws its own."""
        def projection(name):
            return GroupedProjection(self.num_classes, 1, classes_first=True, dtype=self.dtype,
                                     param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                                     bias_init=self.bias_init, name=name)

        # The block works in [K, B, L], classes first and positions last (the layout of the
        # projections' matrix product), so that no [K, B, L]-sized array is transposed in
        # either direction; only the sown maps and the [K, B] logits are.
        q = projection("query")(keys).astype(jnp.float32)    # [K, B, L]
        v = projection("value")(values)
        # (Computed only when the caller asks for the intermediates.)
        self.sow("intermediates", "attention", jnp.swapaxes(jax.nn.softmax(q, axis=-1), 0, 1))
        v = v.astype(jnp.float32)
        if not (train and self.dropout > 0):
            self.sow("intermediates", "values", jnp.swapaxes(v, 0, 1))
            return attention_pool(q, v).T
        if keep is None:
            keep = _KeepMask(self.dropout, name="Dropout_0")(v.shape)
        self.sow("intermediates", "values", jnp.swapaxes(_dropped(v, keep, self.dropout), 0, 1))
        return dropout_attention_pool(q, v, keep, self.dropout).T


@jax.custom_vjp
def attention_pool(logits: Array, values: Array) -> Array:
    """sum_l softmax(logits, over l)[..., l] * values[..., l] -> [...], for float32 inputs
    [..., L] (positions last): POCA's attention-weighted sum over positions.

    Equal to `jnp.einsum('...l,...l->...', jax.nn.softmax(logits, axis=-1), values)` up to
    float rounding, with a hand-written gradient that keeps the pass over [K, B, L] (N
    blocks of K classes at every position, the largest arrays of the head) to one in each
    direction: forward exp(logits - max) once, and its sum and value-weighted sum
    together; backward, with a = the softmax recomputed from the saved maximum and sum and
    o the output, d/dvalues = g a and d/dlogits = g a (values - o). Autodiff of the
    einsum form stores the softmax and makes a further pass for sum_l a g values.
    """
    return _attention_pool_forward(logits, values)[0]


def _attention_pool_forward(logits, values):
    peak = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    weights = jnp.exp(logits - peak)
    total = weights.sum(axis=-1)
    out = (weights * values).sum(axis=-1) / total
    return out, (logits, values, peak, total, out)


def _attention_pool_backward(saved, g):
    logits, values, peak, total, out = saved
    g_values = jnp.exp(logits - peak) * (g / total)[..., None]   # = g a
    return g_values * (values - out[..., None]), g_values


attention_pool.defvjp(_attention_pool_forward, _attention_pool_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dropout_attention_pool(logits: Array, values: Array, keep: Array, rate: float) -> Array:
    """`attention_pool(logits, dropout(values))` with inverted dropout by the boolean mask
    `keep` (kept values divided by 1 - rate, the others 0), without writing the dropped
    values out: the mask is applied inside the sum over positions and again in the
    gradient (where XLA recomputes a hashed `keep_mask` rather than storing it)."""
    return _dropout_attention_pool_forward(logits, values, keep, rate)[0]


def _dropped(values, keep, rate):
    return jax.lax.select(keep, values / (1.0 - rate), jnp.zeros_like(values))


def _dropout_attention_pool_forward(logits, values, keep, rate):
    out, (_, _, peak, total, _) = _attention_pool_forward(logits, _dropped(values, keep, rate))
    return out, (logits, values, keep, peak, total, out)


def _dropout_attention_pool_backward(rate, saved, g):
    logits, values, keep, peak, total, out = saved
    g_logits, g_dropped = _attention_pool_backward(
        (logits, _dropped(values, keep, rate), peak, total, out), g)
    return g_logits, _dropped(g_dropped, keep, rate), None


dropout_attention_pool.defvjp(_dropout_attention_pool_forward, _dropout_attention_pool_backward)

_KEEP_BITS = 16  # random bits per dropout decision


def _mix32(x: Array) -> Array:
    """A bijective 32-bit integer hash with full avalanche: C. Wellons' 'triple32'
    (hash-prospector), three rounds of xor-shift and multiply on uint32."""
    for shift, factor in ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB)):
        x = (x ^ (x >> shift)) * jnp.uint32(factor)
    return x ^ (x >> 14)


def hashed_bits(key: Array, shape: tuple[int, ...]) -> Array:
    """uint32 random words of `shape`: a keyed hash of each word's (row, column) index.

    The word at column c of row r (r the flattened index over all axes but the last) is
    mix(mix(r + s0) + mix(c + s1)), with `_mix32` as mix and the seeds s0, s1 two words
    drawn from `key` by jax.random. Each mix is a bijection, so a row's (a column's) words
    all differ, and two words collide only as two random 32-bit numbers would. A word
    depends on nothing but its index and the key, so the result is the same however the
    array is sharded (each device hashes only its own indices) and on any backend.

    This is for dropout masks, where jax.random.bits, a 20-round threefry per pair of
    words, dominated the NOAH head's time on CPU; it is not for anything that needs a
    cryptographically strong generator.
    """
    *outer, last = shape
    rows = 1
    for size in outer:
        rows *= size
    if rows >= 2**32 or last >= 2**32:
        raise ValueError(f"hashed_bits indexes rows and columns with 32 bits; shape {shape} "
                         f"has {rows} rows of {last}")
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    row = jnp.zeros(shape, jnp.uint32)
    for axis, size in enumerate(outer):      # row-major flat index over the outer axes
        row = row * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    col = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
    return _mix32(_mix32(row + seeds[0]) + _mix32(col + seeds[1]))


def keep_mask(key: Array, rate: float, shape: tuple[int, ...]) -> Array:
    """A boolean dropout mask of `shape`, each entry True with probability 1 - rate.

    Each decision compares 16 random bits with round((1 - rate) * 2**16), so the keep
    probability is exact to 2**-17, and two decisions share one 32-bit word of
    `hashed_bits`. The head's value mask has B*L*N*K entries (12.5M for DeiT-S at batch
    16); drawn with jax.random (a threefry word per pair of decisions) it took about a
    quarter of the head's training step on CPU, hashed it takes about 2%.
    """
    *outer, last = shape
    words = hashed_bits(key, (*outer, -(-last // 2)))
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16)   # [..., ceil(last/2), 2]
    halves = halves.reshape(*outer, -1)[..., :last].astype(jnp.uint32)
    return halves < jnp.uint32(round((1.0 - rate) * 2**_KEEP_BITS))


class _KeepMask(nn.Module):
    """Draws `keep_mask` of `shape` from the 'dropout' stream, for a caller that applies
    it (NOAHHead draws one mask for all its blocks)."""

    rate: float

    @nn.compact
    def __call__(self, shape: tuple[int, ...]) -> Array:
        return keep_mask(self.make_rng("dropout"), self.rate, shape)


# The name of the head axis of NOAHHead's vmap over its POCA blocks, by which an
# initialiser learns which block's slice it draws (NOAHHead._one_head_initializer).
_HEAD_AXIS = "noah_heads"


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

    Call with `train` and a feature map [B, H, W, C] or tokens [B, L, C]; returns
    float32 logits [B, K]. The attention maps a [B, N, K, L] are sown into the
    `intermediates` collection as 'attention' (apply(..., mutable=['intermediates'])),
    the blocks' values v [B, N, K, L] as 'values': block h's logits are
    sum_l a[:, h] * v[:, h], and `merge_blocks` of those is the head's output.

    The N blocks are one POCA module vmapped over the head axis, so they run as one
    batched computation. Their parameters are stored in the reference's grouped layout
    (module docstring) and initialised in it, by the initialisers' fans over the whole
    [G, Cin/G, N*K/G] kernel (fan_out N*K, fan_in Cin/G); block h sees its slice
    `head_view(stored)[h]`.
    """

    num_classes: int
    # It attends over every position, so a backbone hands it all of them (a CNN's map,
    # every token) rather than a pooled vector or a class token.
    wants_positions: ClassVar[bool] = True
    # It sows 'attention' and 'values' [B, N, K, L]; its logits merge their products.
    attention_maps: ClassVar[bool] = True
    # Its projections are 1x1 convolutions: it takes the family's `conv_init`.
    init_role: ClassVar[str] = "conv"
    settings: ClassVar[tuple[str, ...]] = ("num_heads", "key_ratio", "dropout", "head_split",
                                           "kv_split", "merge")

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
        n = self.num_heads
        if stored.ndim == 1:
            return stored.reshape(n, -1)
        _, cin, out = stored.shape
        if self.head_split:
            return stored.reshape(n, 1, cin, out)
        return stored.reshape(1, cin, n, out // n).transpose(2, 0, 1, 3)

    @nn.nowrap
    def stored_layout(self, view: Array) -> Array:
        """The inverse of `head_view`."""
        if view.ndim == 2:
            return view.reshape(-1)
        n, _, cin, k = view.shape
        if self.head_split:
            return view.reshape(n, cin, k)
        return view.transpose(1, 2, 0, 3).reshape(1, cin, n * k)

    def _one_head_initializer(self, init: Initializer) -> Initializer:
        """An initialiser of a block's slice that draws the whole stored tensor and keeps
        the block's slice, so the distribution, fans included, is the stored layout's.

        The params key is not split over the heads: the draw is one (unbatched) and the
        blocks take disjoint slices of it.
        """
        n = self.num_heads

        def init_one_head(key, shape, dtype=jnp.float32):
            if len(shape) == 1:                       # bias [K]
                stored_shape = (n * shape[0],)
            elif self.head_split:                     # kernel [1, Cin/N, K]
                stored_shape = (n, *shape[1:])
            else:                                     # kernel [1, Cin, K]
                stored_shape = (1, shape[1], n * shape[2])
            stored = init(key, stored_shape, dtype)
            return self.head_view(stored)[jax.lax.axis_index(_HEAD_AXIS)]
        return init_one_head

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = _flatten_positions(x)
        batch, length, channels = x.shape
        n, k = self.num_heads, self.num_classes
        ck, cv = self.channel_split(channels)
        keys, values = (x[..., :ck], x[..., ck:]) if self.kv_split else (x, x)
        if self.head_split:  # block h reads channel group h: [B, L, N, C/N], head axis 2
            keys = keys.reshape(batch, length, n, ck // n)
            values = values.reshape(batch, length, n, cv // n)
            head_axis = 2
        else:                # every block reads all channels
            head_axis = None

        # One POCA module vmapped over the head axis: block h gets slice h of the inputs
        # (with head_split), of every parameter and of the dropout key. map_variables shows
        # the blocks their slices of the stored tensors, stacked (head_view), and stores
        # what init creates in the stored layout. The params key is not split: the
        # initialisers draw each stored tensor once (_one_head_initializer).
        # Dropout: one mask for all blocks, [N, K, B, L] (`keep_mask`, from the key of the
        # nn.Dropout this submodule's name once belonged to); block h applies slice h.
        keep = None
        if train and self.dropout > 0:
            keep = _KeepMask(self.dropout, name="Dropout_0")((n, k, batch, length))
        vmapped = nn.vmap(POCA, in_axes=(head_axis, head_axis, None,
                                         0 if keep is not None else None), out_axes=1,
                          variable_axes={"params": 0, "intermediates": 1},
                          split_rngs={"params": False, "dropout": True}, axis_size=n,
                          axis_name=_HEAD_AXIS)
        mapped = nn.map_variables(
            vmapped, "params", trans_in_fn=lambda p: jax.tree.map(self.head_view, p),
            trans_out_fn=lambda p: jax.tree.map(self.stored_layout, p),
            mutable=self.is_initializing())
        blocks = mapped(k, self.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=self._one_head_initializer(self.kernel_init),
                        bias_init=self._one_head_initializer(self.bias_init))
        # The blocks' variables live in this module's scope: 'query', 'value' and the
        # sown 'attention' and 'values' [B, N, K, L] (axis 1 of the stacked [B, K, L]
        # maps) are ours.
        nn.share_scope(self, blocks)
        per_head = blocks(keys, values, train, keep)  # [B, N, K]
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
