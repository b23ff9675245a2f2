"""ResNet-18/34/50/101/152 (the torchvision layout) with a NOAH or linear head.

The layout of the reference (`models/noah_resnet.py`): 7x7/2 stem, 3x3/2 max pool,
four stages of basic or bottleneck blocks, stride on the 3x3 convolution of the
bottleneck, BatchNorm everywhere, no zero-init of the last norm. The NOAH head
reads the last stage map [B, 7, 7, C] directly; the baseline averages it first.

Names mirror the reference's state_dict with integer indices joined by '_'
(`layer1.0.downsample.1.running_mean` -> `layer1_0/downsample_1/mean`), so a
checkpoint converts with one generic rule.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from noah_jax.models.heads import Classifier
from noah_jax.models.input_preprocessing import (IMAGENET_MEAN, IMAGENET_STD,
                                               InputPreprocessing)
from noah_jax.models.layers import batch_norm, conv, max_pool_3x3_s2
from noah_jax.models.torch_names import TorchNames


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_group_size: int = 0
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        bn = functools.partial(batch_norm, train, self.dtype, group_size=self.bn_group_size)
        y = nn.relu(bn("bn1")(conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)))
        y = bn("bn2")(conv(self.planes, 3, 1, self.dtype, "conv2")(y))
        return nn.relu(y + _shortcut(self, x, train))


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_group_size: int = 0
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        bn = functools.partial(batch_norm, train, self.dtype, group_size=self.bn_group_size)
        y = nn.relu(bn("bn1")(conv(self.planes, 1, 1, self.dtype, "conv1")(x)))
        y = nn.relu(bn("bn2")(conv(self.planes, 3, self.stride, self.dtype, "conv2")(y)))
        y = bn("bn3")(conv(self.planes * 4, 1, 1, self.dtype, "conv3")(y))
        return nn.relu(y + _shortcut(self, x, train))


def _shortcut(block, x, train):
    """Identity, or a strided 1x1 conv + BN where the shape changes (torchvision's rule)."""
    out = block.planes * block.expansion
    if block.stride == 1 and x.shape[-1] == out:
        return x
    x = conv(out, 1, block.stride, block.dtype, "downsample_0")(x)
    return batch_norm(train, block.dtype, "downsample_1", block.bn_group_size)(x)


class ResNet(Classifier):
    """ResNet backbone; `__call__(images [B, H, W, 3], train) -> logits [B, K]`."""

    block: str = "basic"  # 'basic' or 'bottleneck'
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    # BatchNorm statistics over groups of this many examples in training (0 = the whole
    # batch): the reference's per-GPU batch (layers.BatchNorm). Training configs set it.
    bn_group_size: int = 0

    # The reference's main.py:175-193, shared by its CNNs: Normalize(ImageNet mean/std),
    # Resize(256) + CenterCrop(224), torchvision's default (PIL bilinear) interpolation.
    input_preprocessing: ClassVar[InputPreprocessing] = InputPreprocessing(
        IMAGENET_MEAN, IMAGENET_STD, eval_interpolation="bilinear", eval_crop_ratio=0.875)

    # The reference's baseline head is Sequential(pool, flatten, linear); torchvision's `fc`.
    torch_names: ClassVar[TorchNames] = TorchNames(linear_head=("head.2", "fc"))

    @nn.compact
    def __call__(self, x, train: bool = False):
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
        x = x.astype(self.dtype)
        x = conv(64, 7, 2, self.dtype, "conv1")(x)
        x = nn.relu(batch_norm(train, self.dtype, "bn1", self.bn_group_size)(x))
        x = max_pool_3x3_s2(x)
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                x = block_cls(64 * 2**i, stride, self.dtype, self.bn_group_size,
                              name=f"layer{i + 1}_{j}")(x, train)
        return self.classify(x, train=train, dense_init=nn.initializers.normal(0.01))


def _variant(block, stage_sizes, key_ratio):
    # Head defaults of the reference README: N=4, dropout 0.1; r=1/2 (18/34), 1/8 (50+).
    return ResNet, dict(block=block, stage_sizes=stage_sizes, num_heads=4, key_ratio=key_ratio,
                        dropout=0.1)


VARIANTS = {
    "resnet18": _variant("basic", (2, 2, 2, 2), 0.5),
    "resnet34": _variant("basic", (3, 4, 6, 3), 0.5),
    "resnet50": _variant("bottleneck", (3, 4, 6, 3), 0.125),
    "resnet101": _variant("bottleneck", (3, 4, 23, 3), 0.125),
    "resnet152": _variant("bottleneck", (3, 8, 36, 3), 0.125),
}
