"""MobileNetV2 at widths 0.35 / 0.5 / 0.75 / 1.0 with a NOAH or linear head.

As the reference (`models/noah_mobilenetv2.py`, the torchvision layout): every
stage width is `make_divisible(c * width, 8)`, the final 1x1 ConvBNReLU6 goes to
`make_divisible(1280 * max(1, width), 8)` = 1280 channels for width <= 1, and the
head reads that 7x7 map. The baseline head is average pooling + linear (the
reference has no dropout before it).

Names mirror the reference's state_dict with integer indices joined by '_':
`features.3.conv.1.0.weight` -> `features_3/conv_1_0/kernel`.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from noah_jax.models.heads import Classifier
from noah_jax.models.input_preprocessing import (IMAGENET_MEAN, IMAGENET_STD,
                                               InputPreprocessing)
from noah_jax.models.layers import batch_norm, conv
from noah_jax.models.torch_names import TorchNames

# (expansion t, channels c, repeats n, first stride s) of the seven stages.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds to the nearest multiple of `divisor`, never going down by more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(x, features, kernel, stride, train, dtype, prefix, groups=1,
                  bn_group_size=0, depthwise="auto"):
    """The reference's ConvBNReLU: conv `{prefix}_0`, BatchNorm `{prefix}_1`, ReLU6."""
    x = conv(features, kernel, stride, dtype, f"{prefix}_0", groups=groups,
             depthwise=depthwise)(x)
    return nn.relu6(batch_norm(train, dtype, f"{prefix}_1", bn_group_size)(x))


class InvertedResidual(nn.Module):
    features: int
    stride: int
    expand_ratio: int
    dtype: Any = jnp.float32
    bn_group_size: int = 0
    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        layer = functools.partial(conv_bn_relu6, train=train, dtype=self.dtype,
                                  bn_group_size=self.bn_group_size, depthwise=self.depthwise)
        in_features = x.shape[-1]
        hidden = int(round(in_features * self.expand_ratio))
        y, index = x, 0
        if self.expand_ratio != 1:  # pointwise expansion
            y, index = layer(y, hidden, 1, 1, prefix="conv_0"), 1
        y = layer(y, hidden, 3, self.stride, prefix=f"conv_{index}", groups=hidden)  # depthwise
        y = conv(self.features, 1, 1, self.dtype, f"conv_{index + 1}")(y)  # pointwise, linear
        y = batch_norm(train, self.dtype, f"conv_{index + 2}", self.bn_group_size)(y)
        return x + y if self.stride == 1 and in_features == self.features else y


class MobileNetV2(Classifier):
    """MobileNetV2 backbone; `__call__(images [B, H, W, 3], train) -> logits [B, K]`."""

    width: float = 1.0
    # BatchNorm statistics over groups of this many examples in training (0 = the whole
    # batch): the reference's per-GPU batch (layers.BatchNorm). Training configs set it.
    bn_group_size: int = 0
    # How the depthwise convolutions compute: 'auto', 'shifted' or 'grouped'
    # (layers.DepthwiseConv); the parameters are the same either way.
    depthwise: str = "auto"

    # The reference's main.py:175-193, shared by its CNNs: Normalize(ImageNet mean/std),
    # Resize(256) + CenterCrop(224), torchvision's default (PIL bilinear) interpolation.
    input_preprocessing: ClassVar[InputPreprocessing] = InputPreprocessing(
        IMAGENET_MEAN, IMAGENET_STD, eval_interpolation="bilinear", eval_crop_ratio=0.875)

    # The reference's baseline head is Sequential(pool, flatten, linear); torchvision's
    # is Sequential(dropout, linear).
    torch_names: ClassVar[TorchNames] = TorchNames(linear_head=("head.2", "classifier.1"))

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        channels = make_divisible(32 * self.width)
        x = conv_bn_relu6(x, channels, 3, 2, train, self.dtype, "features_0",
                          bn_group_size=self.bn_group_size)
        index = 1
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                x = InvertedResidual(make_divisible(c * self.width), s if i == 0 else 1, t,
                                     self.dtype, self.bn_group_size, self.depthwise,
                                     name=f"features_{index}")(x, train)
                index += 1
        last_channels = make_divisible(1280 * max(1.0, self.width))
        x = conv_bn_relu6(x, last_channels, 1, 1, train, self.dtype, f"features_{index}",
                          bn_group_size=self.bn_group_size)
        return self.classify(x, train=train, dense_init=nn.initializers.normal(0.01))


def _variant(width):
    # Head defaults of the reference README: N=8, r=1/4, dropout 0.2.
    return MobileNetV2, dict(width=width, num_heads=8, key_ratio=0.25, dropout=0.2)


VARIANTS = {
    "mobilenetv2_035": _variant(0.35),
    "mobilenetv2_050": _variant(0.5),
    "mobilenetv2_075": _variant(0.75),
    "mobilenetv2_100": _variant(1.0),
}
