"""noah_jax/data/pipeline.py on in-memory records: per-image ops, order, padding, errors,
image sizes read from headers and the pixel limit."""

import logging
import struct

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


def test_the_models_normalisation_and_interpolations_reach_the_images():
    # Mixer / gMLP: mean = std = 0.5, bicubic evaluation at crop ratio 0.9, training
    # crops resized bilinear or bicubic at random (the same for a seed, every time).
    pixels = image(45, 60, 3)
    png = tf.io.encode_png(pixels)
    p = pipeline.Preprocess(image_size=24, mean=(0.5,) * 3, std=(0.5,) * 3,
                            eval_interpolation="bicubic", eval_crop_ratio=0.9,
                            train_interpolation="random", flip=False)
    crop = augment.center_crop_eval(tf.constant(pixels), 24, 0.9, "bicubic")
    np.testing.assert_allclose(pipeline.eval_image(png, p),
                               (crop.numpy() / 255.0 - 0.5) / 0.5, atol=1e-6)
    fixed = {m: pipeline.Preprocess(image_size=24, mean=(0.5,) * 3, std=(0.5,) * 3,
                                    train_interpolation=m, flip=False)
             for m in ("bilinear", "bicubic")}
    methods = []
    for k in range(12):
        seed = tf.constant([k, 5], tf.int64)
        out = pipeline.train_image(png, seed, p).numpy()
        np.testing.assert_array_equal(pipeline.train_image(png, seed, p), out)
        same = [m for m, q in fixed.items()
                if np.array_equal(pipeline.train_image(png, seed, q).numpy(), out)]
        assert len(same) == 1, k  # the box is the fixed methods' own, resized one way
        methods.append(same[0])
    assert set(methods) == {"bilinear", "bicubic"}
    # RandAugment fills with the model's mean in uint8, as timm's img_mean.
    assert p.rand_augment_fill == (128, 128, 128)
    assert pipeline.Preprocess(image_size=8).rand_augment_fill == augment.IMAGENET_MEAN_UINT8


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


# ----------------------------------------------------------------------------------
# Image sizes from headers, and the pixel limit.
# ----------------------------------------------------------------------------------
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)


def gif_bytes(frames, screen):
    """A GIF with `screen` = (height, width) as its logical screen and one frame of each
    (height, width) in `frames`, at the top left; pixel i of frame k has PALETTE colour
    (i + k) % 4. The LZW codes stay 3 bits wide: a clear code before every two pixels
    keeps the decoder's table too short to need a fourth bit."""
    out = b"GIF89a" + struct.pack("<HHBBB", screen[1], screen[0], 0x81, 0, 0)
    out += PALETTE.tobytes()  # flags 0x81: a global table of 2^(1+1) colours
    for k, (h, w) in enumerate(frames):
        pixels = [(i + k) % 4 for i in range(h * w)]
        codes = []
        for start in range(0, len(pixels), 2):
            codes += [4, *pixels[start:start + 2]]  # 4: clear; 0-3: a colour
        codes.append(5)  # end of information
        bits = width = 0
        packed = bytearray()
        for code in codes:  # least significant bit first
            bits |= code << width
            width += 3
            while width >= 8:
                packed.append(bits & 0xFF)
                bits, width = bits >> 8, width - 8
        if width:
            packed.append(bits)
        out += b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + bytes([2])  # LZW code size 2
        out += b"".join(bytes([len(packed[i:i + 255])]) + packed[i:i + 255]
                        for i in range(0, len(packed), 255)) + b"\0"
    return out + b";"


def bmp_bytes(pixels, top_down=False):
    """A 24-bit BMP of uint8 [H, W, 3] `pixels` (BGR rows padded to 4 bytes; bottom row
    first, unless `top_down`, which a negative height marks)."""
    h, w, _ = pixels.shape
    rows = pixels[..., ::-1] if top_down else pixels[::-1, :, ::-1]
    data = b"".join(row.tobytes() + bytes(-3 * w % 4) for row in rows)
    info = struct.pack("<IiiHHIIiiII", 40, w, -h if top_down else h, 1, 24, 0, len(data),
                       2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + len(data), 0, 0, 14 + 40) + info + data


def in_graph(fn, encoded):
    """fn(encoded) as a tf.data map computes it (graph mode, as the pipelines run)."""
    return next(tf.data.Dataset.from_tensors(tf.constant(encoded)).map(fn)
                .as_numpy_iterator())


SMALL = image(13, 21, 0)
ENCODED = {
    "png": lambda: tf.io.encode_png(SMALL).numpy(),
    "jpeg": lambda: tf.io.encode_jpeg(SMALL).numpy(),
    "progressive jpeg": lambda: tf.io.encode_jpeg(SMALL, progressive=True).numpy(),
    "gif": lambda: gif_bytes([(13, 21)], screen=(13, 21)),
    # TF decodes at the frames' size, whatever the logical screen says.
    "gif frame smaller than its screen": lambda: gif_bytes([(5, 6)], screen=(13, 21)),
    "gif frame larger than its screen": lambda: gif_bytes([(40, 50)], screen=(13, 21)),
    "gif frames of different shapes": lambda: gif_bytes([(2, 30), (30, 2)], screen=(2, 2)),
    "bmp": lambda: bmp_bytes(SMALL),
    "bmp top-down": lambda: bmp_bytes(SMALL, top_down=True),
}
DECODED_SHAPE = {"gif frame smaller than its screen": (5, 6),
                 "gif frame larger than its screen": (40, 50),
                 "gif frames of different shapes": (30, 30)}


@pytest.mark.parametrize("kind", ENCODED)
def test_image_shape_from_header_is_the_decoded_shape(kind):
    encoded = ENCODED[kind]()
    decoded = pipeline.decode(encoded).numpy()
    assert decoded.shape[:2] == DECODED_SHAPE.get(kind, (13, 21))
    np.testing.assert_array_equal(in_graph(pipeline.image_shape_from_header, encoded),
                                  decoded.shape[:2])
    np.testing.assert_array_equal(pipeline.image_shape_from_header(encoded), decoded.shape[:2])
    if kind in ("png", "bmp", "bmp top-down"):  # lossless: the helpers write real images
        np.testing.assert_array_equal(decoded, SMALL)
    if kind == "gif":
        np.testing.assert_array_equal(decoded, PALETTE[np.arange(13 * 21).reshape(13, 21) % 4])


def test_bytes_of_no_known_format_have_no_size_and_pass_the_limit():
    for data in (b"", b"not an image", b"GIF89a", gif_bytes([(40, 50)], (40, 50))[:30],
                 b"BM\x00"):
        np.testing.assert_array_equal(in_graph(pipeline.image_shape_from_header, data), [0, 0])
        # Decoding them fails on its own, as for any corrupt file.
        assert in_graph(lambda x: pipeline.within_pixel_limit(x, 1), data)


def test_pixel_limit_is_inclusive_and_counts_every_frame_of_a_gif():
    def within(encoded, limit):
        return bool(in_graph(lambda x: pipeline.within_pixel_limit(x, limit), encoded))

    for kind in ("png", "jpeg", "bmp"):  # 13 x 21 = 273 pixels
        encoded = ENCODED[kind]()
        assert within(encoded, 273) and not within(encoded, 272), kind
        assert within(encoded, 0), kind  # no limit
    # giflib decodes all frames, though the pipelines keep the first: 3 x 100 pixels.
    animation = gif_bytes([(10, 10)] * 3, screen=(10, 10))
    assert pipeline.decode(animation).shape == (10, 10, 3)
    assert within(animation, 300) and not within(animation, 299)
    # Frames of 60 pixels each make a 30 x 30 canvas.
    crossed = ENCODED["gif frames of different shapes"]()
    assert within(crossed, 900) and not within(crossed, 899)


def test_train_dataset_leaves_out_images_over_the_limit_and_resumes_exactly(caplog):
    """7 images in 3 pieces; 2 and 5 have 128 pixels, over the limit of 100, so an
    epoch is the other 5, and a resumed run must count epochs of 5, not 7."""
    shapes = [(8, 8), (8, 8), (8, 16), (8, 8), (8, 8), (16, 8), (8, 8)]
    images = [image(h, w, i) for i, (h, w) in enumerate(shapes)]
    pieces = [(records(images[a:b], list(range(a, b)), "png"), b - a)
              for a, b in ((0, 3), (3, 5), (5, 7))]
    p = pipeline.Preprocess(image_size=8, flip=False, max_image_pixels=100)

    def stream(start, steps):
        ds = pipeline.train_dataset(pieces, parse, p, seed=5, process_index=0,
                                    start_step=start, local_batch_size=4, num_classes=7,
                                    shuffle_buffer=3)
        it = ds.as_numpy_iterator()
        return [next(it) for _ in range(steps)]

    with caplog.at_level(logging.WARNING):
        straight = stream(0, 10)  # 40 positions: 8 epochs of 5
    assert ("process 0: 2 of its 7 training images have more than max_image_pixels=100 "
            "pixels") in caplog.text
    epochs = np.concatenate([b["label"] for b in straight]).reshape(8, 5)
    for epoch in epochs:
        assert sorted(epoch) == [0, 1, 3, 4, 6]
    assert len({tuple(e) for e in epochs}) > 1
    for start in (1, 3, 6):  # steps 3 and 6 start in epochs 2 and 4 (of 5 records)
        for a, b in zip(straight[start:], stream(start, 2)):
            np.testing.assert_array_equal(a["label"], b["label"])
            np.testing.assert_array_equal(a["image"], b["image"])

    with pytest.raises(ValueError, match=r"all 7 training images of process 0 have more than "
                                         r"dataset.max_image_pixels=10 pixels"):
        pipeline.train_dataset(pieces, parse, pipeline.Preprocess(image_size=8,
                                                                  max_image_pixels=10),
                               seed=0, process_index=0, start_step=0, local_batch_size=4,
                               num_classes=7, shuffle_buffer=3)


def test_eval_dataset_masks_images_over_the_limit_and_reports_them(caplog):
    shapes = [(8, 8), (8, 16), (8, 8), (16, 16), (10, 10)]
    images = [image(h, w, i) for i, (h, w) in enumerate(shapes)]
    p = pipeline.Preprocess(image_size=8, max_image_pixels=100)
    ds = pipeline.eval_dataset(records(images, [3, 1, 4, 1, 5], "png"), 5, parse, p,
                               num_batches=3, local_batch_size=2, label_shape=(),
                               label_dtype=tf.int32)
    with caplog.at_level(logging.WARNING):
        batches = list(pipeline.eval_numpy(ds, 5, p, "the test's records"))
    assert len(batches) == 3  # as without the limit: every process runs the same count
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    images_out = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(mask, [1, 0, 1, 0, 1, 0])  # 128 and 256 pixels: out
    np.testing.assert_array_equal(labels, [3, 0, 4, 0, 5, 0])
    assert not images_out[mask == 0].any()
    for row, index in ((0, 0), (2, 2), (4, 4)):
        expected = pipeline.eval_image(tf.io.encode_png(images[index]), p).numpy()
        np.testing.assert_array_equal(images_out[row], expected)
    assert ("the test's records: 2 of 5 evaluation images were not scored: they have more "
            "than max_image_pixels=100 pixels") in caplog.text
