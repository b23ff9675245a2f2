"""Layers several CNN families share: PyTorch-initialised convolutions and BatchNorm.

`conv` pads as PyTorch does ((k-1)//2 on each side, where XLA's 'SAME' would pad an
even input (0, 1)) and starts from the reference's Kaiming-normal (fan_out) init;
`batch_norm` has PyTorch's BatchNorm2d eps and momentum.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

# Kaiming-normal, fan_out, ReLU gain: the reference CNNs' init of every conv.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    # PyTorch's BatchNorm2d defaults: eps 1e-5, momentum 0.1 (Flax's 0.9).
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, name=name)


def conv(features: int, kernel: int, stride: int, dtype: Any, name: str, groups: int = 1,
         use_bias: bool = False) -> nn.Conv:
    """A square conv, PyTorch's padding (k-1)//2; `groups` = channels is depthwise."""
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                   kernel_init=conv_init, name=name)
