"""Synthetic images for benchmarks and smoke tests: any size, any class count, no I/O.

Example i of a split ('train' or 'eval') is a function of (seed, split, i) alone, so
every process split and every resumption point sees the same data:

  label  = hash(seed, split, i) mod num_classes
  grid   = (pattern[label] + noise(seed, split, i)) / sqrt(2)     [g, g, 3], g = min(8, S)
  image  = grid upsampled to S x S by nearest neighbour            float32 [S, S, 3]

`pattern[k]` and the noise are uniform on [-sqrt(3), sqrt(3)] (unit variance), so the
pixels have mean ~0 and variance ~1, and the label is learnable from the image (a
noisy class template), which lets a benchmark's loss go down. Training batches
visit the examples in the shared per-epoch shuffled order (`noah_jax.data.base`).

Cost: the random numbers are per grid cell (g*g*3 = 192 per example); the rest is one
upsampling copy. Imports neither TensorFlow nor scikit-learn, so it runs on bare
accelerator machines.
"""

from __future__ import annotations


import numpy as np

from noah_jax.data import base

DEFAULT_NUM_TRAIN_EXAMPLES = 1024
DEFAULT_NUM_EVAL_EXAMPLES = 256
TRAIN, EVAL = 0, 1  # split keys
_LABEL_TAG, _NOISE_TAG, _PATTERN_TAG = 0x4C41_42, 0x4E4F_4953, 0x5041_54  # LAB, NOIS, PAT
_SQRT3 = np.float32(np.sqrt(3.0))


class SyntheticSource(base.IndexedSource):
    """Random labelled images of shape (image_size, image_size, 3); see the module docstring."""

    name = "synthetic"

    def __init__(self, *, seed: int, image_size: int, num_classes: int,
                 num_train_examples: int = DEFAULT_NUM_TRAIN_EXAMPLES,
                 num_eval_examples: int = DEFAULT_NUM_EVAL_EXAMPLES):
        if image_size < 1 or num_classes < 1:
            raise ValueError(f"need image_size >= 1 and num_classes >= 1, got "
                             f"image_size={image_size}, num_classes={num_classes}")
        if num_train_examples < 1 or num_eval_examples < 1:
            raise ValueError(f"need at least one example per split, got num_train_examples="
                             f"{num_train_examples}, num_eval_examples={num_eval_examples}")
        self.seed = seed
        self.num_classes = num_classes
        self.class_names = [f"class_{k}" for k in range(num_classes)]
        self.image_shape = (image_size, image_size, 3)
        self.num_train_examples = num_train_examples
        self.num_eval_examples = num_eval_examples
        self.grid = min(8, image_size)
        cells = self.grid * self.grid * 3
        self._cells = np.arange(cells, dtype=np.uint64)
        patterns = self._uniform(_PATTERN_TAG, np.arange(num_classes, dtype=np.uint64)[:, None],
                                 self._cells)
        self._patterns = patterns.reshape(num_classes, self.grid, self.grid, 3)
        # Nearest-neighbour upsampling: output pixel p reads grid cell p * g // S.
        self._upsample = (np.arange(image_size) * self.grid) // image_size

    def _uniform(self, *keys) -> np.ndarray:
        """Uniform on [-sqrt(3), sqrt(3)) (unit variance), float32."""
        return (base.hash_uniform(self.seed, *keys) * 2 - 1) * _SQRT3

    def labels(self, split: int, indices: np.ndarray) -> np.ndarray:
        """int32 labels of examples `indices` of `split` (TRAIN or EVAL)."""
        indices = np.asarray(indices).astype(np.uint64)
        return (base.hash_u64(self.seed, _LABEL_TAG, split, indices)
                % np.uint64(self.num_classes)).astype(np.int32)

    def examples(self, split: int, indices: np.ndarray) -> base.Batch:
        """{'image' float32 [b, S, S, 3], 'label' int32 [b]} of examples `indices` of `split`."""
        indices = np.asarray(indices).astype(np.uint64)
        labels = self.labels(split, indices)
        noise = self._uniform(_NOISE_TAG, split, indices[:, None], self._cells)
        grid = self._patterns[labels] + noise.reshape(len(indices), self.grid, self.grid, 3)
        grid *= np.float32(1 / np.sqrt(2.0))
        # Two single-axis gathers are ~2x faster than one 2-D fancy index here.
        images = grid[:, self._upsample][:, :, self._upsample]
        return {"image": images, "label": labels}

    def train_examples(self, indices: np.ndarray, positions: np.ndarray) -> base.Batch:
        del positions  # an example's content depends on its index alone
        return self.examples(TRAIN, indices)

    def eval_examples(self, indices: np.ndarray) -> base.Batch:
        return self.examples(EVAL, indices)
