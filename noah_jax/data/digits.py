"""The demo dataset: scikit-learn's handwritten digits, embedded, no download.

`sklearn.datasets.load_digits()` ships 1,797 grey 8x8 images (values 0..16) of the
digits 0-9. Here they become a small image-classification task in the shape the
trainer expects:

  split      fixed, independent of the run seed: the 360 examples with the smallest
             `hash_u64(DIGITS_SPLIT_KEY, index)` are the test set; the other 1,437 are
             the training set (both kept in the original order). About 80 / 20.
  resize     bilinear (half-pixel centres, edges clamped) from 8x8 to
             image_size x image_size (default 32), once at load time; then
             replicated to 3 channels.
  normalise  x = (pixel / 16 - mean) / std with one scalar mean and std, computed
             at load time over every pixel of the resized training split (at 32 px:
             mean 0.3055, std 0.3234; the background, 0, becomes -0.9446).
  augment    training batches only: a random translation by up to `max_shift`
             = max(1, round(image_size / 16)) pixels on each axis (2 at 32 px): pad
             with the background value, crop back. The shift of an example is a hash
             of (seed, its position in the training stream), so it is the same
             whatever the process split or the step a run resumed at.

Importing this module needs scikit-learn only when a DigitsSource is built, and
never TensorFlow.
"""

from __future__ import annotations


import numpy as np

from noah_jax.data import base

NUM_EXAMPLES = 1797
NUM_TEST_EXAMPLES = 360
NUM_TRAIN_EXAMPLES = NUM_EXAMPLES - NUM_TEST_EXAMPLES  # 1437
NUM_CLASSES = 10
DIGITS_SPLIT_KEY = 0x4449_4749_5453  # "DIGITS"; fixed forever: the split must not move
_AUGMENT_TAG = 0x5348_4946_54  # "SHIFT"


def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of 1-D linear interpolation, half-pixel centres.

    Output pixel i samples the input at (i + 0.5) * in_size / out_size - 0.5, clamped
    to [0, in_size - 1]; for upsampling this is what jax.image.resize 'linear' does.
    """
    centres = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    centres = np.clip(centres, 0, in_size - 1)
    lower = np.floor(centres).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = centres - lower
    weights = np.zeros((out_size, in_size))
    np.add.at(weights, (np.arange(out_size), lower), 1 - frac)
    np.add.at(weights, (np.arange(out_size), upper), frac)
    return weights


def area_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of area (box) resampling: output pixel i is the mean
    of the input over its span [i, i + 1) * in_size / out_size, each input pixel
    weighted by how much of it lies in that span. Identity when the sizes are equal;
    what shrinks an image of any size to the digits' 8x8 without skipping pixels."""
    scale = in_size / out_size
    starts, ends = np.arange(out_size) * scale, (np.arange(out_size) + 1) * scale
    pixels = np.arange(in_size)
    overlap = np.clip(np.minimum(ends[:, None], pixels[None, :] + 1)
                      - np.maximum(starts[:, None], pixels[None, :]), 0, None)
    return overlap / scale


def training_shifts(seed: int, positions: np.ndarray,
                    max_shift: int) -> tuple[np.ndarray, np.ndarray]:
    """The translation (dy, dx), int64 [b] each on [-max_shift, max_shift], of the
    training examples at these stream positions: a hash of (seed, position), so the same
    whatever the process split or the step a run resumed at. Both digit sources use it."""
    span = np.uint64(2 * max_shift + 1)
    bits = base.hash_u64(seed, _AUGMENT_TAG, np.asarray(positions))
    dy = (bits % span).astype(np.int64) - max_shift
    dx = ((bits >> np.uint64(32)) % span).astype(np.int64) - max_shift
    return dy, dx


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into load_digits(), disjoint, each in increasing order."""
    keys = base.hash_u64(DIGITS_SPLIT_KEY, np.arange(NUM_EXAMPLES, dtype=np.uint64))
    order = np.argsort(keys, kind="stable")
    return np.sort(order[NUM_TEST_EXAMPLES:]), np.sort(order[:NUM_TEST_EXAMPLES])


class DigitsSource(base.IndexedSource):
    """scikit-learn's digits at image_size x image_size x 3; see the module docstring.

    `train_images` / `eval_images` hold the normalised, un-augmented float32
    [n, H, W, 3] arrays and `train_labels` / `eval_labels` the int32 labels;
    `class_names` are '0'..'9'. `images_from_levels` applies the same transform to
    new 8x8 digits (what `noah_jax.inference` does with image files).
    """

    name = "digits"
    num_classes = NUM_CLASSES
    num_train_examples = NUM_TRAIN_EXAMPLES
    num_eval_examples = NUM_TEST_EXAMPLES

    def __init__(self, *, seed: int, image_size: int = 32, augment: bool = True):
        from sklearn.datasets import load_digits  # here, so `noah_jax.data` imports without it

        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.seed = seed
        self.image_shape = (image_size, image_size, 3)
        self.class_names = [str(digit) for digit in range(NUM_CLASSES)]  # label k is digit k
        self.augment = augment
        self.max_shift = max(1, round(image_size / 16))

        digits = load_digits()
        levels = digits.images  # [1797, 8, 8], grey levels 0..16
        if levels.shape != (NUM_EXAMPLES, 8, 8):
            raise ValueError(f"load_digits() returned images of shape {levels.shape}, "
                             f"expected {(NUM_EXAMPLES, 8, 8)}")
        self._resize = linear_resize_matrix(8, image_size)
        resized = self._resized(levels)  # [1797, S, S]

        train, test = split_indices()
        self.mean = float(resized[train].mean())
        self.std = float(resized[train].std())
        self.background = np.float32((0.0 - self.mean) / self.std)
        images = self._normalised(resized)  # [1797, S, S, 3]
        labels = digits.target.astype(np.int32)

        self.train_images, self.train_labels = images[train], labels[train]
        self.eval_images, self.eval_labels = images[test], labels[test]
        s = self.max_shift
        # Padded once; a translated image is then a crop of its padded copy.
        self._padded_train = np.pad(self.train_images, ((0, 0), (s, s), (s, s), (0, 0)),
                                    constant_values=self.background)

    def _resized(self, levels: np.ndarray) -> np.ndarray:
        """Grey levels [n, 8, 8] (0..16) -> float64 [n, S, S] on [0, 1], bilinear."""
        raw = np.asarray(levels, np.float64) / 16.0
        return np.einsum("hi,nij,wj->nhw", self._resize, raw, self._resize)

    def _normalised(self, resized: np.ndarray) -> np.ndarray:
        normalised = ((resized - self.mean) / self.std).astype(np.float32)
        return np.repeat(normalised[..., None], 3, axis=-1)

    def images_from_levels(self, levels: np.ndarray) -> np.ndarray:
        """Any 8x8 grey images, as levels 0..16 [n, 8, 8], -> the model's input, float32
        [n, S, S, 3]: the transform every example of this source went through (resize,
        then the training split's mean and std), for predicting on new digits."""
        levels = np.asarray(levels)
        if levels.ndim != 3 or levels.shape[1:] != (8, 8):
            raise ValueError(f"expected grey levels of shape [n, 8, 8], got {levels.shape}")
        return self._normalised(self._resized(levels))

    def _shifted(self, indices: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Training images `indices`, each translated by a hash of (seed, position)."""
        h, w, _ = self.image_shape
        dy, dx = training_shifts(self.seed, positions, self.max_shift)
        # The crop of the padded copy at offset (max_shift + dy, max_shift + dx).
        rows = (self.max_shift + dy)[:, None, None] + np.arange(h)[None, :, None]  # [b, H, 1]
        cols = (self.max_shift + dx)[:, None, None] + np.arange(w)[None, None, :]  # [b, 1, W]
        return self._padded_train[indices[:, None, None], rows, cols]  # [b, H, W, 3]

    def train_examples(self, indices: np.ndarray, positions: np.ndarray) -> base.Batch:
        if self.augment:
            images = self._shifted(indices, positions)
        else:
            images = self.train_images[indices]
        return {"image": images, "label": self.train_labels[indices]}

    def eval_examples(self, indices: np.ndarray) -> base.Batch:
        return {"image": self.eval_images[indices], "label": self.eval_labels[indices]}
