"""MLP-Mixer and gMLP with the NOAH head or the baseline "mean of tokens + linear" head.

Both families cut the image into non-overlapping patches (a strided convolution),
then stack residual blocks that mix information along the token axis and along the
channel axis with plain MLPs; a final LayerNorm closes the backbone.

  MlpMixer block:  x + drop_path(token-MLP over L of LayerNorm(x))
                   x + drop_path(channel-MLP(LayerNorm(x)))
  gMLP block:      x + drop_path(fc2(SGU(dropout(gelu(fc1(LayerNorm(x)))))))
                   SGU(z) = u * proj_L(LayerNorm(v)),  [u, v] = z split in two halves

head='noah' feeds every token after the final norm to the NOAH head; head='linear'
averages the tokens and applies a linear layer (the reference's baseline).

Parameter names mirror the reference's PyTorch state_dict: replace '.' by '/',
`blocks.{i}` by `blocks_{i}`, Linear/Conv `weight` by `kernel` and LayerNorm `weight`
by `scale` (e.g. `blocks.3.mlp_channels.gate.proj.weight` ->
`blocks_3/mlp_channels/gate/proj/kernel`, transposed).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from noah_jax.models.heads import Classifier, noah_lecun_kernel_init
from noah_jax.models.input_preprocessing import InputPreprocessing
from noah_jax.models.layers import drop_path
from noah_jax.models.torch_names import TorchNames

Array = jax.Array

# The reference's init (timm `_init_weights`, not the Flax-default variant): Linear
# weights Xavier-uniform; biases of the block MLPs ~N(0, 1e-6); the stem conv
# LeCun-normal (truncated, as timm's lecun_normal_ and Flax's lecun_normal are).
_dense_init = nn.initializers.xavier_uniform()
_mlp_bias_init = nn.initializers.normal(1e-6)
_stem_init = nn.initializers.lecun_normal()

LAYER_NORM_EPS = 1e-6
# The spatial gating unit's norm is a bare torch nn.LayerNorm in the reference.
GATE_NORM_EPS = 1e-5


def _gelu(x: Array) -> Array:
    return nn.gelu(x, approximate=False)  # the reference uses the exact (erf) GELU


class PatchEmbed(nn.Module):
    """Images [B, H, W, C] -> tokens [B, L, D] with a conv of kernel = stride = patch."""

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    kernel_init=_stem_init, name="proj")(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout, over the last axis."""

    hidden_features: int
    out_features: int
    drop_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, kernel_init=_dense_init,
                                         bias_init=_mlp_bias_init, name=name)
        dropout = nn.Dropout(self.drop_rate, deterministic=not train)
        x = dropout(_gelu(dense(self.hidden_features, "fc1")(x)))
        return dropout(dense(self.out_features, "fc2")(x))


class MixerBlock(nn.Module):
    """Token mixing then channel mixing, each a pre-norm residual MLP."""

    tokens_hidden: int
    channels_hidden: int
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        num_tokens, dim = x.shape[1], x.shape[2]
        norm = lambda name: nn.LayerNorm(LAYER_NORM_EPS, dtype=self.dtype, name=name)
        drop = drop_path(self.drop_path_rate, train)  # each call draws its own mask
        # Token mixing: the MLP acts on the L axis, so move it last and back.
        y = norm("norm1")(x).swapaxes(1, 2)
        y = Mlp(self.tokens_hidden, num_tokens, self.drop_rate, self.dtype,
                name="mlp_tokens")(y, train).swapaxes(1, 2)
        x = x + drop(y)
        y = Mlp(self.channels_hidden, dim, self.drop_rate, self.dtype,
                name="mlp_channels")(norm("norm2")(x), train)
        return x + drop(y)


class SpatialGatingUnit(nn.Module):
    """Splits channels into u, v; gates u with a token-axis projection of LayerNorm(v)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        num_tokens = x.shape[1]
        u, v = jnp.split(x, 2, axis=-1)
        v = nn.LayerNorm(GATE_NORM_EPS, dtype=self.dtype, name="norm")(v)
        # Near-zero weights and unit bias: the gate starts as the identity on u.
        v = nn.Dense(num_tokens, dtype=self.dtype, kernel_init=nn.initializers.normal(1e-6),
                     bias_init=nn.initializers.ones_init(), name="proj")(v.swapaxes(1, 2))
        return u * v.swapaxes(1, 2)


class GatedMlp(nn.Module):
    """fc1 -> GELU -> dropout -> spatial gating (halves the width) -> fc2 -> dropout."""

    hidden_features: int
    out_features: int
    drop_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.hidden_features % 2:
            raise ValueError(f"gMLP hidden width must be even (split into u, v), "
                             f"got {self.hidden_features}")
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, kernel_init=_dense_init,
                                         bias_init=_mlp_bias_init, name=name)
        dropout = nn.Dropout(self.drop_rate, deterministic=not train)
        x = dropout(_gelu(dense(self.hidden_features, "fc1")(x)))
        x = SpatialGatingUnit(self.dtype, name="gate")(x)
        return dropout(dense(self.out_features, "fc2")(x))


class SpatialGatingBlock(nn.Module):
    """gMLP's residual block: x + drop_path(GatedMlp(LayerNorm(x)))."""

    hidden_features: int
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        y = nn.LayerNorm(LAYER_NORM_EPS, dtype=self.dtype, name="norm")(x)
        y = GatedMlp(self.hidden_features, x.shape[-1], self.drop_rate, self.dtype,
                     name="mlp_channels")(y, train)
        return x + drop_path(self.drop_path_rate, train)(y)


class _TokenMlpClassifier(Classifier):
    """Shared skeleton: patch stem, `num_blocks` blocks, final LayerNorm, head.

    Subclasses define `make_block(name)`. Fields (besides the head's, see Classifier):
      patch_size: side of the square patches (stem kernel and stride).
      embed_dim: token width D.
      num_blocks: depth.
      img_size: the input side the model is built for; the token-mixing layers have
        (img_size / patch_size)**2 inputs, so other sizes are rejected.
      drop_rate: dropout inside the MLPs (the reference recipe trains with 0.0233).
      drop_path_rate: per-sample stochastic depth, the same rate in every block as
        in the reference (no linear ramp); the recipe uses 0.1.
    The reference's class defaults are 0 for both rates; configs set the recipe's.
    """

    patch_size: int = 16
    embed_dim: int = 512
    num_blocks: int = 8
    img_size: int = 224
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    # What the reference evaluates Mixer and gMLP with: its timm models' default_cfg
    # (mlp/timm/models/noah_mlp_mixer.py:48-56: mean = std = 0.5, bicubic), as its
    # mlp/configs/default_noah.yaml leaves mean/std/interpolation unset (lines 32, 43, 83),
    # and the yaml's crop_pct 0.9 (line 13; timm's eval resize floor(S / 0.9), centre
    # crop S).
    input_preprocessing: ClassVar[InputPreprocessing] = InputPreprocessing(
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), eval_interpolation="bicubic", eval_crop_ratio=0.9)

    def make_block(self, name: str) -> nn.Module:
        raise NotImplementedError

    def _check_input(self, x: Array) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"{type(self).__name__}: img_size={self.img_size} is not divisible "
                             f"by patch_size={self.patch_size}")
        if x.ndim != 4 or x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(
                f"{type(self).__name__} was built for img_size={self.img_size} (NHWC images "
                f"[B, {self.img_size}, {self.img_size}, C]) but got an input of shape "
                f"{tuple(x.shape)}; its token-mixing layers fix the number of patches, so "
                f"set img_size to the input size (a new model, new token-mixing weights).")

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        self._check_input(x)
        x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, name="stem")(x)
        for i in range(self.num_blocks):
            x = self.make_block(f"blocks_{i}")(x, train)
        x = nn.LayerNorm(LAYER_NORM_EPS, dtype=self.dtype, name="norm")(x)
        # The reference re-initialises the NOAH convolutions LeCun-normal (fan_in =
        # Cin/G) and zero-initialises the baseline linear head.
        return self.classify(x, train=train, dense_init=nn.initializers.zeros_init(),
                             conv_init=noah_lecun_kernel_init)


class MlpMixer(_TokenMlpClassifier):
    """MLP-Mixer. mlp_ratio = (token, channel) hidden widths as multiples of embed_dim."""

    mlp_ratio: tuple[float, float] = (0.5, 4.0)

    # The token MLP's first weight [hidden, L] shows the checkpoint's token count.
    torch_names: ClassVar[TorchNames] = TorchNames(tokens=("blocks.0.mlp_tokens.fc1.weight", 1))

    def make_block(self, name: str) -> nn.Module:
        tokens_ratio, channels_ratio = self.mlp_ratio
        return MixerBlock(int(tokens_ratio * self.embed_dim), int(channels_ratio * self.embed_dim),
                          self.drop_rate, self.drop_path_rate, self.dtype, name=name)


class GMLP(_TokenMlpClassifier):
    """gMLP. mlp_ratio: fc1 width as a multiple of embed_dim (the gate halves it)."""

    embed_dim: int = 128
    num_blocks: int = 30
    mlp_ratio: float = 6.0

    # The spatial gating projection [L, L] shows the checkpoint's token count.
    torch_names: ClassVar[TorchNames] = TorchNames(
        tokens=("blocks.0.mlp_channels.gate.proj.weight", 0))

    def make_block(self, name: str) -> nn.Module:
        return SpatialGatingBlock(int(self.mlp_ratio * self.embed_dim), self.drop_rate,
                                  self.drop_path_rate, self.dtype, name=name)


# The reference's names; its NOAH variants are the same names with head='noah'.
_NOAH_DEFAULTS = dict(num_heads=4, key_ratio=0.5, dropout=0.1)
_MIXER = dict(patch_size=16, **_NOAH_DEFAULTS)
_GMLP = dict(patch_size=16, num_blocks=30, mlp_ratio=6.0, **_NOAH_DEFAULTS)

VARIANTS: dict[str, tuple[type, dict]] = {
    "mixer_s16_224": (MlpMixer, dict(embed_dim=512, num_blocks=8, **_MIXER)),
    "mixer_s16_075_224": (MlpMixer, dict(embed_dim=384, num_blocks=8, **_MIXER)),
    "mixer_s16_050_224": (MlpMixer, dict(embed_dim=256, num_blocks=8, **_MIXER)),
    "mixer_b16_224": (MlpMixer, dict(embed_dim=768, num_blocks=12, **_MIXER)),
    "gmlp_ti16_224": (GMLP, dict(embed_dim=128, **_GMLP)),
    "gmlp_ti16_075_224": (GMLP, dict(embed_dim=96, **_GMLP)),
    "gmlp_ti16_050_224": (GMLP, dict(embed_dim=64, **_GMLP)),
    "gmlp_s16_224": (GMLP, dict(embed_dim=256, **_GMLP)),
    "gmlp_b16_224": (GMLP, dict(embed_dim=512, **_GMLP)),
}
