"""How a family's Flax variables are named in the reference's PyTorch state_dicts.

Each family states its own rules next to its model, as a class attribute of the
module: `torch_names = TorchNames(...)`. `noah_jax.convert` applies them together
with the rules every model shares (module paths `layer1_0` <-> `layer1.0`, leaf names,
OIHW <-> HWIO, Linear transposes, the NOAH head's grouped kernels). A family whose
Flax names already follow the generic rule (e.g. ResNet: `layer1_0/downsample_1`)
needs no more than its linear head's torch name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class TorchNames:
    """A family's naming rules for conversion.

    renames: top-level Flax module -> torch module, where the generic rule does not
      give the torch name (DeiT: `patch_embed` -> `patch_embed.proj`).
    linear_head / noah_head: the torch module of the baseline head and of the NOAH
      head; the reference's name first (what `flax_to_torch` writes), then aliases that
      public checkpoints use (accepted by `torch_to_flax`, e.g. torchvision's `fc`).
    tokens: (state_dict key, axis) where the number of patch tokens of a model built
      for a given image size shows (a position embedding, a token-mixing weight), so
      that a converted checkpoint gets the image size it was trained at. The model
      must have `patch_size` (the side of one token in pixels) and `img_size`.
    class_token_in_tokens: that count includes a class token when the head reads one
      (`Classifier.head_wants_positions` is False), as DeiT's pos_embed does.
    """

    renames: Mapping[str, str] = dataclasses.field(default_factory=dict)
    linear_head: tuple[str, ...] = ("head",)
    noah_head: tuple[str, ...] = ("head",)
    tokens: Optional[tuple[str, int]] = None
    class_token_in_tokens: bool = False

    def head_names(self, head_wants_positions: bool) -> tuple[str, ...]:
        """The torch names of the head: canonical first, then accepted aliases."""
        return self.noah_head if head_wants_positions else self.linear_head

    def module_renames(self, head_wants_positions: bool) -> dict[str, str]:
        """Top-level renames for a model with this head, the head's own included."""
        return {**self.renames, "head": self.head_names(head_wants_positions)[0]}

    def image_size(self, model, state_dict: Mapping[str, np.ndarray]) -> Optional[int]:
        """The image side a model of this family needs for `state_dict`'s token count,
        or None where the state_dict does not tell (no such key, not a square grid)."""
        if self.tokens is None:
            return None
        key, axis = self.tokens
        value = state_dict.get(key)
        if value is None or np.ndim(value) <= axis:
            return None
        count = np.shape(value)[axis]
        if self.class_token_in_tokens and not model.head_wants_positions:
            count -= 1
        side = math.isqrt(max(count, 0))
        if side == 0 or side * side != count:
            return None
        return side * model.patch_size


GENERIC = TorchNames()
