"""Layers several families share: PyTorch-initialised convolutions and BatchNorm (the
CNNs), timm's Linear, MLP and patch-embedding init (DeiT and PVT), and the resize of
learned position embeddings that lets DeiT and PVT load a checkpoint trained at another
image size.

`conv` pads as PyTorch does ((k-1)//2 on each side, where XLA's 'SAME' would pad an
even input (0, 1)) and starts from the reference's Kaiming-normal (fan_out) init;
`batch_norm` is PyTorch's BatchNorm2d (eps, momentum, the unbiased running variance)
with the statistics of groups of the reference's per-GPU batch (`BatchNorm`).

Depthwise convolutions (one filter per channel: MobileNets, ShuffleNetV2) are a
`DepthwiseConv`, with nn.Conv's parameters. Its `formulation` says how it computes:
'shifted' (k*k shifted multiply-adds, which XLA fuses into one loop: on CPU a
MobileNet's depthwise layers train several times faster so, benchmarks/depthwise.py),
'grouped' (XLA's grouped convolution, the accelerators' fast path) or 'auto' (shifted
on CPU, grouped elsewhere). The families with depthwise layers take it as their
`depthwise` setting (`create_model(..., depthwise='grouped')`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from noah_jax.errors import ConfigError

# Kaiming-normal, fan_out, ReLU gain: the reference CNNs' init of every conv.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Conv2d / Linear weight init, kaiming_uniform with a=sqrt(5), is
# U(+-1/sqrt(fan_in)), i.e. variance 1/(3 fan_in): what a model that does not
# re-initialise starts from (ShuffleNetV2, patch embeddings).
torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm2d over channels-last maps, with the statistics of groups.

    Parameters and statistics are nn.BatchNorm's (`scale`, `bias`; batch_stats `mean`,
    `var`), so checkpoints and the conversion tables are unchanged. Two things differ
    from nn.BatchNorm, both so that training matches the reference:

    - `group_size`: in training, the batch is cut into consecutive groups of this many
      examples and each group is normalised by its own mean and variance, as the
      reference's DistributedDataParallel training without SyncBN normalises each GPU's
      share of the batch (32 images for most recipes). 0, or a batch no larger than it,
      uses the whole batch. Consecutive examples sit on one device (the batch is split
      over the mesh's data axis in order), so a group never spans devices when the
      per-device batch is a multiple of it.
    - The running variance moves by the unbiased batch variance (n / (n - 1), n the
      values per channel of a group), as PyTorch's does; nn.BatchNorm uses the biased
      one. With several groups, the running statistics move by the groups' mean (the
      reference's are the first GPU's own, broadcast to the others by DDP: the mean is
      the same estimate with less noise).

    Statistics are computed in float32 in two passes, whatever the compute dtype.
    """

    use_running_average: bool
    group_size: int = 0
    momentum: float = 0.9   # Flax's convention: PyTorch's momentum 0.1
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        if self.use_running_average:
            # nn.BatchNorm's order of operations, so float32 logits are unchanged.
            x, mean, mul, bias = nn.dtypes.promote_dtype(
                x, ra_mean.value, jax.lax.rsqrt(ra_var.value + self.epsilon) * scale, bias,
                dtype=self.dtype)
            return (x - mean) * mul + bias

        batch = x.shape[0]
        group = self.group_size if 0 < self.group_size < batch else batch
        if batch % group:
            raise ConfigError(f"BatchNorm groups of {group} examples do not divide the "
                              f"batch of {batch}: make the (per micro-batch) batch size a "
                              f"multiple of the model's bn_group_size, or set it to 0")
        xg = x.astype(jnp.float32).reshape(batch // group, group, *x.shape[1:])
        axes = tuple(range(1, xg.ndim - 1))
        mean = xg.mean(axes, keepdims=True)
        var = jnp.square(xg - mean).mean(axes, keepdims=True)
        y = (xg - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        if not self.is_initializing():
            count = xg[0, ..., 0].size  # values per channel in one group
            group_mean = mean.reshape(-1, channels).mean(0)
            group_var = var.reshape(-1, channels).mean(0) * (count / max(count - 1, 1))
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * group_mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * group_var
        return y.reshape(x.shape).astype(self.dtype)


def batch_norm(train: bool, dtype: Any, name: str, group_size: int = 0) -> BatchNorm:
    """PyTorch's BatchNorm2d defaults: eps 1e-5, momentum 0.1 (Flax's 0.9); in training,
    statistics over groups of `group_size` examples (0 = the whole batch)."""
    return BatchNorm(use_running_average=not train, group_size=group_size, dtype=dtype,
                     name=name)


def conv(features: int, kernel: int, stride: int, dtype: Any, name: str, groups: int = 1,
         use_bias: bool = False, kernel_init: Any = conv_init,
         depthwise: str = "auto") -> nn.Module:
    """A square conv, PyTorch's padding (k-1)//2; `groups` = features is depthwise (its
    input must have `features` channels too), computed in the `depthwise` formulation
    (`DepthwiseConv`)."""
    pad = (kernel - 1) // 2
    if groups == features and groups > 1:
        return DepthwiseConv(features, kernel, stride, use_bias=use_bias, dtype=dtype,
                             kernel_init=kernel_init, formulation=depthwise, name=name)
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                   kernel_init=kernel_init, name=name)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """PyTorch's MaxPool2d(3, stride 2, padding 1) over [B, H, W, C] (the ResNet and
    ShuffleNetV2 stems): nn.max_pool of the input padded with -inf, which is what
    nn.max_pool with padding ((1, 1), (1, 1)) computes, gradients included. Written so
    because the ONNX converter (jax2onnx 0.17) replaces nn.max_pool while it traces with
    a version that takes its settings by keyword and only 'VALID' or 'SAME' padding, and
    turns a plain lax.reduce_window into an ONNX MaxPool that onnxruntime cannot run."""
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


# ---------------------------------------------------------------------------------------
# Transformers (DeiT, PVT): timm's layers and init.
# ---------------------------------------------------------------------------------------

# timm's trunc_normal_(std=.02) for every Linear, pos_embed and cls_token. timm cuts at
# +-2 in absolute value, i.e. +-100 std: in effect a plain normal, which is what we use
# (Flax's truncated_normal would cut at +-2 std and shrink the spread by 12%).
dense_init = nn.initializers.normal(0.02)
# The patch embedding keeps PyTorch's default Conv2d init. Its bias is U(+-1/sqrt(fan_in))
# in PyTorch; we start it at zero.
patch_embed_init = torch_default_init


def dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=dense_init, name=name)


def drop_path(rate: float, train: bool) -> nn.Dropout:
    """Stochastic depth on [B, L, D] (timm's DropPath): one keep/drop draw per sample,
    broadcast over tokens and channels, kept samples scaled by 1/(1-p). Build it inside a
    module's compact method; each call of it draws a new mask."""
    return nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, attn_drop_rate: float,
           train: bool) -> jax.Array:
    """Multi-head softmax attention: queries [B, L, H, d], keys and values [B, S, H, d]
    -> [B, L, H*d]. Logits (scaled by d^-0.5) and softmax in float32 whatever the
    compute dtype; dropout on the probabilities. Call it inside a module's compact
    method (the dropout is a submodule of that module)."""
    batch, length, heads, head_dim = q.shape
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=jnp.float32) * head_dim**-0.5
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(attn_drop_rate, deterministic=not train)(probs)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return y.reshape(batch, length, heads * head_dim)


class Mlp(nn.Module):
    """timm's transformer MLP: fc1, exact GELU, dropout, fc2 (back to the input width),
    dropout."""

    hidden: int
    drop_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        dropout = nn.Dropout(self.drop_rate, deterministic=not train)
        y = dropout(nn.gelu(dense(self.hidden, self.dtype, "fc1")(x), approximate=False))
        return dropout(dense(x.shape[-1], self.dtype, "fc2")(y))


DEPTHWISE_FORMULATIONS = ("auto", "shifted", "grouped")


def depthwise_formulation(setting: str = "auto") -> str:
    """How a DepthwiseConv with this `formulation` computes here: 'shifted' or
    'grouped'; 'auto' is shifted multiply-adds on CPU, XLA's grouped convolution on
    other backends."""
    if setting not in DEPTHWISE_FORMULATIONS:
        raise ConfigError(f"depthwise must be 'auto', 'shifted' or 'grouped', got "
                          f"{setting!r}")
    if setting == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "grouped"
    return setting


class DepthwiseConv(nn.Module):
    """A k x k depthwise convolution with PyTorch's padding, over [B, H, W, C].

    Its parameters are nn.Conv's with feature_group_count=C ('kernel' [k, k, 1, C],
    'bias' [C]), drawn by the same initialisers, so checkpoints do not tell the two apart;
    `formulation` ('auto', 'shifted', 'grouped': `depthwise_formulation`) changes only how
    the output is computed.
    """

    features: int
    kernel: int
    stride: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = conv_init
    bias_init: Any = nn.initializers.zeros_init()
    formulation: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.features:
            raise ValueError(f"a depthwise conv of {self.features} channels got an input of "
                             f"{x.shape[-1]} channels")
        k, s, pad = self.kernel, self.stride, (self.kernel - 1) // 2
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, self.features),
                            self.param_dtype)
        bias: Optional[jax.Array] = (self.param("bias", self.bias_init, (self.features,),
                                                self.param_dtype) if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if depthwise_formulation(self.formulation) == "grouped":
            y = jax.lax.conv_general_dilated(
                x, kernel, (s, s), ((pad, pad), (pad, pad)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.features)
        else:
            y = _shifted_depthwise(x, kernel, s, pad)
        return y if bias is None else y + bias


def _shifted_depthwise(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """sum over taps (i, j) of kernel[i, j] * the input shifted by (i, j), strided; summed
    in float32 whatever the compute dtype (as a convolution accumulates)."""
    dtype = x.dtype
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kernel = kernel.astype(jnp.float32)
    batch, height, width, channels = x.shape
    k = kernel.shape[0]
    out_h, out_w = (height - k) // stride + 1, (width - k) // stride + 1
    y = None
    for i in range(k):
        for j in range(k):
            window = jax.lax.slice(x, (0, i, j, 0),
                                   (batch, i + stride * (out_h - 1) + 1,
                                    j + stride * (out_w - 1) + 1, channels),
                                   (1, stride, stride, 1))
            term = window * kernel[i, j, 0]
            y = term if y is None else y + term
    return y.astype(dtype)


# --- Loading a checkpoint trained at another image size (DeiT, PVT) -----------------------

def resize_position_embedding(pos_embed: jax.Array, num_tokens: int, method: str = "bicubic",
                              antialias: bool = True) -> jax.Array:
    """Position embeddings [1, P + g*g, D] -> [1, P + G*G, D] for G*G = num_tokens - P.

    The P prefix tokens (a class token) are kept; the g x g grid is resized by
    `jax.image.resize(method, antialias)` to G x G, in float32, as when fine-tuning at
    another resolution (ImageNet 224 px -> COCO 448 px). P is what the square grids
    leave over. Written with jax.numpy, so `jax.eval_shape` can run it on shapes.
    """
    stored = pos_embed.shape[1]
    prefix, new_g = _grid_resize(stored, num_tokens)
    if new_g is None:
        raise ValueError(f"cannot resize position embeddings of {stored} tokens to {num_tokens}")
    g = math.isqrt(stored)
    grid = jnp.reshape(pos_embed[0, prefix:], (g, g, -1)).astype(jnp.float32)
    grid = jax.image.resize(grid, (new_g, new_g, grid.shape[-1]), method, antialias=antialias)
    out = jnp.concatenate([pos_embed[0, :prefix].astype(jnp.float32),
                           grid.reshape(new_g * new_g, -1)], axis=0)
    return out[None].astype(pos_embed.dtype)


def _grid_resize(stored: int, num_tokens: int) -> tuple[int, Optional[int]]:
    """(P, G) for resizing `stored` = P + g*g tokens to `num_tokens` = P + G*G, G None
    where num_tokens is not P plus a square."""
    prefix = stored - math.isqrt(stored) ** 2
    new_g = math.isqrt(max(num_tokens - prefix, 0))
    if num_tokens <= prefix or new_g * new_g != num_tokens - prefix:
        return prefix, None
    return prefix, new_g


def resize_position_embeddings(variables: Mapping[str, Any], target: Mapping[str, Any],
                               names: Iterable[str], method: str = "bicubic",
                               antialias: bool = True) -> Mapping[str, Any]:
    """`variables` with each params[name] of `names` that the checkpoint holds at
    another token count resized to the target's (`resize_position_embedding`); the
    same `variables` where none differs. An embedding that cannot be resized (another
    width, not a square grid) is left as stored, for the loading check to report."""
    params, wanted = variables.get("params", {}), target.get("params", {})
    resized = {}
    for name in names:
        if name not in params or name not in wanted:
            continue
        have, want = tuple(params[name].shape), tuple(wanted[name].shape)
        if (have != want and len(have) == len(want) == 3 and have[0] == want[0] == 1
                and have[2] == want[2] and _grid_resize(have[1], want[1])[1] is not None):
            resized[name] = resize_position_embedding(params[name], want[1], method, antialias)
    if not resized:
        return variables
    return {**variables, "params": {**params, **resized}}
