"""MobileNetV3-Small and -Large with a NOAH or linear head.

The reference's own MobileNetV3 (`models/noah_mobilenetv3.py`), not torchvision's:
a 3x3/2 stem to 16 channels with h-swish, the bottleneck blocks of the tables below,
a 1x1 conv + BN + h-swish to 576 (Small) or 960 (Large) channels, then a 1x1 conv
*with bias* to 1280 channels + h-swish. The two heads differ in where that last conv
runs:

  NOAH      the conv runs on the whole 7x7 map, and the head attends over its 49
            positions;
  baseline  the map is averaged first, so the conv acts on one vector per image
            (the reference puts AdaptiveAvgPool2d inside `features`, before the
            conv), then Flatten + Linear(1280, K), no dropout.

A block: 1x1 expand conv + BN + act, depthwise kxk conv + BN, squeeze-excitation (if
any), act, 1x1 project conv + BN, plus the input where stride is 1 and the width
stays. The activation is ReLU ('RE', not ReLU6) or h-swish ('HS'); the SE gate is
a hard sigmoid.

Names mirror the reference's state_dict with integer indices joined by '_': inside a
block the torch Sequential's indices stay, activations included, so the expand conv is
`conv_0`, its BN `conv_1`, the depthwise conv `conv_3`, its BN `conv_4`, the SE module
`conv_5` (linears `fc_0`, `fc_2`), the project conv `conv_7` and its BN `conv_8`.
The last conv is `features_13` (Small) / `features_17` (Large) under NOAH and one
index later under the baseline, whose pooling layer takes that index.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from noah_jax.models.heads import Classifier
from noah_jax.models.input_preprocessing import (IMAGENET_MEAN, IMAGENET_STD,
                                               InputPreprocessing)
from noah_jax.models.layers import batch_norm, conv
from noah_jax.models.torch_names import TorchNames

# (kernel, expanded width, output width, squeeze-excitation, activation, stride) per
# block, the reference's tables (the MobileNetV3 paper's Tables 1 and 2).
LARGE_BLOCKS = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)
SMALL_BLOCKS = (
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
)
# mode -> (blocks, width of the 1x1 conv after them).
SETTINGS = {"small": (SMALL_BLOCKS, 576), "large": (LARGE_BLOCKS, 960)}
STEM_WIDTH = 16
LAST_WIDTH = 1280  # the final 1x1 conv (with bias) that the head reads

# The reference initialises every Linear (the SE layers and the baseline head) from
# N(0, 0.01^2); its convs use layers.conv_init (Kaiming-normal, fan_out).
linear_init = nn.initializers.normal(0.01)


def round_up(value: float, divisor: int = 8) -> int:
    """The reference's make_divisible: the next multiple of `divisor` (ceil), unlike
    MobileNetV2's round-to-nearest. At width 1 every table entry already is one."""
    return int(math.ceil(value / divisor) * divisor)


def hard_sigmoid(x):
    """relu6(x + 3) / 6."""
    return nn.relu6(x + 3.0) / 6.0


def hard_swish(x):
    """x * relu6(x + 3) / 6, in the reference's order of operations."""
    return x * nn.relu6(x + 3.0) / 6.0


ACTIVATIONS = {"RE": nn.relu, "HS": hard_swish}


class SqueezeExcitation(nn.Module):
    """Channel gates from the global average: Linear(C, C // 4), ReLU,
    Linear(C // 4, C), hard sigmoid; both linears without bias. Torch's `fc` is a
    Sequential, so the linears are `fc_0` and `fc_2`."""

    reduction: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        y = jnp.mean(x, axis=(1, 2))  # [B, C]
        y = nn.Dense(channels // self.reduction, use_bias=False, dtype=self.dtype,
                     kernel_init=linear_init, name="fc_0")(y)
        y = nn.Dense(channels, use_bias=False, dtype=self.dtype, kernel_init=linear_init,
                     name="fc_2")(nn.relu(y))
        return x * hard_sigmoid(y)[:, None, None, :]


class Bottleneck(nn.Module):
    """The reference's MobileBottleneck; submodule names are its `conv` Sequential's
    indices (module docstring)."""

    kernel: int
    expanded: int
    features: int
    squeeze_excite: bool
    activation: str
    stride: int
    dtype: Any = jnp.float32
    bn_group_size: int = 0
    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        act = ACTIVATIONS[self.activation]
        y = conv(self.expanded, 1, 1, self.dtype, "conv_0")(x)
        y = act(batch_norm(train, self.dtype, "conv_1", self.bn_group_size)(y))
        y = conv(self.expanded, self.kernel, self.stride, self.dtype, "conv_3",
                 groups=self.expanded, depthwise=self.depthwise)(y)
        y = batch_norm(train, self.dtype, "conv_4", self.bn_group_size)(y)
        if self.squeeze_excite:  # before the activation, as the reference
            y = SqueezeExcitation(dtype=self.dtype, name="conv_5")(y)
        y = act(y)
        y = conv(self.features, 1, 1, self.dtype, "conv_7")(y)
        y = batch_norm(train, self.dtype, "conv_8", self.bn_group_size)(y)
        if self.stride == 1 and x.shape[-1] == self.features:
            return x + y
        return y


class MobileNetV3(Classifier):
    """MobileNetV3 backbone; `__call__(images [B, H, W, 3], train) -> logits [B, K]`.

    mode: 'small' or 'large' (the block table, SETTINGS).
    """

    mode: str = "small"
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

    # The NOAH head is the reference's `classifier`; the baseline's is
    # Sequential(Flatten, Linear), so its Linear is `classifier.1`.
    torch_names: ClassVar[TorchNames] = TorchNames(noah_head=("classifier",),
                                                   linear_head=("classifier.1",))

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.mode not in SETTINGS:
            raise ValueError(f"mode must be one of {tuple(SETTINGS)}, got {self.mode!r}")
        blocks, last_conv = SETTINGS[self.mode]
        x = x.astype(self.dtype)
        x = conv(STEM_WIDTH, 3, 2, self.dtype, "features_0_0")(x)
        x = hard_swish(batch_norm(train, self.dtype, "features_0_1", self.bn_group_size)(x))
        index = 1
        for kernel, expanded, out, se, act, stride in blocks:
            x = Bottleneck(kernel, round_up(expanded), round_up(out), se, act, stride,
                           self.dtype, self.bn_group_size, self.depthwise,
                           name=f"features_{index}")(x, train)
            index += 1
        x = conv(round_up(last_conv), 1, 1, self.dtype, f"features_{index}_0")(x)
        x = hard_swish(batch_norm(train, self.dtype, f"features_{index}_1", self.bn_group_size)(x))
        index += 1
        if not self.head_wants_positions:
            # The baseline pools here (the reference's AdaptiveAvgPool2d takes this
            # index), so the last conv below sees one 1x1 "map" per image.
            x = jnp.mean(x, axis=(1, 2), keepdims=True)
            index += 1
        x = conv(LAST_WIDTH, 1, 1, self.dtype, f"features_{index}", use_bias=True)(x)
        x = hard_swish(x)
        if not self.head_wants_positions:
            x = x.reshape(x.shape[0], LAST_WIDTH)
        # The baseline's features are pooled already; NOAH reads the map.
        return self.classify(x, train=train, dense_init=linear_init)


def _variant(mode):
    # Head defaults of the reference: N=8, r=1/4, dropout 0.2 (as MobileNetV2).
    return MobileNetV3, dict(mode=mode, num_heads=8, key_ratio=0.25, dropout=0.2)


VARIANTS = {
    "mobilenetv3_small": _variant("small"),
    "mobilenetv3_large": _variant("large"),
}
