"""The multi-label demo dataset: canvases of 1 to 4 scikit-learn digits, no download.

Each example is a dark square canvas of image_size x image_size pixels (default 64)
holding 1 to 4 of `load_digits()`'s real 8x8 digits, each enlarged and pasted where
it is fully visible and overlaps no other; its label is the multi-hot float32 [10] of
the digit classes present (a class that occurs twice is still a 1). It runs through
the multi-label machinery of COCO / VOC: sigmoid loss, the 'multilabel' evaluator
(exact mAP, CP/CR/CF1, OP/OR/OF1 at 0.5).

  canvas     S = image_size (>= 32). The number of digits is uniform on 1..4; each
             digit is a source image drawn uniformly from its split, bilinearly
             resized (half-pixel centres, as digits.py) from 8x8 to a side drawn
             uniformly on [round(S/4), round(3S/8)] (16..24 px at 64: 2 to 3 times
             the source), and pasted at a position drawn uniformly among those
             keeping it `margin` = max(1, round(S/16)) px (4 at 64) inside every
             edge. Placement is rejection sampling: candidate boxes (side, top, left)
             are tried in order and one is kept when it shares no pixel with the
             boxes kept before it; a canvas whose 64 candidates of a round did not
             take all its digits starts over with the next 64 (at 64 px, 8.4% of
             the canvases need a second round, none a seventh). Four digits of the
             largest side fit side by side in 2 x 2, so every count can be placed.
             Everything outside the boxes is the background, 0.
  split      by source image: training canvases use only the 1,437 training digits
             of `digits.split_indices()`, test canvases only its 360 test digits, so
             no test digit appears in any training canvas.
  sizes      NUM_TRAIN_CANVASES = 4,000 training and NUM_TEST_CANVASES = 1,000 test
             canvases, holding 10,017 and 2,556 digits: each source digit about 7
             times, at various sides and places. A class is present in about 23% of
             the canvases, so random scores give an mAP near 0.23.
  normalise  x = (grey - mean) / std, grey = level / 16 on [0, 1], with one scalar
             mean and std over every pixel of the training canvases, computed exactly
             from the pasted digits (at 64 px: mean 0.0704, std 0.2022; the
             background, 0, becomes -0.3481); then replicated to 3 channels.
  augment    training batches only: a translation by up to `margin` px on each axis,
             a hash of (seed, position in the training stream) as for DigitsSource.
             It equals padding with the background and cropping back, and since
             every digit lies at least `margin` px inside the edges, no digit is ever
             cut: the label holds. Evaluation is never augmented.

Determinism: a canvas is a function of (CANVAS_KEY, split, its index) alone, through
the counter-based `base.hash_u64`: every run and every seed sees the same canvases
(the seed drives only the training order and the augmentation), and any canvas is
computed on its own (`layout`, `render`).

Cost: only the layouts are kept (four boxes per canvas); canvases are drawn per
batch from them, in numpy, a small part of a demo step. Needs scikit-learn (imported
once) when a source is built; never TensorFlow.
"""

from __future__ import annotations

import numpy as np

from noah_jax.data import base, digits

NUM_TRAIN_CANVASES = 4000
NUM_TEST_CANVASES = 1000
NUM_CLASSES = digits.NUM_CLASSES
MAX_DIGITS = 4
MIN_IMAGE_SIZE = 32  # so that the smallest digit, S/4, is no smaller than its 8 px source
CANVAS_KEY = 0x4D55_4C54_4944_4947  # "MULTIDIG"; fixed forever: the canvases must not move
SPLITS = {"train": 0, "test": 1}     # the split's key in the hashes
CANDIDATES_PER_ROUND = 64
MAX_ROUNDS = 100  # a safety stop; at 64 px no canvas needs more than 6
_COUNT_TAG, _SOURCE_TAG, _BOX_TAG = 0x434F_554E_54, 0x5352_43, 0x424F_58  # COUNT, SRC, BOX


def digit_sizes(image_size: int) -> tuple[int, int]:
    """(smallest, largest) side of a pasted digit on an image_size canvas."""
    return round(image_size / 4), round(3 * image_size / 8)


def margin(image_size: int) -> int:
    """Pixels between any digit and the canvas edge; also the largest training shift."""
    return max(1, round(image_size / 16))


class DigitsMultilabelSource(base.IndexedSource):
    """Canvases of 1 to 4 scikit-learn digits, multi-hot labels; see the module docstring.

    `train_labels` / `eval_labels` are the float32 [n, 10] multi-hot labels,
    `layout(split, index)` says what a canvas holds and where, `render(split, indices)`
    draws canvases on [0, 1] before normalisation, and `images_from_grey` normalises
    any grey S x S pictures as the examples were (what `noah_jax.inference` does with
    image files).
    """

    name = "digits_multilabel"
    multilabel = True
    eval_label_type = base.MULTI_HOT
    num_classes = NUM_CLASSES
    num_train_examples = NUM_TRAIN_CANVASES
    num_eval_examples = NUM_TEST_CANVASES

    def __init__(self, *, seed: int, image_size: int = 64, augment: bool = True):
        from sklearn.datasets import load_digits  # here, so `noah_jax.data` imports without it

        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"digits_multilabel needs image_size >= {MIN_IMAGE_SIZE} (digits "
                             f"of at least their own 8 px), got {image_size}")
        self.seed = seed
        self.image_shape = (image_size, image_size, 3)
        self.class_names = [str(digit) for digit in range(NUM_CLASSES)]  # label k is digit k
        self.augment = augment
        self.min_size, self.max_size = digit_sizes(image_size)
        # The largest training shift is the margin, so no shift cuts a digit off.
        self.margin = self.max_shift = margin(image_size)

        data = load_digits()
        if data.images.shape != (digits.NUM_EXAMPLES, 8, 8):
            raise ValueError(f"load_digits() returned images of shape {data.images.shape}, "
                             f"expected {(digits.NUM_EXAMPLES, 8, 8)}")
        self._grey = np.asarray(data.images, np.float64) / 16.0  # [1797, 8, 8] on [0, 1]
        self._targets = data.target.astype(np.int64)
        self._resize = {size: digits.linear_resize_matrix(8, size)
                        for size in range(self.min_size, self.max_size + 1)}

        train_sources, test_sources = digits.split_indices()
        self._layouts = {
            "train": self._make_layouts("train", NUM_TRAIN_CANVASES, train_sources),
            "test": self._make_layouts("test", NUM_TEST_CANVASES, test_sources)}
        self.train_labels = self._multi_hot(self._layouts["train"])
        self.eval_labels = self._multi_hot(self._layouts["test"])

        # Exact statistics of the training canvases: the background is 0, so the sums
        # over all pixels are the sums over the pasted digits.
        total = total_squares = 0.0
        for _, _, _, resized in self._pasted("train", np.arange(NUM_TRAIN_CANVASES)):
            total += resized.sum()
            total_squares += np.square(resized).sum()
        num_pixels = NUM_TRAIN_CANVASES * image_size * image_size
        mean = total / num_pixels
        self.mean, self.std = float(mean), float(np.sqrt(total_squares / num_pixels - mean**2))
        self.background = np.float32((0.0 - self.mean) / self.std)

    # ------------------------------------------------------------------------------
    # Layouts.
    # ------------------------------------------------------------------------------
    def _make_layouts(self, split: str, num_canvases: int, sources: np.ndarray) -> dict:
        """{'count' [n], 'source', 'top', 'left', 'size' [n, MAX_DIGITS]} (int64; slots
        past a canvas's count hold size 0) of every canvas of `split`."""
        key = SPLITS[split]
        index = np.arange(num_canvases, dtype=np.uint64)
        count = (1 + base.hash_u64(CANVAS_KEY, key, _COUNT_TAG, index)
                 % np.uint64(MAX_DIGITS)).astype(np.int64)
        slots = np.arange(MAX_DIGITS, dtype=np.uint64)
        picks = base.hash_u64(CANVAS_KEY, key, _SOURCE_TAG, index[:, None], slots)
        source = sources[(picks % np.uint64(len(sources))).astype(np.int64)]

        top, left, size = (np.zeros((num_canvases, MAX_DIGITS), np.int64) for _ in range(3))
        todo = np.arange(num_canvases)
        for round_ in range(MAX_ROUNDS):
            t, l, s, placed = self._place(key, todo, count[todo], round_)
            done = placed == count[todo]
            top[todo[done]], left[todo[done]], size[todo[done]] = t[done], l[done], s[done]
            todo = todo[~done]
            if not todo.size:
                break
        else:
            raise RuntimeError(f"{len(todo)} canvases of {split} found no room for their "
                               f"digits in {MAX_ROUNDS} rounds")
        source = np.where(size > 0, source, -1)
        return {"count": count, "source": source, "top": top, "left": left, "size": size}

    def _place(self, key: int, canvases: np.ndarray, count: np.ndarray, round_: int):
        """One round of rejection sampling for `canvases`: (top, left, size [n, MAX_DIGITS],
        number placed [n]) after trying their candidates of this round in order."""
        n, s_img, m = len(canvases), self.image_shape[0], self.margin
        first = round_ * CANDIDATES_PER_ROUND
        k = np.arange(first, first + CANDIDATES_PER_ROUND, dtype=np.uint64)
        bits = base.hash_u64(CANVAS_KEY, key, _BOX_TAG, canvases.astype(np.uint64)[:, None], k)
        field = np.uint64(0xFFFF)  # three 16-bit fields: side, top, left
        num_sides = np.uint64(self.max_size - self.min_size + 1)
        sides = self.min_size + ((bits & field) % num_sides).astype(np.int64)
        span = (s_img - 2 * m - sides + 1).astype(np.uint64)  # positions keeping the margin
        tops = m + (((bits >> np.uint64(16)) & field) % span).astype(np.int64)
        lefts = m + (((bits >> np.uint64(32)) & field) % span).astype(np.int64)

        top, left, size = (np.zeros((n, MAX_DIGITS), np.int64) for _ in range(3))
        placed = np.zeros(n, np.int64)
        rows = np.arange(n)
        for j in range(CANDIDATES_PER_ROUND):
            t, l, s = tops[:, j:j + 1], lefts[:, j:j + 1], sides[:, j:j + 1]
            # Empty slots have size 0 and overlap nothing.
            overlaps = ((top < t + s) & (t < top + size) & (left < l + s) & (l < left + size))
            take = (placed < count) & ~overlaps.any(axis=1)
            at = rows[take], placed[take]
            top[at], left[at], size[at] = t[take, 0], l[take, 0], s[take, 0]
            placed += take
        return top, left, size, placed

    def _multi_hot(self, layouts: dict) -> np.ndarray:
        labels = np.zeros((len(layouts["count"]), NUM_CLASSES), np.float32)
        rows, slots = np.nonzero(layouts["size"] > 0)
        labels[rows, self._targets[layouts["source"][rows, slots]]] = 1.0
        return labels

    def layout(self, split: str, index: int) -> list[tuple[int, int, int, int, int]]:
        """What canvas `index` of `split` ('train' or 'test') holds, before augmentation:
        one (source_index into load_digits(), digit class, top, left, size) per digit,
        the box being rows top..top+size-1 and columns left..left+size-1."""
        layouts = self._split_layouts(split)
        if not 0 <= index < len(layouts["count"]):
            raise IndexError(f"{split} has {len(layouts['count'])} canvases, no index {index}")
        columns = (layouts[key][index] for key in ("source", "top", "left", "size"))
        return [(int(source), int(self._targets[source]), int(top), int(left), int(size))
                for source, top, left, size in zip(*columns) if size > 0]

    def _split_layouts(self, split: str) -> dict:
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self._layouts[split]

    # ------------------------------------------------------------------------------
    # Drawing.
    # ------------------------------------------------------------------------------
    def _pasted(self, split: str, indices: np.ndarray, shifts=None):
        """(batch rows, tops, lefts, resized digits [n, s, s] float64) of every digit of
        canvases `indices`, one tuple per digit side; `shifts` (dy, dx) move each canvas's
        boxes."""
        layouts = self._split_layouts(split)
        source, size = layouts["source"][indices], layouts["size"][indices]
        top, left = layouts["top"][indices], layouts["left"][indices]
        if shifts is not None:
            top, left = top + shifts[0][:, None], left + shifts[1][:, None]
        for side in np.unique(size[size > 0]):
            rows, slots = np.nonzero(size == side)
            w = self._resize[int(side)]
            resized = w @ self._grey[source[rows, slots]] @ w.T  # [n, side, side]
            yield rows, top[rows, slots], left[rows, slots], resized

    def render(self, split: str, indices, shifts=None) -> np.ndarray:
        """Canvases `indices` of `split` ('train' or 'test') as float32 grey [b, S, S] on
        [0, 1] (background 0), before normalisation; `shifts` = (dy, dx), int [b] each,
        translate canvas b by dy[b] rows and dx[b] columns (|shift| <= margin)."""
        indices = np.asarray(indices, np.int64)
        if shifts is not None and np.abs(shifts).max(initial=0) > self.margin:
            raise ValueError(f"shifts of more than the margin, {self.margin} px, would cut "
                             "digits off")
        s = self.image_shape[0]
        canvases = np.zeros((len(indices), s, s), np.float32)
        for rows, tops, lefts, resized in self._pasted(split, indices, shifts):
            side = resized.shape[1]
            r = tops[:, None, None] + np.arange(side)[None, :, None]
            c = lefts[:, None, None] + np.arange(side)[None, None, :]
            canvases[rows[:, None, None], r, c] = resized  # boxes are disjoint
        return canvases

    def images_from_grey(self, grey: np.ndarray) -> np.ndarray:
        """Grey pictures [n, S, S] on [0, 1] (light digits on a dark background) -> the
        model's input float32 [n, S, S, 3], normalised with the training canvases' mean
        and std, as every example of this source is."""
        grey = np.asarray(grey)
        if grey.ndim != 3 or grey.shape[1:] != self.image_shape[:2]:
            raise ValueError(f"expected grey images of shape [n, {self.image_shape[0]}, "
                             f"{self.image_shape[1]}], got {grey.shape}")
        normalised = ((grey - self.mean) / self.std).astype(np.float32)
        return np.repeat(normalised[..., None], 3, axis=-1)

    def shifts(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The training translation (dy, dx), int64 [b] each on [-margin, margin], of
        the examples at these stream positions: a hash of (seed, position), as for
        DigitsSource (`digits.training_shifts`)."""
        return digits.training_shifts(self.seed, positions, self.max_shift)

    def train_examples(self, indices: np.ndarray, positions: np.ndarray) -> base.Batch:
        shifts = self.shifts(positions) if self.augment else None
        grey = self.render("train", indices, shifts)
        return {"image": self.images_from_grey(grey), "label": self.train_labels[indices]}

    def eval_examples(self, indices: np.ndarray) -> base.Batch:
        return {"image": self.images_from_grey(self.render("test", indices)),
                "label": self.eval_labels[indices]}
