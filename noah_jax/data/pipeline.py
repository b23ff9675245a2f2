"""tf.data pipelines shared by the TFDS and image-folder sources.

Both sources hand this module their per-process raw records (encoded image bytes plus
label fields, in a fixed order) and a `parse` function record -> (encoded image,
label); for training, the records come as K "pieces" (contiguous sub-splits of the
process's shard: TFDS file ranges, or chunks of a folder's file list). From these it
builds:

  train  pieces -> per-epoch random interleave of the pieces -> [drop images over
         max_image_pixels] -> shuffle buffer -> [repeated augmentation] -> skip to
         the resume point -> decode + augment (parallel, deterministic) -> batch ->
         [mixup/cutmix] -> prefetch. Endless.
  eval   records -> decode + eval crop (an image over max_image_pixels: a mask-0 row
         instead) -> pad to an equal number of batches on every process (mask 0) ->
         batch -> prefetch. Finite.

Images too large to decode. A small file can declare a huge image (a 1.2 MB PNG of
20000 x 20000 pixels decodes to 1.2 GB), so before anything is decoded its size is
read from its headers (`within_pixel_limit`), and one of more than
`Preprocess.max_image_pixels` pixels (dataset.max_image_pixels) is never decoded. In
training it is dropped from every epoch: whether an image is dropped depends on its
bytes alone, so every epoch and every resumed run drops the same ones. Their number,
needed for the epoch length below, comes from the source's record index when it has
one (`noah_jax.data.record_index`: the TFDS source reads each record's headers once
per prepared dataset), else from a pass over the process's records, headers only,
when the pipeline is built. In evaluation its row becomes
padding (mask 0), so every process still runs the same number of batches, the
metrics' count is the number of images actually scored, and `eval_numpy` logs how
many were left out.

Data order and resumption. Process p reads only its own shard (n_p records, m_p of
them within the pixel limit). Its training stream is the concatenation of epochs.
Epoch e reads every record once: the next record comes from a piece drawn at random
(a stateless shuffle, seeded from (seed, p, e), of the multiset holding each piece's
index once per record of it), so the whole shard is mixed, not only a buffer's width
of neighbouring records; the m_p records within the limit pass on to a shuffle
buffer seeded from (seed, p, e), which mixes locally, and each is repeated `repeats`
times in a row. Step s takes stream positions [s*b, (s+1)*b). A run resumed at step
s rebuilds the stream from epoch (s*b) // (m_p*repeats) and skips the rest, which
reads (but never decodes) at most one epoch of records, so a resumed run sees
exactly the batches an uninterrupted one would. Augmentation randomness of the
example at stream position k comes from the stateless seed (hash(seed, p), k), and
mixup/cutmix of step s from (hash(seed, p), s): independent of threading and of where
the iterator started. Unlike the in-memory sources, the batch of a step depends on
the process count (every process shuffles its own shard).

TensorFlow runs on the CPU only: `noah_jax.train.trainer` hides accelerators from it before
anything here runs.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from noah_jax.data import augment, keep_tensorflow_off_accelerators
from noah_jax.data.base import hash_u64
from noah_jax.data.preprocess import Preprocess
from noah_jax.errors import ConfigError, DataError

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


# ----------------------------------------------------------------------------------
# Image sizes from headers: how much memory decoding would take, without decoding.
# ----------------------------------------------------------------------------------
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEADER_BYTES = 26  # through the size fields of PNG (16..24) and BMP (18..26)


def _number(data: tf.Tensor, start: int, count: int, little_endian: bool) -> tf.Tensor:
    """The unsigned integer in bytes [start, start + count) of uint8 `data`, as int64."""
    weights = 256 ** np.arange(count, dtype=np.int64)
    if not little_endian:
        weights = weights[::-1].copy()
    return tf.reduce_sum(tf.cast(data[start:start + count], tf.int64) * weights)


def _gif_size(encoded) -> np.ndarray:
    """int64 [3]: the largest frame height and width of a GIF, and the pixels of all
    its frames, by walking its blocks (in Python, through `tf.numpy_function`).

    The logical screen size at bytes 6..10 is not enough: giflib, which TF decodes
    with, decodes every frame at the size its own descriptor gives (all of them, even
    when only the first is kept), and TF's canvas is the largest frame's height by the
    largest frame's width, whatever the screen says. A walk in TensorFlow ops, one
    tf.while_loop step per 255-byte data sub-block, took longer than decoding.
    Truncated or corrupt bytes end the walk with what it has found.
    """
    data = np.asarray(encoded).item()  # the scalar string's bytes

    def colour_table_bytes(flags):  # bit 7: a table of 2^(k+1) RGB triples follows
        return 3 << ((flags & 7) + 1) if flags & 0x80 else 0

    height = width = pixels = 0
    pos = 13 + colour_table_bytes(data[10]) if len(data) > 10 else len(data)
    while pos < len(data):
        if data[pos] == 0x2C and pos + 10 <= len(data):  # an image descriptor: a frame
            frame_width = int.from_bytes(data[pos + 5:pos + 7], "little")
            frame_height = int.from_bytes(data[pos + 7:pos + 9], "little")
            height, width = max(height, frame_height), max(width, frame_width)
            pixels += frame_height * frame_width
            pos += 11 + colour_table_bytes(data[pos + 9])  # and the LZW code size byte
        elif data[pos] == 0x21:  # an extension and its label
            pos += 2
        else:  # the trailer (0x3B), or bytes that are no block
            break
        while pos < len(data) and data[pos]:  # data sub-blocks, ended by a zero size
            pos += 1 + data[pos]
        pos += 1
    return np.array([height, width, pixels], np.int64)


def _size_from_header(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(height, width, pixels decoding takes) of an encoded image, all int64."""
    head = tf.strings.substr(encoded, 0, _HEADER_BYTES)
    # Zero-padded to its full length, so a short file reads as zeros, not an error.
    head = tf.strings.substr(tf.strings.join([head, bytes(_HEADER_BYTES)]), 0, _HEADER_BYTES)
    data = tf.io.decode_raw(head, tf.uint8)

    def starts_with(prefix):
        return tf.equal(tf.strings.substr(head, 0, len(prefix)), prefix)

    def jpeg():  # the SOF marker, wherever it is; libjpeg reads only up to it
        shape = tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int64)
        return shape[0], shape[1], shape[0] * shape[1]

    def gif():
        # stateful=False: the same bytes give the same answer, so tf.data may run the
        # maps that call it in parallel.
        size = tf.numpy_function(_gif_size, [encoded], tf.int64, stateful=False)
        size.set_shape([3])
        return size[0], size[1], tf.maximum(size[0] * size[1], size[2])

    def png_bmp_or_unknown():
        png = starts_with(_PNG_SIGNATURE) & tf.equal(tf.strings.substr(head, 12, 4), b"IHDR")
        bmp = starts_with(b"BM")
        zero = tf.constant(0, tf.int64)

        def int32(value):
            return tf.where(value >= 2**31, value - 2**32, value)

        # PNG: IHDR, the first chunk, big-endian width then height. BMP: the DIB
        # header's little-endian signed width and height (negative: rows top-down).
        height = tf.where(png, _number(data, 20, 4, False),
                          tf.where(bmp, tf.abs(int32(_number(data, 22, 4, True))), zero))
        width = tf.where(png, _number(data, 16, 4, False),
                         tf.where(bmp, int32(_number(data, 18, 4, True)), zero))
        return height, width, height * width

    return tf.case([(tf.io.is_jpeg(encoded), jpeg), (starts_with(b"GIF8"), gif)],
                   default=png_bmp_or_unknown)


def image_shape_from_header(encoded: tf.Tensor) -> tf.Tensor:
    """int64 [2]: the (height, width) `decode` gives an encoded JPEG, PNG, GIF or BMP,
    read from its headers alone; (0, 0) for bytes of none of these formats."""
    height, width, _ = _size_from_header(encoded)
    return tf.stack([height, width])


def image_pixels_from_header(encoded: tf.Tensor) -> tf.Tensor:
    """int64: the pixels decoding `encoded` takes (every frame of a GIF), read from its
    headers alone; 0 for bytes of no known format."""
    return _size_from_header(encoded)[2]


def within_pixel_limit(encoded: tf.Tensor, max_pixels: int) -> tf.Tensor:
    """bool: decoding `encoded` takes at most `max_pixels` pixels (always True for
    max_pixels = 0, no limit), judged from its headers without decoding it. A GIF
    counts every frame it holds (giflib decodes them all). Bytes of an unknown format
    pass: decoding them fails on its own."""
    if max_pixels <= 0:
        return tf.constant(True)
    return image_pixels_from_header(encoded) <= max_pixels


def _squash(image: tf.Tensor, size: int, method: str, seed=None) -> tf.Tensor:
    out = augment.resize(image, size, size, method, seed)
    out.set_shape([size, size, 3])
    return out


def train_image(encoded: tf.Tensor, seed: tf.Tensor, p: Preprocess) -> tf.Tensor:
    """Encoded image -> augmented, normalised float32 [S, S, 3] (`seed`: int [2])."""
    crop_seed, flip_seed, ra_seed, jitter_seed, erase_seed = augment.split_seed(seed, 5)
    size = p.image_size
    if p.train_crop == "inception":
        def crop(x):
            return augment.random_resized_crop(x, crop_seed, size, p.crop_scale, p.crop_ratio,
                                               interpolation=p.train_interpolation)
        # JPEGs decode only the crop window; anything else is decoded whole, then cropped.
        image = tf.cond(tf.io.is_jpeg(encoded), lambda: crop(encoded),
                        lambda: crop(decode(encoded)))
        image.set_shape([size, size, 3])
    else:
        image = _squash(decode(encoded), size, p.train_interpolation, crop_seed)
    if p.flip:
        image = augment.random_flip(image, flip_seed)
    if p.rand_augment_layers > 0:
        image = augment.rand_augment(image, ra_seed, p.rand_augment_layers,
                                     p.rand_augment_magnitude, p.rand_augment_std,
                                     p.rand_augment_increasing, fill=p.rand_augment_fill)
    if p.color_jitter > 0:
        image = augment.color_jitter(image, jitter_seed, p.color_jitter)
    image = augment.normalize(image, p.mean, p.std)
    if p.random_erasing > 0:
        image = augment.random_erasing(image, erase_seed, p.random_erasing)
    return image


def eval_image(encoded: tf.Tensor, p: Preprocess) -> tf.Tensor:
    """Encoded image -> deterministic eval crop, normalised float32 [S, S, 3]."""
    image = decode(encoded)
    if p.eval_crop == "center":
        image = augment.center_crop_eval(image, p.image_size, p.eval_crop_ratio,
                                         p.eval_interpolation)
    else:
        image = _squash(image, p.image_size, p.eval_interpolation)
    return augment.normalize(image, p.mean, p.std)


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


def _count_over_limit(datasets: Sequence[tf.data.Dataset], parse: Parse,
                      max_pixels: int) -> int:
    """How many of the records hold an image over `max_pixels`: one pass that reads
    the records and the images' headers, decoding nothing."""
    def over(record):
        return tf.cast(tf.logical_not(within_pixel_limit(parse(record)[0], max_pixels)),
                       tf.int64)

    # One dataset, so that the header check is traced once, not once per piece.
    records = functools.reduce(tf.data.Dataset.concatenate, datasets)
    return int(records.map(over, num_parallel_calls=tf.data.AUTOTUNE)
               .reduce(np.int64(0), lambda total, x: total + x))


def train_dataset(pieces: Sequence[tuple[tf.data.Dataset, int]], parse: Parse,
                  p: Preprocess, *, seed: int, process_index: int, start_step: int,
                  local_batch_size: int, num_classes: int, shuffle_buffer: int,
                  check_pixels: bool = True, over_limit: int | None = None
                  ) -> tf.data.Dataset:
    """This process's endless training batches {'image' f32 [b,S,S,3], 'label'}.

    `pieces`: the process's shard as (records in a fixed order, their exact count)
    pairs; one pair is fine. Labels are int32 [b] (single-label), or float32 [b, K]
    (multi-label, or mixed targets when mixup/cutmix is on). `check_pixels=False`:
    the source has checked every image against p.max_image_pixels already (the
    folder source, when it is built), so nothing is counted or dropped here.
    `over_limit`: how many of the pieces' records are over p.max_image_pixels, where
    the source knows (its `record_index`); None counts them here, reading every one.
    """
    pieces = [(ds, int(n)) for ds, n in pieces if n > 0]
    num_records = sum(n for _, n in pieces)
    if num_records < 1:
        raise DataError(f"process {process_index} has no training records")
    _check_batching(p, start_step, local_batch_size)
    datasets = [ds for ds, _ in pieces]
    drop_large = check_pixels and p.max_image_pixels > 0
    if not drop_large:
        too_large = 0
    elif over_limit is not None:
        too_large = int(over_limit)
    else:
        too_large = _count_over_limit(datasets, parse, p.max_image_pixels)
    if too_large == num_records:  # else the endless stream would spin on empty epochs
        raise DataError(f"all {num_records} training images of process {process_index} "
                        f"have more than dataset.max_image_pixels={p.max_image_pixels} "
                        "pixels; raise it (0 = no limit)")
    if too_large:
        logging.warning("process %d: %d of its %d training images have more than "
                        "max_image_pixels=%d pixels; they are left out, never decoded",
                        process_index, too_large, num_records, p.max_image_pixels)
    epoch_length = (num_records - too_large) * p.repeats
    first = start_step * local_batch_size
    first_epoch, skip = divmod(first, epoch_length)
    shuffle_key = _seed_int(seed, _SHUFFLE_TAG, process_index)
    order_key = _seed_int(seed, _ORDER_TAG, process_index)
    buffer = max(1, min(shuffle_buffer, num_records))
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
        if drop_large:
            # After the interleave, whose order counts every record of every piece. The
            # headers are read in parallel (in order), the filter only reads the flag.
            ds = ds.map(lambda r: (r, within_pixel_limit(parse(r)[0], p.max_image_pixels)),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            ds = ds.filter(lambda r, keep: keep).map(lambda r, keep: r)
        # A full-width hash of (shuffle_key, e): tf.data seeds are int64 scalars.
        s = tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)
        ds = ds.shuffle(buffer, seed=s, reshuffle_each_iteration=False)
        if p.repeats > 1:
            ds = ds.flat_map(lambda r: tf.data.Dataset.from_tensors(r).repeat(p.repeats))
        return ds

    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    ds = ds.skip(skip).enumerate(start=first)
    return _examples_to_batches(ds, parse, p, seed=seed, process_index=process_index,
                                start_step=start_step, local_batch_size=local_batch_size,
                                num_classes=num_classes)


def _check_batching(p: Preprocess, start_step: int, local_batch_size: int) -> None:
    """The step and per-process batch a training dataset can start at and form."""
    if start_step < 0 or local_batch_size < 1:
        raise ValueError(f"need start_step >= 0 and local_batch_size >= 1, got "
                         f"{start_step}, {local_batch_size}")
    if p.mixes and local_batch_size % 2:
        raise ConfigError(f"mixup/cutmix pairs each example with its mirror in the "
                          f"batch; the per-process batch {local_batch_size} must be even")


def _examples_to_batches(ds: tf.data.Dataset, parse: Parse, p: Preprocess, *, seed: int,
                         process_index: int, start_step: int, local_batch_size: int,
                         num_classes: int) -> tf.data.Dataset:
    """(stream position, record) pairs, the first at position start_step * batch ->
    decoded, augmented, batched and mixed training batches. The randomness of each
    example and batch comes from its position and step alone."""
    example_key = _seed_int(seed, _EXAMPLE_TAG, process_index)
    mix_key = _seed_int(seed, _MIX_TAG, process_index)

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


# Records read by index at a time: one call into the reader (which reads them in
# parallel, outside Python's lock) per this many records.
READ_CHUNK = 128


def records_by_index(indices: tf.data.Dataset, read: Callable[[np.ndarray], np.ndarray],
                     deserialize: Callable[[tf.Tensor], dict]) -> tf.data.Dataset:
    """The records at `indices` (a dataset of int64 record indices), in that order:
    `read` maps an array of indices to their serialized records, `deserialize` one
    serialized record to its features."""
    def read_chunk(chunk):
        serialized = tf.numpy_function(read, [chunk], tf.string, stateful=False)
        serialized.set_shape([None])
        return serialized

    ds = indices.batch(READ_CHUNK).map(read_chunk, num_parallel_calls=tf.data.AUTOTUNE,
                                       deterministic=True)
    return ds.unbatch().map(deserialize, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)


def random_access_train_dataset(kept: np.ndarray, read: Callable[[np.ndarray], np.ndarray],
                                deserialize: Callable[[tf.Tensor], dict], parse: Parse,
                                p: Preprocess, *, seed: int, process_index: int,
                                start_step: int, local_batch_size: int, num_classes: int
                                ) -> tf.data.Dataset:
    """This process's endless training batches, as `train_dataset`'s, from records read
    by index: `kept` holds the indices of the process's records that are trained on
    (within the pixel limit, labelled where that is asked), `read` and `deserialize`
    are `records_by_index`'s.

    Epoch e visits the kept records in a random permutation of its own (a stateless
    index shuffle seeded from (seed, p, e)), each `repeats` times in a row, so stream
    position k maps to its record by arithmetic: a run resumed at step s starts at
    position s * b and reads nothing before it, and sees exactly the batches an
    uninterrupted run would.
    """
    kept = np.asarray(kept, np.int64)
    if kept.size < 1:
        raise DataError(f"process {process_index} has no training records within "
                        f"dataset.max_image_pixels={p.max_image_pixels}")
    _check_batching(p, start_step, local_batch_size)
    epoch_length = kept.size * p.repeats
    shuffle_key = _seed_int(seed, _SHUFFLE_TAG, process_index)

    def slot_at(position):  # the position's index into `kept`
        epoch, offset = position // epoch_length, position % epoch_length
        return tf.random.experimental.index_shuffle(
            offset // p.repeats, tf.stack([tf.constant(shuffle_key, tf.int64), epoch]),
            tf.constant(kept.size - 1, tf.int64))

    def read_slots(slots):  # `kept` stays in numpy: no graph constant of its size
        return read(kept[slots])

    first = start_step * local_batch_size
    positions = tf.data.Dataset.range(first, np.iinfo(np.int64).max)
    slots = positions.map(slot_at, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = tf.data.Dataset.zip(positions, records_by_index(slots, read_slots, deserialize))
    return _examples_to_batches(ds, parse, p, seed=seed, process_index=process_index,
                                start_step=start_step, local_batch_size=local_batch_size,
                                num_classes=num_classes)


def eval_dataset(records: tf.data.Dataset, num_records: int, parse: Parse, p: Preprocess, *,
                 num_batches: int, local_batch_size: int, label_shape: tuple[int, ...],
                 label_dtype: tf.DType) -> tf.data.Dataset:
    """This process's `num_batches` eval batches {'image', 'label', 'mask'}: its
    `num_records` records once (mask 1; 0 for an image over p.max_image_pixels,
    which is not decoded and reads as padding), then zero padding (mask 0)."""
    padded = num_batches * local_batch_size
    if num_records > padded:
        raise ValueError(f"{num_records} eval records do not fit {num_batches} batches "
                         f"of {local_batch_size}")
    size = p.image_size
    pad = {"image": tf.zeros([size, size, 3]), "label": tf.zeros(label_shape, label_dtype),
           "mask": tf.constant(0.0)}

    def example(record):
        encoded, label = parse(record)
        return tf.cond(within_pixel_limit(encoded, p.max_image_pixels),
                       lambda: {"image": eval_image(encoded, p),
                                "label": tf.cast(label, label_dtype), "mask": tf.constant(1.0)},
                       lambda: pad)

    ds = records.take(num_records).map(example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(padded - num_records))
    return ds.batch(local_batch_size).prefetch(tf.data.AUTOTUNE).with_options(_options())


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """Iterates a dataset of dicts as numpy arrays."""
    return ds.as_numpy_iterator()


def eval_numpy(ds: tf.data.Dataset, num_records: int, p: Preprocess, where: str
               ) -> Iterator[dict[str, np.ndarray]]:
    """An `eval_dataset` of `num_records` records as numpy batches; once they are all
    read, logs how many of those images were not scored for having more than
    p.max_image_pixels pixels (`where` says whose records they are)."""
    scored = 0
    for batch in ds.as_numpy_iterator():
        scored += int(batch["mask"].sum())
        yield batch
    if scored < num_records:
        logging.warning("%s: %d of %d evaluation images were not scored: they have more "
                        "than max_image_pixels=%d pixels (never decoded; their rows are "
                        "masked out, so the evaluation's count leaves them out)", where,
                        num_records - scored, num_records, p.max_image_pixels)
