"""NOAH's POCA blocks computed for speed on CPU, and the dropout mask both paths draw.

`poca_blocks` returns what `heads.poca_blocks` (the readable einsum form) returns, from
the same parameters in the same stored layout; `NOAHHead(implementation="auto")` uses it
on CPU. It differs only in how XLA is asked to compute, never in what:

  vmap over the N blocks, classes first
      Each block works in a [K, B, L] layout (classes first, positions last), the layout
      of its projections' matrix product, so the softmax and the sum over positions read
      contiguous memory and no [N, K, B, L]-sized array is transposed in either direction
      (XLA on CPU otherwise copies the head's [B, L, N, K] arrays into [N, K, B*L] for
      its products, several times a step). Only the sown maps and the [B, N, K] logits
      are transposed.
  `_classes_first_projection`
      The 1x1 projection with a hand-written gradient in which each of the three matrix
      products takes the large [O, B*L] array as a plain (untransposed) operand. The
      products are the autodiff ones; only their operand layout is chosen.
  `attention_pool`
      sum_l softmax(q)_l v_l with a hand-written gradient that makes one pass over
      [K, B, L] each way and stores no softmax. Exact algebra: d/dv = g a and
      d/dq = g a (v - out), with a recomputed from the saved maximum and sum.
  `dropout_attention_pool`
      The same pool of the dropped values, applying the boolean mask inside the sum and
      again in the gradient rather than writing the dropped values out.

The dropout mask, `keep_mask`, is a keyed integer hash of each element's index
(`hashed_bits`) rather than jax.random's threefry, which on CPU cost a large share of the
head's step. Both paths draw it, from the same key in the same [N, K, B, L] layout, so
they drop the same values and train alike on every backend.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def poca_blocks(keys: Array, values: Array, query: tuple[Array, Array],
                value: tuple[Array, Array], num_heads: int, keep: Optional[Array] = None,
                rate: float = 0.0, dtype: Any = jnp.float32) -> tuple[Array, Array, Array]:
    """`heads.poca_blocks`, computed block by block in the classes-first layout.

    keys [B, L, Ck], values [B, L, Cv]; query, value: (kernel [G, Cin/G, N*K/G], bias
    [N*K]) as stored; keep: the [N, K, B, L] dropout mask or None. Returns the blocks'
    logits [B, N, K] and the attention maps and the (dropped) values, [B, N, K, L].
    """
    split = query[0].shape[0] == num_heads          # head_split (or N = 1, where both agree)
    if split:                                       # block h reads channel group h
        keys = keys.reshape(*keys.shape[:2], num_heads, -1)
        values = values.reshape(*values.shape[:2], num_heads, -1)
    block = functools.partial(_poca_block, rate=rate, dtype=dtype)
    heads = 2 if split else None
    weights = [per_block(t, num_heads, split) for t in (*query, *value)]
    return jax.vmap(block, in_axes=(heads, heads, 0, 0, 0, 0, None if keep is None else 0),
                    out_axes=1)(keys, values, *weights, keep)


def per_block(stored: Array, num_heads: int, head_split: bool) -> Array:
    """A stored projection tensor -> its N blocks' slices on a leading axis
    (`heads.NOAHHead.head_view`): bias [N*K] -> [N, K]; kernel [G, Cin/G, N*K/G] ->
    [N, 1, Cin/G, K], with head_split (G = N) a reshape, without it (G = 1) block h's
    columns h*K .. h*K + K - 1 moved out."""
    if stored.ndim == 1:
        return stored.reshape(num_heads, -1)
    _, cin, out = stored.shape
    if head_split:
        return stored.reshape(num_heads, 1, cin, out)
    return stored.reshape(1, cin, num_heads, out // num_heads).transpose(2, 0, 1, 3)


def _poca_block(keys, values, query_kernel, query_bias, value_kernel, value_bias, keep, *,
                rate, dtype):
    """One block: keys [B, L, Ck], values [B, L, Cv], kernels [1, Cin, K], biases [K],
    keep [K, B, L] or None -> logits [B, K], attention and values [B, K, L]."""
    q = _project(keys, query_kernel, query_bias, dtype).astype(jnp.float32)     # [K, B, L]
    v = _project(values, value_kernel, value_bias, dtype).astype(jnp.float32)
    attention = jnp.swapaxes(jax.nn.softmax(q, axis=-1), 0, 1)
    if keep is None:
        return attention_pool(q, v).T, attention, jnp.swapaxes(v, 0, 1)
    return (dropout_attention_pool(q, v, keep, rate).T, attention,
            jnp.swapaxes(dropped(v, keep, rate), 0, 1))


def _project(x, kernel, bias, dtype):
    """x [B, L, Cin], kernel [1, Cin, K], bias [K] -> [K, B, L]."""
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
    y = _classes_first_projection(kernel, x.reshape(*x.shape[:-1], 1, x.shape[-1]))
    return y.reshape(y.shape[1:]) + bias[:, None, None]


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


@jax.custom_vjp
def attention_pool(logits: Array, values: Array) -> Array:
    """sum_l softmax(logits, over l)[..., l] * values[..., l] -> [...], for float32 inputs
    [..., L] (positions last): POCA's attention-weighted sum over positions.

    Equal to `jnp.einsum('...l,...l->...', jax.nn.softmax(logits, axis=-1), values)` up to
    float rounding, with a hand-written gradient that keeps the pass over [K, B, L] to one
    in each direction: forward exp(logits - max) once, and its sum and value-weighted sum
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
    """`attention_pool(logits, dropped(values, keep, rate))` without writing the dropped
    values out: the mask is applied inside the sum over positions and again in the
    gradient (where XLA recomputes the hashed `keep_mask` rather than storing it)."""
    return _dropout_attention_pool_forward(logits, values, keep, rate)[0]


def dropped(values: Array, keep: Array, rate: float) -> Array:
    """Inverted dropout by the boolean mask `keep`: kept values / (1 - rate), others 0."""
    return jax.lax.select(keep, values / (1.0 - rate), jnp.zeros_like(values))


def _dropout_attention_pool_forward(logits, values, keep, rate):
    out, (_, _, peak, total, _) = _attention_pool_forward(logits, dropped(values, keep, rate))
    return out, (logits, values, keep, peak, total, out)


def _dropout_attention_pool_backward(rate, saved, g):
    logits, values, keep, peak, total, out = saved
    g_logits, g_dropped = _attention_pool_backward(
        (logits, dropped(values, keep, rate), peak, total, out), g)
    return g_logits, dropped(g_dropped, keep, rate), None


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

    This is for dropout masks, where jax.random.bits (a 20-round threefry per pair of
    words) dominated the NOAH head's time on CPU; it is not for anything that needs a
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
    `hashed_bits`. A leading axis of size 1 does not change the mask (the row index is
    flattened over the leading axes).
    """
    *outer, last = shape
    words = hashed_bits(key, (*outer, -(-last // 2)))
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16)   # [..., ceil(last/2), 2]
    halves = halves.reshape(*outer, -1)[..., :last].astype(jnp.uint32)
    return halves < jnp.uint32(round((1.0 - rate) * 2**_KEEP_BITS))
