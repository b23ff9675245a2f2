"""Classification heads: NOAH (pairwise object category attention) and the baselines.

NOAH replaces "global pooling + linear" with attention over positions, one
attention map per (head, class). The behaviour follows NOAH_SPEC.md section 1:

  x [B, L, C] --split--> keys x[..., :Ck], values x[..., Ck:]      (Ck = int(C * r))
  each part --split--> N contiguous channel groups (one per head)
  q, v = per-head 1x1 projections (with bias) to K classes     [B, L, N, K]
  a = softmax(q) over the positions L   (float32, no scaling)
  v = dropout(v)                         (training only)
  logits[b, k] = merge over heads of sum_l a * v

Parameter layout. A grouped 1x1 projection stores `kernel` as [G, Cin/G, Cout/G]
(group axis first) and `bias` as [Cout], with Cout = N*K ordered head-major
(channel h*K + k is head h, class k), so the reference's grouped Conv2d weight
[N*K, Cin/G, 1, 1] maps onto it with one reshape and one transpose.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

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
    """A 1x1 convolution with `groups` contiguous channel groups, over [B, L, Cin]."""

    features: int
    groups: int = 1
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
        y = jnp.einsum("blgc,gco->blgo", x, kernel)
        return y.reshape(*y.shape[:-2], self.features) + bias


class NOAHHead(nn.Module):
    """Non-glObal Attentive Head.

    Attributes:
      num_classes: K.
      num_heads: N, the number of POCA blocks.
      key_ratio: r; the first int(C * r) channels are keys, the rest values.
      dropout: rate applied to the values in training.
      head_split: False uses one dense projection (groups=1) instead of N groups.
      kv_split: False lets keys and values both read all C channels.
      merge: how heads are combined after the sum over positions: 'sum' (the
        reference), 'mean' or 'max' (the paper's merge ablation).
      dtype: compute dtype of the projections; the softmax, the weighted sum and
        the returned logits are float32.
      kernel_init: initialiser of both projection kernels (backbones override it).

    Call with `train` and a feature map [B, H, W, C] or tokens [B, L, C]; returns
    float32 logits [B, K]. The attention maps a [B, N, K, L] are sown into the
    `intermediates` collection as 'attention' (apply(..., mutable=['intermediates'])).
    """

    num_classes: int
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

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = _flatten_positions(x)
        batch, length, channels = x.shape
        n, k = self.num_heads, self.num_classes
        ck, _ = self.channel_split(channels)
        groups = n if self.head_split else 1
        keys, values = (x[..., :ck], x[..., ck:]) if self.kv_split else (x, x)

        def projection(name):
            return GroupedProjection(n * k, groups, dtype=self.dtype, param_dtype=self.param_dtype,
                                     kernel_init=self.kernel_init, bias_init=self.bias_init,
                                     name=name)

        q = projection("query")(keys).reshape(batch, length, n, k)
        v = projection("value")(values).reshape(batch, length, n, k)
        a = jax.nn.softmax(q.astype(jnp.float32), axis=1)  # over positions
        self.sow("intermediates", "attention", jnp.transpose(a, (0, 2, 3, 1)))
        v = nn.Dropout(self.dropout, deterministic=not train)(v)
        per_head = jnp.einsum("blnk,blnk->bnk", a, v.astype(jnp.float32))
        if self.merge == "sum":
            return per_head.sum(axis=1)
        if self.merge == "mean":
            return per_head.mean(axis=1)
        return per_head.max(axis=1)


class LinearHead(nn.Module):
    """The baseline head: optional average pooling over positions, then a linear layer.

    pool='avg' takes [B, H, W, C] or [B, L, C] and averages the positions
    (CNNs, MLP-Mixer, gMLP); pool='none' takes pooled features [B, C] (the DeiT
    class token). Returns float32 logits [B, K].
    """

    num_classes: int
    pool: str = "avg"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.01)
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train  # the baseline heads have no dropout
        if self.pool == "avg":
            x = _flatten_positions(x).mean(axis=1)
        elif self.pool != "none":
            raise ValueError(f"pool must be 'avg' or 'none', got {self.pool!r}")
        # Own parameters ('head/kernel' [C, K], 'head/bias' [K]) rather than a nested
        # Dense, so a checkpoint's head maps onto one name per tensor.
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.num_classes),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.num_classes,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return (x @ kernel + bias).astype(jnp.float32)


HEAD_KINDS = ("noah", "linear")


class Classifier(nn.Module):
    """Fields every model of the zoo shares: the class count and the head's settings.

    Backbones subclass it, compute their features and call `self.classify`, which
    builds the head named 'head' (NOAH or the baseline linear head).
    """

    num_classes: int = 1000
    head: str = "noah"
    num_heads: int = 4
    key_ratio: float = 0.5
    dropout: float = 0.1
    head_split: bool = True
    kv_split: bool = True
    merge: str = "sum"
    dtype: Any = jnp.float32

    def classify(self, features: Array, *, train: bool, pool: str, linear_init: Initializer,
                 noah_init: Optional[Initializer] = None) -> Array:
        if self.head == "noah":
            return NOAHHead(self.num_classes, self.num_heads, self.key_ratio, self.dropout,
                            self.head_split, self.kv_split, self.merge, dtype=self.dtype,
                            kernel_init=noah_init or noah_kernel_init,
                            name="head")(features, train=train)
        if self.head == "linear":
            return LinearHead(self.num_classes, pool=pool, dtype=self.dtype,
                              kernel_init=linear_init, name="head")(features)
        raise ValueError(f"head must be one of {HEAD_KINDS}, got {self.head!r}")
