"""The `Source` interface and the index arithmetic every in-memory source shares.

A source yields host-side numpy batches; `noah_jax.train.sharding.global_batch` turns
each process's part into one global array. Everything here is plain numpy (no
TensorFlow, no jax), so it never touches an accelerator.

Training order. Epoch e visits the training set in `epoch_permutation(seed, e, n)`;
the epochs are concatenated into one endless stream, and the global batch of step s
is stream positions [s*G, (s+1)*G), G = local_batch_size * process_count. Process p
takes positions [s*G + p*b, s*G + (p+1)*b). So the global batch of a step depends
only on (seed, step, G): not on the number of processes, nor on where an iterator
started, which makes resumption exact.

Evaluation order. Global eval batch k covers examples [k*G, (k+1)*G), split between
processes the same way; positions past the end are padding (mask 0). Every process
runs ceil(n / G) batches, and each example appears exactly once with mask 1.

Randomness. Permutations and per-example randomness come from `hash_u64`, a
counter-based hash (the SplitMix64 finaliser), not from numpy's Generator streams:
the same (seed, counters) give the same bits on any machine and numpy version, and
any example's randomness is computed directly, without replaying a stream.
"""

from __future__ import annotations

import functools
from typing import Iterator, Protocol, runtime_checkable

import numpy as np

Batch = dict[str, np.ndarray]

_U64 = 0xFFFF_FFFF_FFFF_FFFF
_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)
_PERMUTATION_TAG = 0x5045_524D  # "PERM": keeps the shuffle apart from other hash uses

# What the 'label' of an evaluation set's batches holds; each evaluator
# (noah_jax.train.evaluators) says which of these it scores.
CLASS_IDS = "class_ids"      # int32 [b]: the image's one class
MULTI_HOT = "multi_hot"      # float32 [b, K]: every class the image shows (COCO, VOC)
REAL_LABELS = "real_labels"  # float32 [b, K]: every class that is a right answer
                             # (ImageNet-ReaL); a row of zeros: none is
LABEL_TYPES = (CLASS_IDS, MULTI_HOT, REAL_LABELS)


@runtime_checkable
class Source(Protocol):
    """A dataset as the trainer sees it: sizes, shapes and two batch iterators."""

    name: str
    num_classes: int
    class_names: list[str]      # label k is class_names[k]; the trainer records them in
                                # each checkpoint's meta, so predictions can name classes
    image_shape: tuple[int, int, int]  # (H, W, 3)
    num_train_examples: int
    num_eval_examples: int
    multilabel: bool            # labels are multi-hot float32 [b, K] (COCO, VOC)
    eval_label_type: str        # what eval_batches' labels hold: one of LABEL_TYPES

    def train_batches(self, *, start_step: int, local_batch_size: int, process_index: int,
                      process_count: int) -> Iterator[Batch]:
        """Endless; yields this process's {'image' f32 [b,H,W,3], 'label'} for steps
        start_step, start_step + 1, ... Labels are int32 [b], or float32 [b, K] (multi-hot,
        or mixup/cutmix targets). The in-memory sources' order is in the module
        docstring; the tf.data sources' in noah_jax/data/pipeline.py."""
        ...

    def eval_batches(self, *, local_batch_size: int, process_index: int,
                     process_count: int) -> Iterator[Batch]:
        """Finite; this process's {'image', 'label', 'mask' f32 1/0} batches, all of
        length local_batch_size and equally many on every process."""
        ...


# ----------------------------------------------------------------------------------
# Counter-based randomness.
# ----------------------------------------------------------------------------------

def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection on uint64 with good avalanche."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58_476D_1CE4_E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D0_49BB_1331_11EB)
    return x ^ (x >> np.uint64(31))


def _as_u64(key) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
        return np.asarray(int(key) & _U64, np.uint64)  # negatives wrap, as in two's complement
    key = np.asarray(key)
    if key.dtype.kind not in "iu":
        raise TypeError(f"hash keys must be integers, got dtype {key.dtype}")
    return key.astype(np.uint64)


def hash_u64(*keys) -> np.ndarray:
    """A uint64 hash of integer keys (ints or arrays, broadcast together)."""
    h = np.zeros((), np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic is meant to wrap
        for key in keys:
            h = _mix64((h + _GOLDEN) ^ _as_u64(key))
    return np.asarray(h)


def hash_uniform(*keys) -> np.ndarray:
    """float32 uniform in [0, 1), from the top 24 bits of `hash_u64(*keys)`."""
    return (hash_u64(*keys) >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


# ----------------------------------------------------------------------------------
# Training order.
# ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order (a permutation of range(num_examples)) in which epoch `epoch` visits
    the training set. Read-only; cached, since consecutive steps share epochs."""
    keys = hash_u64(seed, _PERMUTATION_TAG, epoch, np.arange(num_examples, dtype=np.uint64))
    order = np.argsort(keys, kind="stable").astype(np.int64)
    order.flags.writeable = False
    return order


def check_process_args(local_batch_size: int, process_index: int, process_count: int) -> None:
    if local_batch_size < 1:
        raise ValueError(f"local_batch_size must be >= 1, got {local_batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got process_index="
                         f"{process_index}, process_count={process_count}")


def train_positions(step: int, local_batch_size: int, process_index: int,
                    process_count: int) -> np.ndarray:
    """Stream positions (int64 [b]) of this process's part of step `step`'s batch."""
    global_batch = local_batch_size * process_count
    first = step * global_batch + process_index * local_batch_size
    return np.arange(first, first + local_batch_size, dtype=np.int64)


def train_indices(seed: int, positions: np.ndarray, num_examples: int) -> np.ndarray:
    """Training-set indices at the given stream positions (epochs concatenated)."""
    epochs, offsets = np.divmod(positions, num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        at = epochs == epoch
        indices[at] = epoch_permutation(seed, int(epoch), num_examples)[offsets[at]]
    return indices


def train_index_batches(seed: int, num_examples: int, *, start_step: int, local_batch_size: int,
                        process_index: int, process_count: int
                        ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Endless (step, stream positions, training indices) for this process's parts."""
    check_process_args(local_batch_size, process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if num_examples < 1:
        raise ValueError("the training set is empty")

    def generate():
        step = start_step
        while True:
            positions = train_positions(step, local_batch_size, process_index, process_count)
            yield step, positions, train_indices(seed, positions, num_examples)
            step += 1

    return generate()


# ----------------------------------------------------------------------------------
# Evaluation order.
# ----------------------------------------------------------------------------------

def num_eval_batches(num_examples: int, local_batch_size: int, process_count: int) -> int:
    """Eval batches per process: ceil(num_examples / global batch), the same everywhere."""
    global_batch = local_batch_size * process_count
    return -(-num_examples // global_batch)


def eval_index_batches(num_examples: int, *, local_batch_size: int, process_index: int,
                       process_count: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Finite (indices int64 [b], mask float32 [b]) for this process's eval batches.

    Padding positions point at example 0 (real data, so the model sees ordinary
    numbers) with mask 0.
    """
    check_process_args(local_batch_size, process_index, process_count)
    global_batch = local_batch_size * process_count

    def generate():
        for k in range(num_eval_batches(num_examples, local_batch_size, process_count)):
            first = k * global_batch + process_index * local_batch_size
            positions = np.arange(first, first + local_batch_size, dtype=np.int64)
            valid = positions < num_examples
            yield np.where(valid, positions, 0), valid.astype(np.float32)

    return generate()


class IndexedSource:
    """A source whose examples are addressed by index: the batch order above, once.

    Subclasses set `seed`, `num_train_examples`, `num_eval_examples` and implement
    `train_examples(indices, positions)` (positions: stream positions, for per-example
    randomness) and `eval_examples(indices)`, each returning {'image', 'label'}.
    """

    seed: int
    num_train_examples: int
    num_eval_examples: int
    multilabel = False
    eval_label_type = CLASS_IDS

    def train_examples(self, indices: np.ndarray, positions: np.ndarray) -> Batch:
        raise NotImplementedError

    def eval_examples(self, indices: np.ndarray) -> Batch:
        raise NotImplementedError

    def train_batches(self, *, start_step: int, local_batch_size: int, process_index: int,
                      process_count: int) -> Iterator[Batch]:
        index_batches = train_index_batches(
            self.seed, self.num_train_examples, start_step=start_step,
            local_batch_size=local_batch_size, process_index=process_index,
            process_count=process_count)
        # A generator expression, not `yield`, so bad arguments raise here, not at next().
        return (self.train_examples(indices, positions)
                for _, positions, indices in index_batches)

    def eval_batches(self, *, local_batch_size: int, process_index: int,
                     process_count: int) -> Iterator[Batch]:
        index_batches = eval_index_batches(
            self.num_eval_examples, local_batch_size=local_batch_size,
            process_index=process_index, process_count=process_count)
        return ({**self.eval_examples(indices), "mask": mask} for indices, mask in index_batches)
