"""ShuffleNetV2 x0.5 / x1.0 / x1.5 / x2.0 (the torchvision layout) with a NOAH or linear head.

As the reference (`models/noah_shufflenetv2.py`): a 3x3/2 stem conv to 24 channels
+ BN + ReLU, a 3x3/2 max pool, three stages of 4 / 8 / 4 shuffle units and conv5, a
1x1 conv + BN + ReLU to 1024 channels (2048 at x2.0). The NOAH head reads conv5's
map ([B, 7, 7, C] at 224 px); the baseline averages it first.

A shuffle unit has two branches whose outputs are concatenated and then shuffled.
The first unit of a stage (stride 2) feeds the whole input to both branches; the
others (stride 1) pass the first half of the channels through unchanged and feed
the second half to branch2. Channel order is torch's NCHW order throughout, so that
converted weights meet the channels they were trained on: the split takes the first
and second halves, and after the shuffle channel i comes from branch i % 2,
channel i // 2 (`channel_shuffle`).

Init as the reference, which leaves PyTorch's defaults in place: every conv and the
baseline's linear weight U(+-1/sqrt(fan_in)), BatchNorm 1 / 0; the NOAH head keeps
its own Kaiming-normal init. (PyTorch also draws the linear bias U(+-1/sqrt(fan_in));
`Classifier.classify` gives the linear head a zero bias.)

Names mirror the reference's state_dict with integer indices joined by '_':
`stage2.0.branch1.2.weight` -> `stage2_0/branch1_2/kernel`, `conv5.1.running_mean` ->
`conv5_1/mean`; the baseline's linear layer is `head.2` (torchvision's `fc` reads too).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from noah_jax.models.heads import Classifier
from noah_jax.models import layers
from noah_jax.models.input_preprocessing import (IMAGENET_MEAN, IMAGENET_STD,
                                               InputPreprocessing)
from noah_jax.models.layers import batch_norm, max_pool_3x3_s2, torch_default_init
from noah_jax.models.torch_names import TorchNames

# The reference does not re-initialise: every conv keeps PyTorch's default init.
conv = functools.partial(layers.conv, kernel_init=torch_default_init)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """Interleaves `groups` contiguous channel groups of a channels-last array.

    The NCHW shuffle (view [B, groups, C/groups, H, W], swap axes 1 and 2, flatten) in
    NHWC: channel i of the result is channel i // groups of group i % groups.
    """
    *lead, channels = x.shape
    x = x.reshape(*lead, groups, channels // groups)
    return jnp.swapaxes(x, -1, -2).reshape(*lead, channels)


class ShuffleUnit(nn.Module):
    """The reference's `InvertedResidual`: two branches of `features // 2` channels each."""

    features: int
    stride: int
    dtype: Any = jnp.float32
    bn_group_size: int = 0
    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        branch = self.features // 2
        in_features = x.shape[-1]
        if self.stride == 1:
            if in_features != self.features:
                raise ValueError(f"a stride-1 shuffle unit keeps its width: input has "
                                 f"{in_features} channels, output {self.features}")
            passed, x = x[..., :in_features // 2], x[..., in_features // 2:]
        else:
            # branch1: depthwise 3x3 (strided) + BN, then 1x1 + BN + ReLU.
            passed = conv(in_features, 3, self.stride, self.dtype, "branch1_0",
                          groups=in_features, depthwise=self.depthwise)(x)
            passed = batch_norm(train, self.dtype, "branch1_1", self.bn_group_size)(passed)
            passed = conv(branch, 1, 1, self.dtype, "branch1_2")(passed)
            passed = nn.relu(batch_norm(train, self.dtype, "branch1_3", self.bn_group_size)(passed))
        # branch2: 1x1 + BN + ReLU, depthwise 3x3 + BN, 1x1 + BN + ReLU (index 2 is the
        # first ReLU, which holds no parameters).
        y = conv(branch, 1, 1, self.dtype, "branch2_0")(x)
        y = nn.relu(batch_norm(train, self.dtype, "branch2_1", self.bn_group_size)(y))
        y = conv(branch, 3, self.stride, self.dtype, "branch2_3", groups=branch,
                 depthwise=self.depthwise)(y)
        y = batch_norm(train, self.dtype, "branch2_4", self.bn_group_size)(y)
        y = conv(branch, 1, 1, self.dtype, "branch2_5")(y)
        y = nn.relu(batch_norm(train, self.dtype, "branch2_6", self.bn_group_size)(y))
        return channel_shuffle(jnp.concatenate([passed, y], axis=-1), 2)


class ShuffleNetV2(Classifier):
    """ShuffleNetV2 backbone; `__call__(images [B, H, W, 3], train) -> logits [B, K]`."""

    stages_repeats: Sequence[int] = (4, 8, 4)
    # Stem, stage2, stage3, stage4, conv5.
    stages_out_channels: Sequence[int] = (24, 116, 232, 464, 1024)
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

    # The reference's baseline head is Sequential(pool, flatten, linear); torchvision's `fc`.
    torch_names: ClassVar[TorchNames] = TorchNames(linear_head=("head.2", "fc"))

    @nn.compact
    def __call__(self, x, train: bool = False):
        if len(self.stages_repeats) != 3 or len(self.stages_out_channels) != 5:
            raise ValueError(f"ShuffleNetV2 takes 3 stage repeats and 5 widths (stem, 3 stages, "
                             f"conv5); got {self.stages_repeats} and {self.stages_out_channels}")
        stem, *stage_widths, last = self.stages_out_channels
        x = x.astype(self.dtype)
        x = conv(stem, 3, 2, self.dtype, "conv1_0")(x)
        x = nn.relu(batch_norm(train, self.dtype, "conv1_1", self.bn_group_size)(x))
        x = max_pool_3x3_s2(x)
        for stage, (repeats, width) in enumerate(zip(self.stages_repeats, stage_widths), 2):
            for i in range(repeats):
                x = ShuffleUnit(width, 2 if i == 0 else 1, self.dtype, self.bn_group_size,
                                self.depthwise, name=f"stage{stage}_{i}")(x, train)
        x = conv(last, 1, 1, self.dtype, "conv5_0")(x)
        x = nn.relu(batch_norm(train, self.dtype, "conv5_1", self.bn_group_size)(x))
        return self.classify(x, train=train, dense_init=torch_default_init)


def _variant(stage_widths, last):
    # Head defaults of the reference README's command: N=8, r=1/4, dropout 0.
    return ShuffleNetV2, dict(stages_repeats=(4, 8, 4),
                              stages_out_channels=(24, *stage_widths, last),
                              num_heads=8, key_ratio=0.25, dropout=0.0)


VARIANTS = {
    "shufflenetv2_050": _variant((48, 96, 192), 1024),
    "shufflenetv2_100": _variant((116, 232, 464), 1024),
    "shufflenetv2_150": _variant((176, 352, 704), 1024),
    "shufflenetv2_200": _variant((244, 488, 976), 2048),
}
