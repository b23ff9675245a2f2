"""Tests of noah_jax/data/augment.py: every op eagerly and inside tf.data.Dataset.map."""

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from noah_jax.data import augment  # noqa: E402

SEEDS = np.stack([np.arange(200), np.arange(200) * 7 + 3], axis=1).astype(np.int32)


def _seed(i):
    return tf.constant(SEEDS[i])


def _in_dataset(fn, *tensors):
    """fn mapped over the first axis of `tensors` inside tf.data; numpy results."""
    ds = tf.data.Dataset.from_tensor_slices(tensors).map(fn)
    return list(ds.as_numpy_iterator())


def _gradient_image(height, width):
    """uint8 image with R = row, G = column, B = 7 * (row + column) mod 256."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows, cols, (7 * (rows + cols)) % 256], axis=-1).astype(np.uint8)


def _random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --------------------------------------------------------------------- inception crop
@pytest.mark.parametrize("shape", [(64, 48), (37, 100), (224, 224)])
def test_crop_box_inside_image_and_ranges(shape):
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    height, width = shape
    boxes = np.stack(_in_dataset(lambda s: augment.sample_crop_box(shape, s, scale, ratio),
                                 SEEDS))
    for i in range(3):  # eager == inside tf.data
        np.testing.assert_array_equal(augment.sample_crop_box(shape, _seed(i), scale, ratio),
                                      boxes[i])
    top, left, h, w = boxes.T.astype(np.float64)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # w = round(sqrt(A r)), h = round(sqrt(A / r)) for some A in scale * HW, r in ratio.
    area = height * width
    assert ((h - 0.5) * (w - 0.5) <= scale[1] * area).all()
    assert ((h + 0.5) * (w + 0.5) >= scale[0] * area).all()
    assert ((w - 0.5) / (h + 0.5) <= ratio[1]).all()
    assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all()
    if shape == (224, 224):  # rounding is negligible here: the ranges themselves hold
        frac = h * w / area
        assert frac.min() >= 0.075 and frac.max() <= 1.0
        assert frac.min() < 0.2 and frac.max() > 0.8  # the range is really explored
        assert len(np.unique(boxes, axis=0)) > 190


def test_crop_box_falls_back_to_centre_crop():
    # No box of >= 90% of a 4 x 400 strip has an aspect ratio in [3/4, 4/3].
    for i in range(20):
        box = augment.sample_crop_box((4, 400), _seed(i), scale=(0.9, 1.0))
        np.testing.assert_array_equal(box, [0, (400 - 5) // 2, 4, 5])  # w = round(4 * 4/3)
        box = augment.sample_crop_box((400, 4), _seed(i), scale=(0.9, 1.0))
        np.testing.assert_array_equal(box, [(400 - 5) // 2, 0, 5, 4])  # h = round(4 / (3/4))


def test_random_resized_crop_dtype_shape_identity_and_seeds():
    image = _random_image(40, 40)
    # The whole image (scale 1, ratio 1) resized to its own size is the identity.
    out = augment.random_resized_crop(tf.constant(image), _seed(0), 40, scale=(1, 1),
                                      ratio=(1, 1))
    np.testing.assert_array_equal(out, image)
    out = augment.random_resized_crop(tf.constant(image), _seed(0), 24)
    assert out.dtype == tf.uint8 and out.shape == (24, 24, 3)
    out_f = augment.random_resized_crop(tf.constant(image, tf.float32) / 255, _seed(0), 24)
    assert out_f.dtype == tf.float32 and out_f.shape == (24, 24, 3)
    np.testing.assert_allclose(out_f * 255, out, atol=0.51)  # same box, same resize
    np.testing.assert_array_equal(augment.random_resized_crop(tf.constant(image), _seed(0), 24),
                                  out)
    assert not np.array_equal(augment.random_resized_crop(tf.constant(image), _seed(1), 24),
                              out)
    in_ds = _in_dataset(lambda im, s: augment.random_resized_crop(im, s, 24),
                        np.stack([image] * 3), SEEDS[:3])
    np.testing.assert_array_equal(in_ds[0], out)


def _smooth_image_with_an_edge(height, width):
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    image = np.stack([128 + 100 * np.sin(2 * np.pi * (1.3 * x + 0.4 * y)),
                      128 + 90 * np.cos(2 * np.pi * 0.7 * y), 60 + 150 * x * y], axis=-1)
    image[(x > 0.55) & (y > 0.3)] = (240, 20, 30)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_random_resized_crop_resizes_as_pil(interpolation):
    # torchvision's resized_crop on a PIL image: crop the box, resize it with the filter.
    from PIL import Image

    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    image = _smooth_image_with_an_edge(90, 120)
    for i in range(8):  # boxes from 8% to all of the image: shrunk and enlarged to 48
        top, left, h, w = augment.sample_crop_box(image.shape, _seed(i)).numpy()
        expected = np.asarray(Image.fromarray(image).crop((left, top, left + w, top + h))
                              .resize((48, 48), resample), np.float64)
        out = augment.random_resized_crop(tf.constant(image), _seed(i), 48,
                                          interpolation=interpolation).numpy()
        assert np.abs(out - expected).max() <= 1  # TF vs PIL resampling: one grey level


def test_random_interpolation_is_bilinear_or_bicubic_per_seed_and_deterministic():
    # timm's RandomResizedCropAndInterpolation(interpolation='random'): per image, one of
    # the two, equally likely; here drawn from the example's seed, the box unchanged.
    image = _smooth_image_with_an_edge(60, 50)
    count = 60
    outs = _in_dataset(lambda im, s: augment.random_resized_crop(im, s, 24,
                                                                 interpolation="random"),
                       np.stack([image] * count), SEEDS[:count])
    bicubic = []
    for i, out in enumerate(outs):
        by = {m: augment.random_resized_crop(tf.constant(image), _seed(i), 24,
                                             interpolation=m).numpy()
              for m in ("bilinear", "bicubic")}
        assert not np.array_equal(by["bilinear"], by["bicubic"])
        assert np.array_equal(out, by["bilinear"]) or np.array_equal(out, by["bicubic"]), i
        bicubic.append(np.array_equal(out, by["bicubic"]))
        if i < 5:  # eager == inside tf.data, and again the same
            for _ in range(2):
                np.testing.assert_array_equal(augment.random_resized_crop(
                    tf.constant(image), _seed(i), 24, interpolation="random"), out)
    assert 15 < sum(bicubic) < 45  # both, about half each (P(outside) < 1e-4)
    with pytest.raises(ValueError, match="unknown interpolation 'nearest'"):
        augment.random_resized_crop(tf.constant(image), _seed(0), 24, interpolation="nearest")


def _jpeg(image, chroma_downsampling):
    return tf.io.encode_jpeg(image, quality=95, chroma_downsampling=chroma_downsampling)


def test_decode_and_crop_jpeg_equals_crop_after_decode():
    image = _gradient_image(45, 61)
    encoded = _jpeg(image, chroma_downsampling=False)  # 4:4:4: the fast path is exact
    decoded = tf.io.decode_jpeg(encoded, channels=3)
    fast = _in_dataset(lambda s: augment.random_resized_crop(encoded, s, 32), SEEDS[:20])
    for i in range(20):
        slow = augment.random_resized_crop(decoded, _seed(i), 32)
        np.testing.assert_array_equal(fast[i], slow)
    np.testing.assert_array_equal(augment.random_resized_crop(encoded, _seed(0), 32), fast[0])
    # 4:2:0 (typical ImageNet files): only pixels by the window's border may differ.
    encoded = _jpeg(_random_image(45, 61), chroma_downsampling=True)
    decoded = tf.io.decode_jpeg(encoded, channels=3)
    for i in range(5):
        fast = augment.random_resized_crop(encoded, _seed(i), 32).numpy().astype(int)
        slow = augment.random_resized_crop(decoded, _seed(i), 32).numpy().astype(int)
        assert fast.shape == slow.shape == (32, 32, 3)
        assert np.abs(fast - slow).mean() < 8


# ------------------------------------------------------------------------------ flip
def test_random_flip_is_exact_mirror_or_identity():
    image = _random_image(9, 13)
    outs = _in_dataset(augment.random_flip, np.stack([image] * 40), SEEDS[:40])
    flipped = [np.array_equal(o, image[:, ::-1]) for o in outs]
    kept = [np.array_equal(o, image) for o in outs]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 5 < sum(flipped) < 35
    for i in range(3):
        np.testing.assert_array_equal(augment.random_flip(tf.constant(image), _seed(i)), outs[i])


# ----------------------------------------------------------------------- eval crop
def test_center_crop_eval_offsets_round_half_to_even():
    # size 7, ratio 0.875 -> shorter side int(8.0) = 8: an 8 x 12 image is not resized,
    # and the offsets are round(0.5) = 0 and round(2.5) = 2, as Python rounds.
    image = _gradient_image(8, 12)
    out = augment.center_crop_eval(tf.constant(image), 7)
    np.testing.assert_array_equal(out, image[0:7, 2:9])
    out = augment.center_crop_eval(tf.constant(image.transpose(1, 0, 2)), 7)
    np.testing.assert_array_equal(out, image.transpose(1, 0, 2)[2:9, 0:7])


@pytest.mark.parametrize("shape,crop_ratio,resized", [
    ((64, 96), 0.875, (36, 54)),    # int(32 / 0.875) = 36, int(36 * 96 / 64) = 54
    ((100, 70), 0.9, (50, 35)),     # int(32 / 0.9) = 35, int(35 * 100 / 70) = 50
    ((33, 33), 0.875, (36, 36)),
])
def test_center_crop_eval_is_resize_then_centre_crop(shape, crop_ratio, resized):
    image = _gradient_image(*shape)
    out = augment.center_crop_eval(tf.constant(image), 32, crop_ratio)
    assert out.shape == (32, 32, 3) and out.dtype == tf.uint8
    full = tf.image.resize(image, resized, antialias=True)
    full = np.round(np.clip(full.numpy(), 0, 255)).astype(np.uint8)
    top, left = round((resized[0] - 32) / 2), round((resized[1] - 32) / 2)
    np.testing.assert_array_equal(out, full[top:top + 32, left:left + 32])
    # Centred: the gradient's mean row / column lands in the middle of the crop.
    scale_r, scale_c = shape[0] / resized[0], shape[1] / resized[1]
    centre_r = (top + 15.5 + 0.5) * scale_r - 0.5
    centre_c = (left + 15.5 + 0.5) * scale_c - 0.5
    assert abs(out.numpy()[..., 0].mean() - centre_r) < 1.0
    assert abs(out.numpy()[..., 1].mean() - centre_c) < 1.0


def test_center_crop_eval_interpolates_as_asked():
    image = _smooth_image_with_an_edge(64, 96)
    for method in ("bilinear", "bicubic"):
        out = augment.center_crop_eval(tf.constant(image), 32, 0.875, method)
        full = tf.image.resize(image, (36, 54), method=method, antialias=True)
        full = np.round(np.clip(full.numpy(), 0, 255)).astype(np.uint8)
        np.testing.assert_array_equal(out, full[2:34, 11:43])  # offsets round(2), round(11)


def test_center_crop_eval_encoded_and_in_dataset():
    image = _random_image(50, 70)
    encoded = _jpeg(image, chroma_downsampling=True)
    decoded = tf.io.decode_jpeg(encoded, channels=3)
    expected = augment.center_crop_eval(decoded, 32)
    np.testing.assert_array_equal(augment.center_crop_eval(encoded, 32), expected)
    (in_ds,) = _in_dataset(lambda e: augment.center_crop_eval(e, 32), tf.stack([encoded]))
    np.testing.assert_array_equal(in_ds, expected)


# ----------------------------------------------------------------------- normalise
def test_normalize_matches_numpy():
    image = _random_image(5, 6)
    expected = ((image / 255.0 - np.array(augment.IMAGENET_MEAN))
                / np.array(augment.IMAGENET_STD))
    out = augment.normalize(tf.constant(image))
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(augment.normalize(tf.constant(image / 255.0, tf.float32)),
                               expected, rtol=1e-5, atol=1e-5)
    (in_ds,) = _in_dataset(augment.normalize, image[None])
    np.testing.assert_allclose(in_ds, expected, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------- RandAugment ops
def test_pixel_ops_against_numpy():
    image = _random_image(11, 14)
    x = tf.constant(image)
    i32 = image.astype(np.int32)
    np.testing.assert_array_equal(augment.invert(x), 255 - image)
    for threshold in (0, 100, 128, 256):
        np.testing.assert_array_equal(augment.solarize(x, threshold),
                                      np.where(i32 < threshold, i32, 255 - i32))
    np.testing.assert_array_equal(augment.solarize_add(x, 40),
                                  np.where(i32 < 128, np.minimum(i32 + 40, 255), i32))
    for bits in range(9):
        mask = (0xFF << (8 - bits)) & 0xFF
        np.testing.assert_array_equal(augment.posterize(x, bits), image & mask)
    for factor in (0.0, 0.3, 1.0, 1.7):
        expected = np.floor(np.clip(image.astype(np.float32) * np.float32(factor), 0, 255))
        np.testing.assert_array_equal(augment.brightness(x, factor), expected)
    fill = (1, 2, 3)
    for pixels in (3, -4):
        out = augment.translate_x(x, pixels, fill).numpy()
        shifted = np.full_like(image, 0) + np.array(fill, np.uint8)
        if pixels > 0:
            shifted[:, :-pixels] = image[:, pixels:]
        else:
            shifted[:, -pixels:] = image[:, :pixels]
        np.testing.assert_array_equal(out, shifted)
        out = augment.translate_y(x, pixels, fill).numpy()
        shifted = np.full_like(image, 0) + np.array(fill, np.uint8)
        if pixels > 0:
            shifted[:-pixels] = image[pixels:]
        else:
            shifted[-pixels:] = image[:pixels]
        np.testing.assert_array_equal(out, shifted)
    square = image[:11, :11]
    np.testing.assert_array_equal(augment.rotate(tf.constant(square), 90), np.rot90(square))
    np.testing.assert_array_equal(augment.rotate(x, 0), image)


def test_ops_against_pillow():
    Image = pytest.importorskip("PIL.Image")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
    image = _random_image(21, 26, seed=1)
    image[..., 1] = image[..., 1] // 2 + 40  # a channel not spanning [0, 255]
    x, pil = tf.constant(image), Image.fromarray(image)
    exact = {
        "autocontrast": (augment.auto_contrast(x), ImageOps.autocontrast(pil)),
        "equalize": (augment.equalize(x), ImageOps.equalize(pil)),
    }
    for f in (0.1, 0.6, 1.7):
        exact[f"color{f}"] = (augment.color(x, f), ImageEnhance.Color(pil).enhance(f))
        exact[f"contrast{f}"] = (augment.contrast(x, f), ImageEnhance.Contrast(pil).enhance(f))
        exact[f"sharpness{f}"] = (augment.sharpness(x, f),
                                  ImageEnhance.Sharpness(pil).enhance(f))
    for name, (ours, ref) in exact.items():
        np.testing.assert_array_equal(ours, np.asarray(ref), err_msg=name)
    fill = augment.IMAGENET_MEAN_UINT8
    close = {
        "rotate": (augment.rotate(x, 17.0), pil.rotate(17.0, Image.BILINEAR, fillcolor=fill)),
        "shear_x": (augment.shear_x(x, 0.3), pil.transform(
            pil.size, Image.AFFINE, (1, 0.3, 0, 0, 1, 0), Image.BILINEAR, fillcolor=fill)),
        "shear_y": (augment.shear_y(x, -0.17), pil.transform(
            pil.size, Image.AFFINE, (1, 0, 0, -0.17, 1, 0), Image.BILINEAR, fillcolor=fill)),
        "translate": (augment.translate_x(x, 4.4), pil.transform(
            pil.size, Image.AFFINE, (1, 0, 4.4, 0, 1, 0), Image.BILINEAR, fillcolor=fill)),
    }
    for name, (ours, ref) in close.items():
        diff = np.abs(ours.numpy().astype(int) - np.asarray(ref).astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.1, name


def test_rand_augment_deterministic_ops_and_identity():
    image = _random_image(16, 20)
    x = tf.constant(image)
    one = augment.rand_augment(x, _seed(0), num_layers=1, ops=["Invert"], probability=1.0)
    np.testing.assert_array_equal(one, 255 - image)
    two = augment.rand_augment(x, _seed(0), num_layers=2, ops=["Invert"], probability=1.0)
    np.testing.assert_array_equal(two, image)
    # At level 0 these ops are the identity (increasing variants: solarize threshold 256,
    # enhance factor 1, no rotation / shear / translation).
    identity_at_zero = ["Rotate", "Solarize", "SolarizeAdd", "Color", "Contrast",
                        "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
                        "TranslateY"]
    for i in range(5):
        out = augment.rand_augment(x, _seed(i), num_layers=3, magnitude=0,
                                   magnitude_std=0, probability=1.0, ops=identity_at_zero)
        np.testing.assert_array_equal(out, image)
    # Non-increasing enhance ops are the identity at level 5 (factor 5 / 10 * 1.8 + 0.1).
    out = augment.rand_augment(x, _seed(0), num_layers=2, magnitude=5, magnitude_std=0,
                               increasing=False, probability=1.0,
                               ops=["Color", "Contrast", "Brightness", "Sharpness"])
    np.testing.assert_array_equal(out, image)
    with pytest.raises(ValueError, match="unknown RandAugment ops"):
        augment.rand_augment(x, _seed(0), ops=["Cutout"])
    with pytest.raises(TypeError):
        augment.rand_augment(tf.constant(image, tf.float32), _seed(0))


def test_rand_augment_full_eager_and_in_dataset():
    images = np.stack([_random_image(24, 24, seed=s) for s in range(8)])
    fn = lambda im, s: augment.rand_augment(im, s, num_layers=2, magnitude=9,  # noqa: E731
                                            magnitude_std=0.5)
    outs = _in_dataset(fn, images, SEEDS[:8])
    for i in range(2):
        np.testing.assert_array_equal(fn(tf.constant(images[i]), _seed(i)), outs[i])
    assert all(o.dtype == np.uint8 and o.shape == (24, 24, 3) for o in outs)
    assert sum(not np.array_equal(o, im) for o, im in zip(outs, images)) >= 4
    a = augment.rand_augment(tf.constant(images[0]), _seed(0), 3, 6, 1.0, increasing=False)
    b = augment.rand_augment(tf.constant(images[0]), _seed(0), 3, 6, 1.0, increasing=False)
    np.testing.assert_array_equal(a, b)
    differ = [not np.array_equal(augment.rand_augment(tf.constant(images[0]), _seed(i),
                                                      probability=1.0), a)
              for i in range(1, 6)]
    assert sum(differ) >= 4


def test_color_jitter():
    image = _random_image(12, 15)
    x = tf.constant(image)
    np.testing.assert_array_equal(augment.color_jitter(x, _seed(0), strength=0.0), image)
    outs = _in_dataset(lambda im, s: augment.color_jitter(im, s, 0.4),
                       np.stack([image] * 4), SEEDS[:4])
    np.testing.assert_array_equal(augment.color_jitter(x, _seed(0), 0.4), outs[0])
    assert outs[0].dtype == np.uint8 and outs[0].shape == image.shape
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], image)
    # Brightness alone (contrast and saturation at 1 are exact): the factor is in range.
    out = augment.brightness(x, 0.6).numpy()
    assert (out <= image).all()


# ------------------------------------------------------------------- random erasing
def test_random_erasing_box_and_pixels():
    height, width = 32, 40
    area, log_ratio = (0.02, 1 / 3), (math.log(0.3), math.log(1 / 0.3))
    image = np.random.default_rng(0).normal(size=(height, width, 3)).astype(np.float32)
    seeds = SEEDS[:60]
    outs = _in_dataset(lambda im, s: augment.random_erasing(im, s, probability=1.0),
                       np.stack([image] * len(seeds)), seeds)
    erased = 0
    for i, out in enumerate(outs):
        box_seed, _ = augment.split_seed(tf.constant(seeds[i]), 2)
        top, left, h, w = augment.sample_erase_box((height, width), box_seed, 1.0).numpy()
        inside = np.zeros((height, width), bool)
        inside[top:top + h, left:left + w] = True
        np.testing.assert_array_equal(out[~inside], image[~inside])  # outside unchanged
        assert (out[inside] != image[inside]).all()  # inside replaced by fresh noise
        if h * w == 0:
            continue
        erased += 1
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        assert h < height and w < width  # timm accepts strictly smaller boxes only
        # h = round(sqrt(A r)), w = round(sqrt(A / r)), A in area * HW, r in the ratios.
        assert (h - 0.5) * (w - 0.5) <= area[1] * height * width
        assert (h + 0.5) * (w + 0.5) >= area[0] * height * width
        assert math.log((h - 0.5) / (w + 0.5)) <= log_ratio[1]
        assert math.log((h + 0.5) / (w - 0.5)) >= log_ratio[0]
    assert erased >= 55
    np.testing.assert_array_equal(
        augment.random_erasing(tf.constant(image), _seed(0), probability=1.0), outs[0])
    np.testing.assert_array_equal(
        augment.random_erasing(tf.constant(image), _seed(0), probability=0.0), image)
    # Area fractions on a large image, where rounding is negligible.
    boxes = np.stack(_in_dataset(lambda s: augment.sample_erase_box((224, 224), s, 1.0),
                                 SEEDS))
    frac = boxes[:, 2] * boxes[:, 3] / 224**2
    assert (frac >= 0.019).all() and (frac <= 0.34).all()
    aspect = boxes[:, 2] / boxes[:, 3]
    assert (aspect >= 0.29).all() and (aspect <= 3.45).all()
    applied = np.mean([augment.sample_erase_box((224, 224), _seed(i), 0.25)[2] > 0
                       for i in range(100)])
    assert 0.1 < applied < 0.45


# ---------------------------------------------------------------------- mixup/cutmix
def _mix_batch(batch=4, height=8, width=10, num_classes=5):
    # Example b is the constant b + 1, so every pixel tells which example it came from.
    images = np.broadcast_to(np.arange(1, batch + 1, dtype=np.float32)[:, None, None, None],
                             (batch, height, width, 3)).copy()
    labels = np.eye(num_classes, dtype=np.float32)[[0, 3, 1, 4]]
    return images, labels


def test_mixup_cutmix_pixels_and_targets():
    images, labels = _mix_batch()
    batch, height, width, _ = images.shape
    smoothing, k = 0.1, labels.shape[1]
    smooth = labels * (1 - smoothing) + smoothing / k
    modes = []
    results = _in_dataset(lambda s: augment.mixup_cutmix(images, labels, s), SEEDS[:40])
    for i, (mixed, targets) in enumerate(results):
        lam, use_cutmix, box = [v.numpy() for v in augment.sample_mix_params(
            images.shape, _seed(i))]
        modes.append(bool(use_cutmix))
        assert 0.0 <= lam <= 1.0
        np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1],
                                   rtol=1e-6, atol=1e-7)
        # The label of the mirror example carries exactly weight 1 - lam (before smoothing).
        for b in range(batch):
            own, other = labels[b].argmax(), labels[batch - 1 - b].argmax()
            np.testing.assert_allclose(targets[b, own] - smoothing / k, lam * (1 - smoothing),
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(targets[b, other] - smoothing / k,
                                       (1 - lam) * (1 - smoothing), rtol=1e-5, atol=1e-6)
        if use_cutmix:
            top, left, h, w = box
            for b in range(batch):
                from_other = mixed[b, ..., 0] == images[batch - 1 - b, 0, 0, 0]
                assert from_other.sum() == h * w
                np.testing.assert_allclose(from_other.sum(), (1 - lam) * height * width,
                                           atol=1e-4)
                assert from_other[top:top + h, left:left + w].all()
                assert (mixed[b, ..., 0][~from_other] == images[b, 0, 0, 0]).all()
        else:
            np.testing.assert_array_equal(box, 0)
            np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1],
                                       rtol=1e-6)
    assert 5 < sum(modes) < 35  # switch_prob 0.5: both modes happen
    eager = augment.mixup_cutmix(tf.constant(images), tf.constant(labels), _seed(0))
    np.testing.assert_array_equal(eager[0], results[0][0])
    np.testing.assert_array_equal(eager[1], results[0][1])
    assert not np.array_equal(results[0][1], results[1][1])


def test_mixup_cutmix_single_modes_and_integer_labels():
    images, labels = _mix_batch()
    int_labels = labels.argmax(1)
    for i in range(5):
        lam, use_cutmix, _ = augment.sample_mix_params(images.shape, _seed(i), cutmix_alpha=0)
        assert not use_cutmix and 0 < lam < 1
        _, use_cutmix, _ = augment.sample_mix_params(images.shape, _seed(i), mixup_alpha=0)
        assert use_cutmix
    mixed, targets = augment.mixup_cutmix(images, int_labels, _seed(0), num_classes=5,
                                          mixup_alpha=0, cutmix_alpha=0, label_smoothing=0)
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_array_equal(targets, labels)
    mixed, targets = augment.mixup_cutmix(images, labels, _seed(0), mix_prob=0.0)
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_allclose(targets, labels * 0.9 + 0.02, rtol=1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        augment.mixup_cutmix(images, int_labels, _seed(0))
