"""PVT v1 (Pyramid Vision Transformer) with a NOAH or class-token linear head.

The layout of the reference (`vit/pvt/classification/{pvt,noah_pvt}.py`): four stages,
each a patch embedding (a strided conv, patch 4 in the first stage and 2 after it, then
a LayerNorm), a learned position embedding and pre-norm transformer blocks; a final
LayerNorm. A block's attention is spatial-reduction attention: queries come from every
token, keys and values from the stage's map shrunk by a `sr_ratio` x `sr_ratio` strided
conv and a LayerNorm (no reduction when sr_ratio is 1, the last stage). Stage widths
grow (x1: 64/128/320/512), the token grid halves (224 px: 56, 28, 14, 7).

  head='linear' (baseline): a class token is prepended in stage 4 only (pos_embed4
                            has 1 + 49 entries, the class token's first); its output
                            after the final LayerNorm feeds a linear head.
  head='noah':              no class token; all 49 stage-4 tokens after the final
                            LayerNorm feed the NOAH head.

Numerics as the reference: LayerNorm eps 1e-6 in the blocks and the final norm but
PyTorch's default 1e-5 in the patch-embedding and spatial-reduction norms; exact
(erf) GELU; q and kv Linears with bias; attention logits and softmax in float32.

Names mirror the reference's state_dict, integer indices joined by '_'
(`block3.1.attn.kv.weight` -> `block3_1/attn/kv/kernel`, transposed; `patch_embed2.proj`
-> `patch_embed2/proj`; `pos_embed1..4` and `cls_token` are parameters of the model
itself). The kv kernel keeps torch's output order [2 (k, v), attn_heads, head_dim], so
it converts by a transpose alone.

Image size. The model is built for `img_size` (the position embeddings' lengths) and
rejects other inputs with a ValueError. The reference instead resizes its position
embeddings bilinearly to whatever grid the input gives; it decides by comparing each
stage's token count with the *first* stage's, so stages 2-4 always go through that
resize, an identity at the size the model was built for. To run at another size, build
the model with that `img_size` (a converted checkpoint gets its own from pos_embed1);
a checkpoint of another size loads into it (config.init_from) with its position
embeddings resized so (`adapt_checkpoint`).
Stage grids after the first halve with floor, as the reference's stride-2 convs (and,
for its only patch size 4, its pos-embed sizes) do.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from noah_jax.models.heads import Classifier
from noah_jax.models.input_preprocessing import (IMAGENET_MEAN, IMAGENET_STD,
                                               InputPreprocessing)
from noah_jax.models.torch_names import TorchNames
# The DeiT file's pieces that PVT shares unchanged: the timm-style initialisers (Linear,
# pos_embed, cls_token: normal(0.02); convs: PyTorch's default, zero bias) and the MLP
# (fc1, exact GELU, fc2, dropout after each).
from noah_jax.models.layers import (Mlp, attend, dense, dense_init, drop_path,
                                    patch_embed_init as conv_init, resize_position_embeddings)

# LayerNorm eps: the reference builds the blocks and the final norm with eps 1e-6, but
# the patch embeddings' and the spatial reductions' norms with PyTorch's default.
BLOCK_EPS = 1e-6
TORCH_DEFAULT_EPS = 1e-5


def layer_norm(epsilon: float, dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name)


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys and values come from the token map shrunk by
    `sr_ratio` (a conv with kernel = stride = sr_ratio, then a LayerNorm)."""

    attn_heads: int
    sr_ratio: int = 1
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, grid: tuple[int, int], train: bool):
        batch, length, dim = x.shape
        head_dim = dim // self.attn_heads
        q = dense(dim, self.dtype, "q")(x).reshape(batch, length, self.attn_heads, head_dim)
        if self.sr_ratio > 1:
            # Tokens are the map in row-major order, so [B, h*w, C] -> [B, h, w, C] is
            # the reference's permute + reshape to NCHW, in our channels-last layout.
            r = self.sr_ratio
            y = x.reshape(batch, *grid, dim)
            y = nn.Conv(dim, (r, r), (r, r), padding="VALID", dtype=self.dtype,
                        kernel_init=conv_init, name="sr")(y)
            y = layer_norm(TORCH_DEFAULT_EPS, self.dtype, "norm")(y.reshape(batch, -1, dim))
        else:
            y = x
        kv = dense(2 * dim, self.dtype, "kv")(y).reshape(batch, -1, 2, self.attn_heads, head_dim)
        k, v = kv[:, :, 0], kv[:, :, 1]
        y = attend(q, k, v, self.attn_drop_rate, train)
        y = dense(dim, self.dtype, "proj")(y)
        return nn.Dropout(self.drop_rate, deterministic=not train)(y)


class Block(nn.Module):
    attn_heads: int
    mlp_hidden: int
    sr_ratio: int = 1
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, grid: tuple[int, int], train: bool):
        y = layer_norm(BLOCK_EPS, self.dtype, "norm1")(x)
        y = SpatialReductionAttention(self.attn_heads, self.sr_ratio, self.drop_rate,
                                      self.attn_drop_rate, self.dtype, name="attn")(y, grid, train)
        x = x + drop_path(self.drop_path_rate, train)(y)
        y = layer_norm(BLOCK_EPS, self.dtype, "norm2")(x)
        y = Mlp(self.mlp_hidden, self.drop_rate, self.dtype, name="mlp")(y, train)
        return x + drop_path(self.drop_path_rate, train)(y)


class PatchEmbed(nn.Module):
    """A conv with kernel = stride = patch, flattened to tokens, then a LayerNorm."""

    embed_dim: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), (p, p), padding="VALID", dtype=self.dtype,
                    kernel_init=conv_init, name="proj")(x)
        grid = x.shape[1:3]
        x = x.reshape(x.shape[0], -1, self.embed_dim)  # row-major, as torch's flatten(2)
        return layer_norm(TORCH_DEFAULT_EPS, self.dtype, "norm")(x), grid


class PyramidVisionTransformer(Classifier):
    """PVT v1. Takes images [B, img_size, img_size, 3], returns float32 logits [B, K].

    Attributes (besides the head's, from `Classifier`):
      img_size: the input side the model is built for; fixes the pos_embeds' lengths.
      patch_size: the first stage's patch (the side of one stage-1 token in pixels);
        later stages merge 2 x 2 tokens.
      embed_dims, attn_heads, mlp_ratios, sr_ratios, depths: per stage, the token width,
        the attention heads (not `num_heads`, the NOAH head's N), the MLP hidden width
        as a multiple of the token width, the spatial-reduction ratio of keys/values,
        the number of blocks.
      drop_rate: dropout after each pos_embed, in the MLPs and after the attention
        projections.
      attn_drop_rate: dropout on the attention probabilities.
      drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over
        all blocks of all stages, as the reference.
    """

    img_size: int = 224
    patch_size: int = 4
    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    attn_heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[float, ...] = (8.0, 8.0, 4.0, 4.0)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    # PVT's classification/datasets.py:105-116 (v2 branch; the reference's
    # vit/pvt/classification/main.py uses it): Resize(int(256 / 224 * S), bicubic),
    # CenterCrop(S), Normalize(ImageNet mean/std). int(256 / 224 * S) == int(S / 0.875)
    # at 224 and 384.
    input_preprocessing: ClassVar[InputPreprocessing] = InputPreprocessing(
        IMAGENET_MEAN, IMAGENET_STD, eval_interpolation="bicubic", eval_crop_ratio=0.875)

    # pos_embed1 [1, (img_size / patch_size)^2, D1] shows the checkpoint's image size; it
    # never holds the class token (only pos_embed4 of the baseline does).
    torch_names: ClassVar[TorchNames] = TorchNames(tokens=("pos_embed1", 1))

    def no_weight_decay(self) -> frozenset[str]:
        # vit/pvt/classification/noah_pvt.py:187 returns {} (the position embeddings are
        # decayed); the baseline's pvt.py:187 {'cls_token'}.
        return frozenset() if self.head_wants_positions else frozenset({"cls_token"})

    def adapt_checkpoint(self, variables: dict, target: dict) -> dict:
        # A checkpoint trained at another image size: each stage's position embedding
        # resized to this model's grid as the reference resizes them at run time
        # (F.interpolate, bilinear, half-pixel centres, no antialiasing), the class
        # token's entry of the baseline's pos_embed4 kept.
        return resize_position_embeddings(
            variables, target, [f"pos_embed{i + 1}" for i in range(len(self.depths))],
            "bilinear", antialias=False)

    def stage_grids(self) -> list[int]:
        """The side of each stage's token map at `img_size`."""
        grids = [self.img_size // self.patch_size]
        for _ in self.depths[1:]:
            grids.append(grids[-1] // 2)
        return grids

    def _check(self, x) -> None:
        stages = len(self.depths)
        for field in ("embed_dims", "attn_heads", "mlp_ratios", "sr_ratios"):
            if len(getattr(self, field)) != stages:
                raise ValueError(f"{field}={getattr(self, field)} needs one entry per stage "
                                 f"(depths={self.depths} has {stages})")
        for dim, heads in zip(self.embed_dims, self.attn_heads):
            if dim % heads:
                raise ValueError(f"embed_dims={self.embed_dims} are not divisible by "
                                 f"attn_heads={self.attn_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        grids = self.stage_grids()
        for i, (grid, ratio) in enumerate(zip(grids, self.sr_ratios)):
            if grid < max(ratio, 1):
                raise ValueError(
                    f"img_size={self.img_size} is too small: stage {i + 1}'s token map is "
                    f"{grid}x{grid} (stage maps {grids}), smaller than its spatial "
                    f"reduction sr_ratio={ratio} (and 1x1)")
        if not self.head_wants_positions and self.sr_ratios[-1] != 1:
            # The class token has no place on the map a spatial reduction convolves (the
            # reference fails there too, in a reshape).
            raise ValueError(f"the baseline's class token needs sr_ratios[-1] == 1, got "
                             f"sr_ratios={self.sr_ratios}")
        if x.ndim != 4 or x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(f"input images of shape {x.shape} do not match the model's "
                             f"img_size={self.img_size}: expected [B, {self.img_size}, "
                             f"{self.img_size}, C]; build the model with the input's img_size "
                             "(the position embeddings are not resized)")

    @nn.compact
    def __call__(self, x, train: bool = False):
        self._check(x)
        use_cls_token = not self.head_wants_positions
        last = len(self.depths) - 1
        # Stochastic depth grows linearly from 0 at the first block (torch.linspace).
        drop_path_rates = iter(np.linspace(0.0, self.drop_path_rate, sum(self.depths)))

        for i, depth in enumerate(self.depths):
            dim = self.embed_dims[i]
            if i > 0:
                x = x.reshape(x.shape[0], *grid, x.shape[-1])  # tokens back to their map
            x, grid = PatchEmbed(dim, self.patch_size if i == 0 else 2, self.dtype,
                                 name=f"patch_embed{i + 1}")(x)
            if use_cls_token and i == last:
                cls = self.param("cls_token", dense_init, (1, 1, dim), jnp.float32)
                cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, dim))
                x = jnp.concatenate([cls, x], axis=1)
            pos_embed = self.param(f"pos_embed{i + 1}", dense_init, (1, x.shape[1], dim),
                                   jnp.float32)
            x = x + pos_embed.astype(x.dtype)
            x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
            for j in range(depth):
                x = Block(self.attn_heads[i], int(dim * self.mlp_ratios[i]), self.sr_ratios[i],
                          self.drop_rate, self.attn_drop_rate, float(next(drop_path_rates)),
                          self.dtype, name=f"block{i + 1}_{j}")(x, grid, train)
        x = layer_norm(BLOCK_EPS, self.dtype, "norm")(x)

        # Baseline: the class token only; NOAH: every token of the last stage.
        features = x[:, 0] if use_cls_token else x
        # The NOAH head keeps its own init (the reference's weight init touches only
        # Linear and LayerNorm modules, not NOAH's convs).
        return self.classify(features, train=train, dense_init=dense_init)


def _variant(embed_dims: tuple[int, ...], depths: tuple[int, ...]) -> tuple[type, dict]:
    # All reference PVT factories: patch 4, heads 1/2/5/8, MLP ratios 8/8/4/4, SR ratios
    # 8/4/2/1, qkv bias; NOAH head defaults N=4, r=1/2, dropout 0.1 (noah_pvt's defaults).
    return PyramidVisionTransformer, dict(
        img_size=224, patch_size=4, embed_dims=embed_dims, attn_heads=(1, 2, 5, 8),
        mlp_ratios=(8.0, 8.0, 4.0, 4.0), sr_ratios=(8, 4, 2, 1), depths=depths,
        num_heads=4, key_ratio=0.5, dropout=0.1)


X1 = (64, 128, 320, 512)

VARIANTS: dict[str, tuple[type, dict]] = {
    "pvt_tiny_050": _variant((32, 64, 160, 256), (2, 2, 2, 2)),
    "pvt_tiny_075": _variant((48, 96, 240, 384), (2, 2, 2, 2)),
    "pvt_tiny": _variant(X1, (2, 2, 2, 2)),
    # Small, Medium and Large: defined by the reference's code, not in the paper's tables.
    "pvt_small": _variant(X1, (3, 4, 6, 3)),
    "pvt_medium": _variant(X1, (3, 4, 18, 3)),
    "pvt_large": _variant(X1, (3, 8, 27, 3)),
}
