"""tf.data pipelines shared by the TFDS and image-folder sources.

Both sources hand this module their per-process raw records (encoded image bytes plus
label fields, in a fixed order) and a `parse` function record -> (encoded image,
label); for training, the records come as K "pieces" (contiguous sub-splits of the
process's shard: TFDS file ranges, or chunks of a folder's file list). From these it
builds:

  train  pieces -> per-epoch random interleave of the pieces -> shuffle buffer ->
         [repeated augmentation] -> skip to the resume point -> decode + augment
         (parallel, deterministic) -> batch -> [mixup/cutmix] -> prefetch. Endless.
  eval   records -> decode + eval crop -> pad to an equal number of batches on every
         process (mask 0) -> batch -> prefetch. Finite.

Data order and resumption. Process p reads only its own shard (n_p records). Its
training stream is the concatenation of epochs. Epoch e reads every record once: the
next record comes from a piece drawn at random (a stateless shuffle, seeded from
(seed, p, e), of the multiset holding each piece's index once per record of it), so
the whole shard is mixed, not only a buffer's width of neighbouring records; a
shuffle buffer seeded from (seed, p, e) then mixes locally, and each record is
repeated `repeats` times in a row. Step s
takes stream positions [s*b, (s+1)*b). A run resumed at step s rebuilds the stream
from epoch (s*b) // (n_p*repeats) and skips the rest, which reads (but never decodes)
at most one epoch of records, so a resumed run sees exactly the batches an
uninterrupted one would. Augmentation randomness of the example at stream position k
comes from the stateless seed (hash(seed, p), k), and mixup/cutmix of step s from
(hash(seed, p), s): independent of threading and of where the iterator started.
Unlike the in-memory sources, the batch of a step depends on the process count
(every process shuffles its own shard).

TensorFlow runs on the CPU only: `noah_jax.train` hides accelerators from it before
anything here runs.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from noah_jax.data import augment, keep_tensorflow_off_accelerators
from noah_jax.data.base import hash_u64
from noah_jax.data.preprocess import Preprocess

Parse = Callable[[dict], tuple[tf.Tensor, tf.Tensor]]


keep_tensorflow_off_accelerators()

_EXAMPLE_TAG = 0x45584D50  # "EXMP": per-example augmentation seeds
_SHUFFLE_TAG = 0x53485546  # "SHUF": per-epoch shuffle seeds
_MIX_TAG = 0x4D495850      # "MIXP": per-batch mixup/cutmix seeds
_ORDER_TAG = 0x4F524452    # "ORDR": per-epoch interleave order of the pieces

# ----------------------------------------------------------------------------------
# Per-image ops.
# ----------------------------------------------------------------------------------
def decode(encoded: tf.Tensor) -> tf.Tensor:
    """Any image TF reads (JPEG, PNG, GIF's first frame, BMP) -> uint8 [H, W, 3]."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _squash(image: tf.Tensor, size: int) -> tf.Tensor:
    out = augment.resize(image, size, size)
    out.set_shape([size, size, 3])
    return out


def train_image(encoded: tf.Tensor, seed: tf.Tensor, p: Preprocess) -> tf.Tensor:
    """Encoded image -> augmented, normalised float32 [S, S, 3] (`seed`: int [2])."""
    crop_seed, flip_seed, ra_seed, jitter_seed, erase_seed = augment.split_seed(seed, 5)
    size = p.image_size
    if p.train_crop == "inception":
        def crop(x):
            return augment.random_resized_crop(x, crop_seed, size, p.crop_scale, p.crop_ratio)
        # JPEGs decode only the crop window; anything else is decoded whole, then cropped.
        image = tf.cond(tf.io.is_jpeg(encoded), lambda: crop(encoded),
                        lambda: crop(decode(encoded)))
        image.set_shape([size, size, 3])
    else:
        image = _squash(decode(encoded), size)
    if p.flip:
        image = augment.random_flip(image, flip_seed)
    if p.rand_augment_layers > 0:
        image = augment.rand_augment(image, ra_seed, p.rand_augment_layers,
                                     p.rand_augment_magnitude, p.rand_augment_std,
                                     p.rand_augment_increasing)
    if p.color_jitter > 0:
        image = augment.color_jitter(image, jitter_seed, p.color_jitter)
    image = augment.normalize(image)
    if p.random_erasing > 0:
        image = augment.random_erasing(image, erase_seed, p.random_erasing)
    return image


def eval_image(encoded: tf.Tensor, p: Preprocess) -> tf.Tensor:
    """Encoded image -> deterministic eval crop, normalised float32 [S, S, 3]."""
    image = decode(encoded)
    if p.eval_crop == "center":
        image = augment.center_crop_eval(image, p.image_size, p.eval_crop_ratio)
    else:
        image = _squash(image, p.image_size)
    return augment.normalize(image)


# ----------------------------------------------------------------------------------
# Datasets.
# ----------------------------------------------------------------------------------
def _seed_int(*keys) -> int:
    """A nonnegative int63 from integer keys, for TF seeds."""
    return int(hash_u64(*keys) >> np.uint64(1))


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    options.experimental_optimization.map_parallelization = True
    return options


def train_dataset(pieces: Sequence[tuple[tf.data.Dataset, int]], parse: Parse,
                  p: Preprocess, *, seed: int, process_index: int, start_step: int,
                  local_batch_size: int, num_classes: int, shuffle_buffer: int
                  ) -> tf.data.Dataset:
    """This process's endless training batches {'image' f32 [b,S,S,3], 'label'}.

    `pieces`: the process's shard as (records in a fixed order, their exact count)
    pairs; one pair is fine. Labels are int32 [b] (single-label), or float32 [b, K]
    (multi-label, or mixed targets when mixup/cutmix is on).
    """
    pieces = [(ds, int(n)) for ds, n in pieces if n > 0]
    num_records = sum(n for _, n in pieces)
    if num_records < 1:
        raise ValueError(f"process {process_index} has no training records")
    if start_step < 0 or local_batch_size < 1:
        raise ValueError(f"need start_step >= 0 and local_batch_size >= 1, got "
                         f"{start_step}, {local_batch_size}")
    if p.mixes and local_batch_size % 2:
        raise ValueError(f"mixup/cutmix pairs each example with its mirror in the "
                         f"batch; the per-process batch {local_batch_size} must be even")
    epoch_length = num_records * p.repeats
    first = start_step * local_batch_size
    first_epoch, skip = divmod(first, epoch_length)
    shuffle_key = _seed_int(seed, _SHUFFLE_TAG, process_index)
    order_key = _seed_int(seed, _ORDER_TAG, process_index)
    example_key = _seed_int(seed, _EXAMPLE_TAG, process_index)
    mix_key = _seed_int(seed, _MIX_TAG, process_index)
    buffer = max(1, min(shuffle_buffer, num_records))
    datasets = [ds for ds, _ in pieces]
    piece_of_record = np.repeat(np.arange(len(pieces), dtype=np.int64), [n for _, n in pieces])

    def epoch(e):
        key = tf.stack([tf.constant(shuffle_key, tf.int64), e])
        if len(datasets) == 1:
            ds = datasets[0]
        else:
            order = tf.random.experimental.stateless_shuffle(
                tf.constant(piece_of_record), tf.stack([tf.constant(order_key, tf.int64), e]))
            ds = tf.data.Dataset.choose_from_datasets(
                datasets, tf.data.Dataset.from_tensor_slices(order))
        # A full-width hash of (shuffle_key, e): tf.data seeds are int64 scalars.
        s = tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)
        ds = ds.shuffle(buffer, seed=s, reshuffle_each_iteration=False)
        if p.repeats > 1:
            ds = ds.flat_map(lambda r: tf.data.Dataset.from_tensors(r).repeat(p.repeats))
        return ds

    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    ds = ds.skip(skip).enumerate(start=first)

    def example(position, record):
        encoded, label = parse(record)
        seed_ = tf.stack([tf.constant(example_key, tf.int64), position])
        return {"image": train_image(encoded, seed_, p), "label": label}

    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch_size, drop_remainder=True)
    if p.mixes:
        def mix(step, batch):
            seed_ = tf.stack([tf.constant(mix_key, tf.int64), step])
            labels = batch["label"]
            image, target = augment.mixup_cutmix(
                batch["image"], labels, seed_, num_classes=num_classes,
                mixup_alpha=p.mixup_alpha, cutmix_alpha=p.cutmix_alpha,
                switch_prob=p.mix_switch_prob,
                # Multi-hot targets are not smoothed towards a distribution.
                label_smoothing=p.mix_label_smoothing if labels.shape.rank == 1 else 0.0,
                mix_prob=p.mix_prob)
            return {"image": image, "label": target}

        ds = ds.enumerate(start=start_step).map(mix, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_dataset(records: tf.data.Dataset, num_records: int, parse: Parse, p: Preprocess, *,
                 num_batches: int, local_batch_size: int, label_shape: tuple[int, ...],
                 label_dtype: tf.DType) -> tf.data.Dataset:
    """This process's `num_batches` eval batches {'image', 'label', 'mask'}: its
    `num_records` records once (mask 1), then zero padding (mask 0)."""
    padded = num_batches * local_batch_size
    if num_records > padded:
        raise ValueError(f"{num_records} eval records do not fit {num_batches} batches "
                         f"of {local_batch_size}")

    def example(record):
        encoded, label = parse(record)
        return {"image": eval_image(encoded, p), "label": tf.cast(label, label_dtype),
                "mask": tf.constant(1.0)}

    size = p.image_size
    pad = {"image": tf.zeros([size, size, 3]), "label": tf.zeros(label_shape, label_dtype),
           "mask": tf.constant(0.0)}
    ds = records.take(num_records).map(example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(padded - num_records))
    return ds.batch(local_batch_size).prefetch(tf.data.AUTOTUNE).with_options(_options())


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """Iterates a dataset of dicts as numpy arrays."""
    return ds.as_numpy_iterator()
