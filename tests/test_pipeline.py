"""noah_jax/data/pipeline.py on in-memory records: per-image ops, order, padding, errors."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from noah_jax.data import augment, pipeline  # noqa: E402


def records(images, labels, fmt="jpeg"):
    encode = ((lambda x: tf.io.encode_jpeg(x, quality=100, chroma_downsampling=False))
              if fmt == "jpeg" else tf.io.encode_png)
    encoded = [encode(tf.constant(im)).numpy() for im in images]
    return tf.data.Dataset.from_tensor_slices({"image": tf.constant(encoded),
                                               "label": tf.constant(labels, tf.int32)})


def parse(record):
    return record["image"], record["label"]


def image(h, w, seed):
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = 255 * (0.5 * rows[..., None] + 0.5 * cols[..., None]) * rng.uniform(0.3, 1, 3)
    return base.astype(np.uint8)


def test_jpeg_crop_window_and_png_paths_agree():
    """The same crop (same seed) from a 4:4:4 JPEG (window decode) and from a PNG of
    its decoded pixels: bit-identical, so both branches sample the same box."""
    p = pipeline.Preprocess(image_size=24)
    for k in range(5):
        jpeg = tf.io.encode_jpeg(image(40 + k, 57, k), quality=100, chroma_downsampling=False)
        png = tf.io.encode_png(tf.io.decode_jpeg(jpeg))
        seed = tf.constant([k, 11], tf.int64)
        a = pipeline.train_image(jpeg, seed, p).numpy()
        b = pipeline.train_image(png, seed, p).numpy()
        assert a.shape == (24, 24, 3) and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_resize_modes_squash_the_whole_image():
    pixels = image(30, 50, 0)
    png = tf.io.encode_png(pixels)
    p = pipeline.Preprocess(image_size=20, train_crop="resize", eval_crop="resize",
                            flip=False)
    expected = augment.normalize(augment.resize(tf.constant(pixels), 20, 20)).numpy()
    np.testing.assert_allclose(pipeline.eval_image(png, p), expected, atol=1e-6)
    np.testing.assert_allclose(pipeline.train_image(png, tf.constant([1, 2], tf.int64), p),
                               expected, atol=1e-6)


def test_eval_dataset_pads_with_masked_zeros_in_order():
    images = [image(20, 20 + i, i) for i in range(5)]
    p = pipeline.Preprocess(image_size=16)
    ds = pipeline.eval_dataset(records(images, [3, 1, 4, 1, 5], "png"), 5, parse, p,
                               num_batches=3, local_batch_size=2, label_shape=(),
                               label_dtype=tf.int32)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 3
    labels = np.concatenate([b["label"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(labels, [3, 1, 4, 1, 5, 0])
    np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 0])
    assert not batches[-1]["image"][1].any()
    expected = pipeline.eval_image(tf.io.encode_png(images[2]), p).numpy()
    np.testing.assert_array_equal(batches[1]["image"][0], expected)
    with pytest.raises(ValueError, match="do not fit"):
        pipeline.eval_dataset(records(images, [0] * 5, "png"), 5, parse, p, num_batches=2,
                              local_batch_size=2, label_shape=(), label_dtype=tf.int32)


def test_train_dataset_epochs_seeds_and_errors():
    images = [image(20, 20, i) for i in range(6)]
    labels = list(range(6))
    p = pipeline.Preprocess(image_size=8, flip=False)

    def take(n, start=0, seed=0, process_index=0):
        ds = pipeline.train_dataset([(records(images, labels), 6)], parse, p, seed=seed,
                                    process_index=process_index, start_step=start,
                                    local_batch_size=4, num_classes=6, shuffle_buffer=6)
        it = ds.as_numpy_iterator()
        return [next(it) for _ in range(n)]

    straight = take(6)  # 24 positions = 4 epochs of 6
    stream = np.concatenate([b["label"] for b in straight]).reshape(4, 6)
    assert all(sorted(e) == labels for e in stream)  # every epoch is a permutation
    assert len({tuple(e) for e in stream}) > 1  # reshuffled between epochs
    for a, b in zip(straight[2:], take(4, start=2)):  # resumed mid-epoch
        np.testing.assert_array_equal(a["image"], b["image"])
    other_seed = np.concatenate([b["label"] for b in take(6, seed=1)]).reshape(4, 6)
    other_process = np.concatenate([b["label"] for b in take(6, process_index=1)])
    assert not np.array_equal(stream, other_seed)
    assert not np.array_equal(stream.ravel(), other_process)

    with pytest.raises(ValueError, match="must be even"):
        pipeline.train_dataset([(records(images, labels), 6)], parse,
                               pipeline.Preprocess(image_size=8, mixup_alpha=0.8), seed=0,
                               process_index=0, start_step=0, local_batch_size=3,
                               num_classes=6, shuffle_buffer=6)
    with pytest.raises(ValueError, match="no training records"):
        pipeline.train_dataset([(records(images, labels), 0)], parse, p, seed=0, process_index=0,
                               start_step=0, local_batch_size=2, num_classes=6,
                               shuffle_buffer=6)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        pipeline.Preprocess(image_size=8, repeats=0)


def test_pieces_are_interleaved_in_a_new_random_order_every_epoch():
    """Three pieces (0-3, 4-7, 8-11), no shuffle buffer: every epoch takes each record
    once, in a random interleave that keeps each piece's own order."""
    images = [image(8, 8, i) for i in range(12)]
    pieces = [(records(images[k:k + 4], list(range(k, k + 4)), "png"), 4) for k in (0, 4, 8)]
    p = pipeline.Preprocess(image_size=8, flip=False)

    def stream(start, n):
        ds = pipeline.train_dataset(pieces, parse, p, seed=3, process_index=0,
                                    start_step=start, local_batch_size=4, num_classes=12,
                                    shuffle_buffer=1)
        it = ds.as_numpy_iterator()
        return np.concatenate([next(it)["label"] for _ in range(n)])

    epochs = stream(0, 15).reshape(5, 12)
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))
        for k in (0, 4, 8):
            np.testing.assert_array_equal([x for x in epoch if k <= x < k + 4],
                                          range(k, k + 4))
    assert len({tuple(e) for e in epochs}) == 5
    # Not piece after piece: the first four records come from more than one piece.
    assert any(len({x // 4 for x in e[:4]}) > 1 for e in epochs)
    np.testing.assert_array_equal(stream(7, 8), epochs.ravel()[28:60])  # resumed
