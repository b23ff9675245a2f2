"""DeiT and ViT-Large (the timm/DeiT layout) with a NOAH or class-token linear head.

The layout of the reference (`vit/deit/{vision_transformer,noah_vision_transformer}.py`):
a patch-embedding convolution, a learned position embedding, `depth` pre-norm
transformer blocks (LayerNorm eps 1e-6, qkv with bias, exact GELU MLP), a final
LayerNorm. Below 192 channels (DeiT-Tiny x0.5/x0.75) a Linear(D, 192)+tanh
"pre_logits" layer follows. The two heads see different token sets:

  head='linear' (baseline): a class token is prepended (pos_embed has L+1 entries);
                            its output feeds a linear head.
  head='noah':              no class token (pos_embed has exactly L entries); all
                            L tokens feed the NOAH head.

Names mirror the reference's state_dict with integer indices joined by '_'
(`blocks.3.attn.qkv.weight` -> `blocks_3/attn/qkv/kernel`, transposed), except
`patch_embed.proj` -> `patch_embed` and `pre_logits.fc` -> `pre_logits`. The qkv
kernel keeps torch's output order [3, attn_heads, head_dim], so it converts by a
transpose alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from noah_jax.models.heads import Classifier
from noah_jax.models.input_preprocessing import (IMAGENET_MEAN, IMAGENET_STD,
                                               InputPreprocessing)
from noah_jax.models.layers import (Mlp, attend, dense, dense_init, drop_path, patch_embed_init,
                                    resize_position_embeddings)
from noah_jax.models.torch_names import TorchNames

# The reference adds pre_logits (Linear(D, 192) + tanh) when embed_dim is below this.
PRE_LOGITS_WIDTH = 192


def layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)


class Attention(nn.Module):
    attn_heads: int
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        batch, length, dim = x.shape
        head_dim = dim // self.attn_heads
        qkv = dense(3 * dim, self.dtype, "qkv")(x).reshape(batch, length, 3, self.attn_heads,
                                                           head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        y = attend(q, k, v, self.attn_drop_rate, train)
        y = dense(dim, self.dtype, "proj")(y)
        return nn.Dropout(self.drop_rate, deterministic=not train)(y)


class Block(nn.Module):
    attn_heads: int
    mlp_hidden: int
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        y = layer_norm(self.dtype, "norm1")(x)
        y = Attention(self.attn_heads, self.drop_rate, self.attn_drop_rate, self.dtype,
                      name="attn")(y, train)
        x = x + drop_path(self.drop_path_rate, train)(y)
        y = layer_norm(self.dtype, "norm2")(x)
        y = Mlp(self.mlp_hidden, self.drop_rate, self.dtype, name="mlp")(y, train)
        return x + drop_path(self.drop_path_rate, train)(y)


class VisionTransformer(Classifier):
    """DeiT / ViT. Takes images [B, img_size, img_size, 3], returns float32 logits [B, K].

    Attributes (besides the head's, from `Classifier`):
      patch_size: side of the square patches (the embedding conv's kernel and stride).
      embed_dim: D, the token width.
      depth: number of transformer blocks.
      attn_heads: attention heads of each block (not `num_heads`, the NOAH head's N).
      mlp_ratio: MLP hidden width as a multiple of D.
      img_size: the input side the model is built for; fixes pos_embed's length.
      drop_rate: dropout after pos_embed, in the MLP and after the attention projection.
      attn_drop_rate: dropout on the attention probabilities.
      drop_path_rate: stochastic depth of the last block; block i uses
        drop_path_rate * i / (depth - 1), as the reference.
    """

    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    attn_heads: int = 12
    mlp_ratio: float = 4.0
    img_size: int = 224
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    # DeiT's datasets.py:99-108 (build_transform, which the reference's vit/deit/main.py
    # uses with --eval-crop-ratio 0.875, main.py:172): Resize(int(S / 0.875), bicubic),
    # CenterCrop(S), Normalize(ImageNet mean/std).
    input_preprocessing: ClassVar[InputPreprocessing] = InputPreprocessing(
        IMAGENET_MEAN, IMAGENET_STD, eval_interpolation="bicubic", eval_crop_ratio=0.875)

    # pos_embed [1, L (+1 with a class token), D] shows the checkpoint's image size.
    torch_names: ClassVar[TorchNames] = TorchNames(
        renames={"patch_embed": "patch_embed.proj", "pre_logits": "pre_logits.fc"},
        tokens=("pos_embed", 1), class_token_in_tokens=True)

    def no_weight_decay(self) -> frozenset[str]:
        # vit/deit/noah_vision_transformer.py:207 {'pos_embed'}; the baseline's
        # vit/deit/vision_transformer.py:262 {'pos_embed', 'cls_token'}.
        if self.head_wants_positions:
            return frozenset({"pos_embed"})
        return frozenset({"pos_embed", "cls_token"})

    def adapt_checkpoint(self, variables: dict, target: dict) -> dict:
        # A checkpoint trained at another image size (init_from a 224 px checkpoint at
        # 384 or 448 px): its pos_embed grid resized bicubically, the class token kept.
        return resize_position_embeddings(variables, target, ["pos_embed"], "bicubic")

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        if self.embed_dim % self.attn_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by "
                             f"attn_heads={self.attn_heads}")
        if x.ndim != 4 or x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(f"input images of shape {x.shape} do not match the model's "
                             f"img_size={self.img_size}: expected [B, {self.img_size}, "
                             f"{self.img_size}, C]; build the model with the input's img_size")

        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), (p, p), padding="VALID", dtype=self.dtype,
                    kernel_init=patch_embed_init, name="patch_embed")(x)
        x = x.reshape(x.shape[0], -1, self.embed_dim)  # row-major, as torch's flatten(2)

        use_cls_token = not self.head_wants_positions
        if use_cls_token:
            cls = self.param("cls_token", dense_init, (1, 1, self.embed_dim), jnp.float32)
            cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.embed_dim))
            x = jnp.concatenate([cls, x], axis=1)
        pos_embed = self.param("pos_embed", dense_init, (1, x.shape[1], self.embed_dim),
                               jnp.float32)
        x = x + pos_embed.astype(x.dtype)
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)

        # Stochastic depth grows linearly from 0 at the first block (torch.linspace).
        drop_path_rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for i in range(self.depth):
            x = Block(self.attn_heads, int(self.embed_dim * self.mlp_ratio), self.drop_rate,
                      self.attn_drop_rate, float(drop_path_rates[i]), self.dtype,
                      name=f"blocks_{i}")(x, train)
        x = layer_norm(self.dtype, "norm")(x)

        # Baseline: the class token only; NOAH: every token (pre_logits applies per token).
        features = x[:, 0] if use_cls_token else x
        if self.embed_dim < PRE_LOGITS_WIDTH:
            features = jnp.tanh(dense(PRE_LOGITS_WIDTH, self.dtype, "pre_logits")(features))
        # The NOAH head keeps its own init (DeiT does not re-initialise it).
        return self.classify(features, train=train, dense_init=dense_init)


def _variant(embed_dim: int, depth: int, attn_heads: int, img_size: int = 224
             ) -> tuple[type, dict]:
    # All reference DeiT/ViT factories: patch 16, MLP ratio 4, qkv bias, LayerNorm eps 1e-6;
    # NOAH head defaults N=4, r=1/2, dropout 0.1 (NOAH_VisionTransformer's class defaults).
    return VisionTransformer, dict(patch_size=16, embed_dim=embed_dim, depth=depth,
                                   attn_heads=attn_heads, mlp_ratio=4.0, img_size=img_size,
                                   num_heads=4, key_ratio=0.5, dropout=0.1)


VARIANTS: dict[str, tuple[type, dict]] = {
    "deit_tiny_050_patch16_224": _variant(96, 12, 3),
    "deit_tiny_075_patch16_224": _variant(144, 12, 3),
    "deit_tiny_patch16_224": _variant(192, 12, 3),
    "deit_small_patch16_224": _variant(384, 12, 6),
    "deit_base_patch16_224": _variant(768, 12, 12),
    # DeiT-B fine-tuned at 384 px (576 tokens): the README's 86.86M model.
    "deit_base_patch16_384": _variant(768, 12, 12, img_size=384),
    # The paper's MS-COCO backbone (use img_size=448 for the usual multi-label setting).
    "vit_large_patch16_224": _variant(1024, 24, 16),
}
