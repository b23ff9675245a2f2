"""TensorFlow image ops of the ImageNet training and evaluation pipelines (tf.data side).

Every op works on one image, uint8 or float32 [H, W, C], eagerly and inside
`tf.data.Dataset.map`; `mixup_cutmix` works on a batch. Randomness comes only from
stateless ops driven by an explicit int seed tensor of shape [2], so an example's
augmentation is a function of its seed, which a pipeline derives from (seed,
process, step) with `tf.random.experimental.stateless_fold_in`. An op that needs
several random numbers splits its seed with `tf.random.split`.

What each of the reference's training recipes uses (timm / torchvision semantics):

  CNNs (train)   random_resized_crop(224, bilinear) -> random_flip -> normalize
  CNNs (eval)    center_crop_eval(224, crop_ratio=0.875, bilinear) -> normalize
  DeiT / PVT     random_resized_crop(bicubic) -> random_flip -> rand_augment(2, 9,
                 mstd 0.5, increasing) -> normalize -> random_erasing(0.25); batches:
                 mixup_cutmix(0.8, 1.0, smoothing 0.1); eval bicubic, crop_ratio 0.875
  Mixer / gMLP   random_resized_crop(ratio (0.67, 1.5), bilinear or bicubic at random)
                 -> random_flip -> rand_augment(3, 6, mstd 1.0, increasing, fill 128)
                 -> normalize(mean = std = 0.5); mixup 0.5; eval bicubic, crop_ratio 0.9.
                 (timm ignores colour jitter whenever RandAugment is on, so the
                 reference's "colour jitter 0.4" has no effect there.)
Which mean/std and evaluation resize a model takes is its family's
(noah_jax.models.input_preprocessing); the training resize is the recipe's.

Pixel ops before `normalize` follow PIL, which the reference uses: they take and give
uint8 and round or truncate as PIL does. Checked against Pillow: the colour and point
ops (AutoContrast, Equalize, Invert, Posterize, Solarize, Color, Contrast, Brightness,
Sharpness) are bit-exact; the bilinear geometric ops (Rotate, Shear, Translate) are
exact at integer shifts and quarter turns and otherwise within one grey level.
Resizing is tf.image.resize with antialiasing, bilinear or bicubic (Keys, a = -0.5):
PIL's filters, whose support also widens when downscaling. Measured against PIL on
smooth images with an edge (tests/models/test_input_preprocessing.py): within one grey level.
Known differences from the reference, all deliberate:
  * RandAugment's geometric ops interpolate bilinearly (timm: the recipe's training
    interpolation, bicubic for DeiT, bilinear or bicubic at random for Mixer);
  * random numbers are drawn differently (vectorised tries, split seeds), so the
    distributions match timm/torchvision, not the individual draws;
  * decoding only the crop window of a JPEG is bit-exact for 4:4:4 JPEGs; with
    chroma subsampling (most ImageNet files) pixels next to the window's border can
    differ from decode-then-crop, because the chroma upsampler sees no neighbours
    outside the window. This is the usual price of the fast path (big_vision pays
    it too).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from noah_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

# timm's RandAugment fill colour: the ImageNet mean in uint8, round(255 * mean).
IMAGENET_MEAN_UINT8 = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGENET_MEAN_UINT8", "RAND_AUGMENT_OPS",
    "resize", "sample_crop_box", "random_resized_crop", "random_flip", "center_crop_eval",
    "normalize", "rand_augment", "color_jitter", "sample_erase_box", "random_erasing",
    "sample_mix_params", "mixup_cutmix",
    "auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize",
    "solarize_add", "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
    "translate_x", "translate_y",
]


# ----------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------
def split_seed(seed, num: int):
    """`num` independent [2] seeds from one."""
    return tf.unstack(tf.random.split(tf.convert_to_tensor(seed), num), num=num)


def _height_width(shape):
    """(H, W) as int32 scalars from an image shape [H, W, ...] (list or tensor)."""
    shape = tf.cast(tf.convert_to_tensor(shape), tf.int32)
    return shape[0], shape[1]


def _uniform_int(seed, maxval):
    """An int32 scalar uniform on [0, maxval) (maxval a positive int32 scalar)."""
    return tf.random.stateless_uniform([], seed, minval=0, maxval=maxval, dtype=tf.int32)


def _round_to_int(x):
    """Round half to even, like Python's round(), which torchvision and timm use."""
    return tf.cast(tf.round(x), tf.int32)


def _to_uint8(x, *, truncate: bool = False):
    """Float [0, 255] -> uint8; PIL truncates in its blend ops and rounds elsewhere."""
    x = tf.clip_by_value(x, 0.0, 255.0)
    return tf.cast(tf.floor(x) if truncate else tf.round(x), tf.uint8)


_INTERPOLATIONS = ("bilinear", "bicubic")
_RANDOM_METHOD_TAG = 0x494E5450  # "INTP": folded into a crop's seed for its method


def resize(image, height, width, method: str = "bilinear", seed=None):
    """Resize with antialiasing, as PIL's filters do; uint8 in gives uint8 out (rounded
    and clipped, as PIL). method: 'bilinear', 'bicubic' or 'random' (one of the two with
    equal chances, drawn from `seed`, int [2]; timm's RandomResizedCropAndInterpolation)."""
    size = tf.stack([height, width])

    def with_method(name):
        out = tf.image.resize(image, size, method=name, antialias=True)
        return _to_uint8(out) if image.dtype == tf.uint8 else out

    if method == "random":
        if seed is None:
            raise ValueError("resize(method='random') needs a seed")
        bicubic = tf.random.stateless_uniform([], seed) < 0.5
        return tf.cond(bicubic, lambda: with_method("bicubic"), lambda: with_method("bilinear"))
    if method not in _INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {method!r}; use one of "
                         f"{(*_INTERPOLATIONS, 'random')}")
    return with_method(method)


def _is_encoded(image) -> bool:
    return image.dtype == tf.string


# ----------------------------------------------------------------------------------
# Inception crop, flip, evaluation crop, normalisation.
# ----------------------------------------------------------------------------------
def sample_crop_box(shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10):
    """torchvision's RandomResizedCrop.get_params: int32 [4] = (top, left, height, width).

    Up to `attempts` tries of an area fraction uniform in `scale` and an aspect ratio
    (width / height) log-uniform in `ratio`, width = round(sqrt(area * ratio)); the
    first box that fits wins and its offset is uniform. If none fits: the largest
    centred box whose aspect ratio is clamped into `ratio` (the whole image when its
    own ratio is inside). All tries are drawn at once (vectorised), which consumes the
    random numbers differently from torchvision but gives the same distribution.
    """
    height, width = _height_width(shape)
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area_seed, ratio_seed, top_seed, left_seed = split_seed(seed, 4)
    target_area = h_f * w_f * tf.random.stateless_uniform(
        [attempts], area_seed, minval=scale[0], maxval=scale[1])
    aspect = tf.exp(tf.random.stateless_uniform(
        [attempts], ratio_seed, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
    crop_w = _round_to_int(tf.sqrt(target_area * aspect))
    crop_h = _round_to_int(tf.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # 0 if none fits
    found = tf.reduce_any(fits)

    # Fallback (torchvision): clamp the image's own aspect ratio into `ratio`.
    image_ratio = w_f / h_f
    lo, hi = min(ratio), max(ratio)
    fb_w = tf.where(image_ratio > hi, _round_to_int(h_f * hi), width)
    fb_h = tf.where(image_ratio < lo, _round_to_int(w_f / lo), height)

    crop_h = tf.where(found, crop_h[first], fb_h)
    crop_w = tf.where(found, crop_w[first], fb_w)
    top = tf.where(found, _uniform_int(top_seed, height - crop_h + 1), (height - crop_h) // 2)
    left = tf.where(found, _uniform_int(left_seed, width - crop_w + 1), (width - crop_w) // 2)
    return tf.stack([top, left, crop_h, crop_w])


def random_resized_crop(image_or_encoded, seed, size: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), attempts: int = 10,
                        interpolation: str = "bilinear"):
    """Inception crop (`sample_crop_box`) resized to [size, size, C].

    Takes pixels [H, W, C] (dtype kept: uint8 stays uint8) or an encoded JPEG string,
    of which only the crop window is decoded (3 channels, uint8 out). interpolation:
    `resize`'s method; with 'random' the choice comes from a seed folded out of `seed`,
    so the crop box is the same whatever the interpolation.
    """
    if _is_encoded(image_or_encoded):
        shape = tf.image.extract_jpeg_shape(image_or_encoded)
        box = sample_crop_box(shape, seed, scale, ratio, attempts)
        crop = tf.image.decode_and_crop_jpeg(image_or_encoded, box, channels=3)
    else:
        box = sample_crop_box(tf.shape(image_or_encoded), seed, scale, ratio, attempts)
        crop = tf.slice(image_or_encoded, tf.stack([box[0], box[1], 0]),
                        tf.stack([box[2], box[3], -1]))
    method_seed = (tf.random.experimental.stateless_fold_in(seed, _RANDOM_METHOD_TAG)
                   if interpolation == "random" else None)
    out = resize(crop, size, size, interpolation, method_seed)
    out.set_shape([size, size, crop.shape[-1]])
    return out


def random_flip(image, seed):
    """Mirror left-right with probability 1/2."""
    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def center_crop_eval(image_or_encoded, size: int, crop_ratio: float = 0.875,
                     interpolation: str = "bilinear"):
    """torchvision Resize(int(size / crop_ratio), interpolation) then CenterCrop(size).

    The shorter side becomes int(size / crop_ratio) (timm's floor(size / crop_pct), DeiT's
    int(size / eval_crop_ratio)) and the longer side int(new_short * long / short); the
    crop offsets are round((new - size) / 2), half to even as Python rounds.
    interpolation: 'bilinear' (torchvision's default) or 'bicubic'. An encoded JPEG is
    decoded whole (3 channels).
    """
    image = (tf.io.decode_jpeg(image_or_encoded, channels=3)
             if _is_encoded(image_or_encoded) else image_or_encoded)
    resize_to = int(size / crop_ratio)
    if resize_to < size:
        raise ValueError(f"crop_ratio must be <= 1, got {crop_ratio}")
    height, width = _height_width(tf.shape(image))
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    new_long = resize_to * long // short  # == int(resize_to * long / short) for these sizes
    new_h = tf.where(height <= width, resize_to, new_long)
    new_w = tf.where(height <= width, new_long, resize_to)
    resized = resize(image, new_h, new_w, interpolation)
    top = _round_to_int(tf.cast(new_h - size, tf.float32) / 2)
    left = _round_to_int(tf.cast(new_w - size, tf.float32) / 2)
    out = tf.slice(resized, tf.stack([top, left, 0]), tf.stack([size, size, -1]))
    out.set_shape([size, size, image.shape[-1]])
    return out


def normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """float32 (x - mean) / std on [0, 1] RGB; uint8 is scaled by 1/255, floats are
    taken to be on [0, 1] already (tf.image.convert_image_dtype's convention)."""
    if image.dtype == tf.uint8:
        image = tf.cast(image, tf.float32) / 255.0
    image = tf.cast(image, tf.float32)
    return (image - per_channel(mean, image)) / per_channel(std, image)


def per_channel(values, image) -> tf.Tensor:
    """float32 per-channel `values` ([C]) to combine with `image` [..., C]: spread to the
    image's whole shape where it is known, since TF's CPU kernels broadcast a [C] vector
    over an image several times slower than they combine two tensors of one shape
    (benchmarks/results/input_pipeline), for the same values."""
    values = np.asarray(values, np.float32)
    if image.shape.is_fully_defined():
        return tf.constant(np.broadcast_to(values, image.shape.as_list()))
    return tf.constant(values)


# ----------------------------------------------------------------------------------
# PIL-equivalent pixel ops (uint8 [H, W, 3] in and out), the pieces of RandAugment.
# ----------------------------------------------------------------------------------
def _grayscale(image):
    """PIL's convert('L'): (19595 R + 38470 G + 7471 B + 2^15) >> 16, as float32 [H, W, 1]."""
    rgb = tf.cast(image, tf.int32)
    lum = tf.bitwise.right_shift(
        rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000, 16)
    return tf.cast(lum, tf.float32)[..., None]


def _blend(degenerate, image, factor):
    """PIL Image.blend(degenerate, image, factor), truncated to uint8 as PIL does."""
    image = tf.cast(image, tf.float32)
    factor = tf.cast(factor, tf.float32)
    return _to_uint8(degenerate + factor * (image - degenerate), truncate=True)


def invert(image):
    return 255 - image


def posterize(image, bits):
    """Keep the `bits` most significant bits (0..8; 0 gives black, 8 the input)."""
    bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
    mask = tf.cast(tf.bitwise.bitwise_and(tf.bitwise.left_shift(255, 8 - bits), 255), tf.uint8)
    return tf.bitwise.bitwise_and(image, mask)


def solarize(image, threshold):
    """Invert the pixels >= threshold (0..256; 256 changes nothing)."""
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x), tf.uint8)


def solarize_add(image, addition, threshold=128):
    """Add `addition` (clipped at 255) to the pixels below `threshold`."""
    x = tf.cast(image, tf.int32)
    added = tf.minimum(x + tf.cast(addition, tf.int32), 255)
    return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), added, x), tf.uint8)


def auto_contrast(image):
    """PIL ImageOps.autocontrast (no cutoff): stretch each channel to [0, 255]."""
    x = tf.cast(image, tf.float32)
    lo = tf.reduce_min(x, axis=[0, 1])
    hi = tf.reduce_max(x, axis=[0, 1])
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    stretched = _to_uint8(x * scale - lo * scale, truncate=True)
    return tf.where(hi > lo, stretched, image)


def _equalize_channel(channel):
    """PIL's ImageOps.equalize lookup table for one uint8 channel [H, W]."""
    x = tf.cast(channel, tf.int32)
    hist = tf.math.bincount(x, minlength=256, maxlength=256, dtype=tf.int32)
    last = tf.gather(hist, tf.reduce_max(x))  # count of the highest non-empty bin
    step = (tf.reduce_sum(hist) - last) // 255
    safe_step = tf.maximum(step, 1)
    lut = (step // 2 + tf.cumsum(hist, exclusive=True)) // safe_step
    lut = tf.cast(tf.minimum(lut, 255), tf.uint8)
    return tf.where(step > 0, tf.gather(lut, x), channel)


def equalize(image):
    """PIL ImageOps.equalize, per channel."""
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def color(image, factor):
    """PIL ImageEnhance.Color (saturation): blend with the grey image."""
    return _blend(_grayscale(image), image, factor)


def contrast(image, factor):
    """PIL ImageEnhance.Contrast: blend with the grey level int(mean(L) + 0.5)."""
    mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
    return _blend(mean, image, factor)


def brightness(image, factor):
    """PIL ImageEnhance.Brightness: blend with black, i.e. floor(clip(x * factor))."""
    return _blend(0.0, image, factor)


def sharpness(image, factor):
    """PIL ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (3x3, centre 5, sum 13),
    whose border pixels are the input's."""
    x = tf.cast(image, tf.float32)
    # The 3x3 sum as shifted slices (exact: integers below 2^24), the centre counted 5
    # times; the rounded quotient is PIL's, since k / 13 is never half-way between
    # integers. Four times faster than a depthwise convolution on a CPU.
    def smoothed():
        rows = x[:-2] + x[1:-1] + x[2:]
        box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
        smooth = tf.round((box + 4.0 * x[1:-1, 1:-1]) / 13.0)
        middle = tf.concat([x[1:-1, :1], smooth, x[1:-1, -1:]], axis=1)
        return tf.concat([x[:1], middle, x[-1:]], axis=0)

    # An image under 3 pixels high or wide has no interior: every pixel is its own.
    height, width = _height_width(tf.shape(image))
    out = tf.cond((height < 3) | (width < 3), lambda: x, smoothed)
    out.set_shape(image.shape)
    return _blend(out, image, factor)


def _affine(image, matrix, fill):
    """PIL Image.transform(AFFINE, matrix, BILINEAR, fillcolor=fill).

    Output pixel (x, y) samples the input at (a x + b y + c, d x + e y + f), coordinates
    measured from the top-left corner with pixel centres at +0.5. As in PIL, a sample
    whose point lies inside the image [0, W) x [0, H) interpolates bilinearly with the
    edge pixels repeated outward, and any other output pixel gets `fill` (per channel).
    """
    a, b, c, d, e, f = [tf.cast(m, tf.float32) for m in matrix]
    # Pixel-index coordinates (centres at integers), as ImageProjectiveTransformV3 uses.
    c = a * 0.5 + b * 0.5 + c - 0.5
    f = d * 0.5 + e * 0.5 + f - 0.5
    transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None], transforms=transform,
        output_shape=tf.shape(image)[:2], fill_value=0.0, interpolation="BILINEAR",
        fill_mode="NEAREST")[0]  # NEAREST: clamp to the edge, as PIL's bilinear does
    height, width = _height_width(tf.shape(image))
    ys = tf.cast(tf.range(height), tf.float32)[:, None]
    xs = tf.cast(tf.range(width), tf.float32)[None, :]
    x_in, y_in = a * xs + b * ys + c, d * xs + e * ys + f
    inside = ((x_in >= -0.5) & (x_in < tf.cast(width, tf.float32) - 0.5)
              & (y_in >= -0.5) & (y_in < tf.cast(height, tf.float32) - 0.5))
    out = tf.where(inside[..., None], out, tf.constant(fill, tf.float32))
    # PIL truncates the interpolated value; the 1e-3 keeps float32 error on exact
    # integers (integer shifts, quarter turns) from truncating one level down.
    out = _to_uint8(out + 1e-3, truncate=True)
    out.set_shape(image.shape)
    return out


def rotate(image, degrees, fill=IMAGENET_MEAN_UINT8):
    """PIL Image.rotate(degrees): counter-clockwise about the image centre, same size."""
    height, width = _height_width(tf.shape(image))
    cx, cy = tf.cast(width, tf.float32) / 2, tf.cast(height, tf.float32) / 2
    theta = -tf.cast(degrees, tf.float32) * (math.pi / 180)
    # Rounded as PIL rounds them (to 15 decimals there), so that multiples of 90 degrees
    # are exact and map pixel centres onto pixel centres.
    cos, sin = tf.round(tf.cos(theta) * 1e6) / 1e6, tf.round(tf.sin(theta) * 1e6) / 1e6
    # input = R (output - centre) + centre, R = [[cos, sin], [-sin, cos]] as PIL builds it.
    matrix = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    return _affine(image, matrix, fill)


def shear_x(image, factor, fill=IMAGENET_MEAN_UINT8):
    return _affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image, factor, fill=IMAGENET_MEAN_UINT8):
    return _affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x(image, pixels, fill=IMAGENET_MEAN_UINT8):
    """Output column x shows input column x + pixels (content moves left for pixels > 0)."""
    return _affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y(image, pixels, fill=IMAGENET_MEAN_UINT8):
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


# ----------------------------------------------------------------------------------
# RandAugment (timm's rand_augment_transform).
# ----------------------------------------------------------------------------------
_MAX_LEVEL = 10.0
_TRANSLATE_PCT = 0.45  # timm's default translate_pct for TranslateXRel / TranslateYRel


def _signed(value, seed):
    """timm's _randomly_negate: -value with probability 1/2."""
    return tf.where(tf.random.stateless_uniform([], seed) > 0.5, -value, value)


def _enhance_factor(level, seed, increasing):
    if increasing:  # 1 +- 0.9 * level / 10: stronger either way as the level grows
        return 1.0 + _signed(level / _MAX_LEVEL * 0.9, seed)
    return level / _MAX_LEVEL * 1.8 + 0.1  # [0.1, 1.9], level 5 is the identity


def _make_rand_augment_ops(increasing: bool, fill):
    """name -> fn(image_uint8, level in [0, 10], sign_seed) -> image_uint8."""
    def posterize_op(img, level, _):
        bits = tf.cast(level / _MAX_LEVEL * 4, tf.int32)  # int() of a non-negative float
        return posterize(img, 4 - bits if increasing else bits)

    def solarize_op(img, level, _):
        threshold = tf.cast(level / _MAX_LEVEL * 256, tf.int32)
        return solarize(img, 256 - threshold if increasing else threshold)

    def translate_op(fn, axis):
        def op(img, level, seed):
            length = tf.cast(tf.shape(img)[axis], tf.float32)
            return fn(img, _signed(level / _MAX_LEVEL * _TRANSLATE_PCT, seed) * length, fill)
        return op

    return {
        "AutoContrast": lambda img, level, seed: auto_contrast(img),
        "Equalize": lambda img, level, seed: equalize(img),
        "Invert": lambda img, level, seed: invert(img),
        "Rotate": lambda img, level, seed: rotate(
            img, _signed(level / _MAX_LEVEL * 30.0, seed), fill),
        "Posterize": posterize_op,
        "Solarize": solarize_op,
        "SolarizeAdd": lambda img, level, seed: solarize_add(
            img, tf.cast(level / _MAX_LEVEL * 110, tf.int32)),
        "Color": lambda img, level, seed: color(img, _enhance_factor(level, seed, increasing)),
        "Contrast": lambda img, level, seed: contrast(
            img, _enhance_factor(level, seed, increasing)),
        "Brightness": lambda img, level, seed: brightness(
            img, _enhance_factor(level, seed, increasing)),
        "Sharpness": lambda img, level, seed: sharpness(
            img, _enhance_factor(level, seed, increasing)),
        "ShearX": lambda img, level, seed: shear_x(
            img, _signed(level / _MAX_LEVEL * 0.3, seed), fill),
        "ShearY": lambda img, level, seed: shear_y(
            img, _signed(level / _MAX_LEVEL * 0.3, seed), fill),
        "TranslateX": translate_op(translate_x, 1),
        "TranslateY": translate_op(translate_y, 0),
    }


# timm's _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS (the same 15 ops; Posterize,
# Solarize, Color, Contrast, Brightness and Sharpness take their "Increasing" forms when
# increasing=True; TranslateX/Y are timm's TranslateXRel/YRel).
RAND_AUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                    "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                    "ShearY", "TranslateX", "TranslateY")


def rand_augment(image, seed, num_layers: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, increasing: bool = True,
                 probability: float = 0.5, ops: Sequence[str] = RAND_AUGMENT_OPS,
                 fill=IMAGENET_MEAN_UINT8):
    """timm RandAugment on a uint8 [H, W, 3] image; uint8 out.

    `num_layers` times: pick an op uniformly from `ops` (with replacement across layers,
    as timm does), apply it with `probability`, at a level drawn from
    N(magnitude, magnitude_std) (uniform on [0, magnitude] if magnitude_std is inf)
    and clipped to [0, 10]. Rotate / Shear / Translate / increasing enhance ops get a
    random sign. DeiT: "rand-m9-mstd0.5-inc1" = (2, 9, 0.5, increasing=True);
    Mixer recipe: "rand-m6-n3-mstd1.0-inc1" = (3, 6, 1.0, increasing=True). `fill`: the
    colour the geometric ops fill with, timm's round(255 * m) of the model's mean m
    (`Preprocess.rand_augment_fill`).
    """
    if image.dtype != tf.uint8:
        raise TypeError(f"rand_augment takes uint8 images, got {image.dtype}")
    table = _make_rand_augment_ops(increasing, fill)
    unknown = [name for name in ops if name not in table]
    if unknown or not ops:
        raise ValueError(f"unknown RandAugment ops {unknown}; available: {RAND_AUGMENT_OPS}")
    fns = [table[name] for name in ops]
    static_shape = image.shape
    for layer_seed in split_seed(seed, num_layers):
        op_seed, apply_seed, level_seed, sign_seed = split_seed(layer_seed, 4)
        index = _uniform_int(op_seed, len(fns))
        if math.isinf(magnitude_std):
            level = tf.random.stateless_uniform([], level_seed, 0.0, magnitude)
        elif magnitude_std > 0:
            level = magnitude + magnitude_std * tf.random.stateless_normal([], level_seed)
        else:
            level = tf.constant(magnitude, tf.float32)
        level = tf.clip_by_value(level, 0.0, _MAX_LEVEL)
        branches = [lambda fn=fn, img=image, lv=level, s=sign_seed: fn(img, lv, s) for fn in fns]
        apply = tf.random.stateless_uniform([], apply_seed) < probability
        image = tf.cond(apply, lambda b=branches, i=index: tf.switch_case(i, b),
                        lambda img=image: img)
        image.set_shape(static_shape)
    return image


def color_jitter(image, seed, strength: float = 0.4, random_order: bool = True):
    """torchvision ColorJitter(strength, strength, strength) on a uint8 image (PIL ops).

    Brightness, contrast and saturation factors are uniform on
    [max(0, 1 - strength), 1 + strength], applied in a random order. Note: timm turns
    colour jitter off whenever RandAugment is configured, so the timm recipes that set
    both (Mixer/gMLP) never apply it.
    """
    if image.dtype != tf.uint8:
        raise TypeError(f"color_jitter takes uint8 images, got {image.dtype}")
    order_seed, factor_seed = split_seed(seed, 2)
    factors = tf.random.stateless_uniform(
        [3], factor_seed, minval=max(0.0, 1.0 - strength), maxval=1.0 + strength)
    fns = (brightness, contrast, color)
    order = (tf.argsort(tf.random.stateless_uniform([3], order_seed)) if random_order
             else tf.range(3))
    for i in range(3):
        image = tf.switch_case(order[i], [
            lambda fn=fn, k=k, img=image: fn(img, factors[k]) for k, fn in enumerate(fns)])
    return image


# ----------------------------------------------------------------------------------
# Random erasing (timm RandomErasing, mode 'pixel', one box), on normalised images.
# ----------------------------------------------------------------------------------
def sample_erase_box(shape, seed, probability=0.25, area=(0.02, 1 / 3),
                     log_ratio=(math.log(0.3), math.log(1 / 0.3)), attempts: int = 10):
    """timm's box: int32 [4] = (top, left, height, width), all zero when nothing is erased.

    With `probability`, up to `attempts` tries of an area fraction uniform in `area`
    and an aspect ratio (height / width, as timm) log-uniform in `log_ratio`; a box is
    accepted when strictly smaller than the image; none accepted means no erasing.
    timm's default ratio range is (0.3, 1 / 0.3).
    """
    height, width = _height_width(shape)
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    apply_seed, area_seed, ratio_seed, top_seed, left_seed = split_seed(seed, 5)
    target_area = h_f * w_f * tf.random.stateless_uniform(
        [attempts], area_seed, minval=area[0], maxval=area[1])
    aspect = tf.exp(tf.random.stateless_uniform(
        [attempts], ratio_seed, minval=log_ratio[0], maxval=log_ratio[1]))
    box_h = _round_to_int(tf.sqrt(target_area * aspect))
    box_w = _round_to_int(tf.sqrt(target_area / aspect))
    fits = (box_w < width) & (box_h < height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    erase = tf.reduce_any(fits) & (tf.random.stateless_uniform([], apply_seed) < probability)
    box_h, box_w = box_h[first], box_w[first]
    top = _uniform_int(top_seed, tf.maximum(height - box_h + 1, 1))
    left = _uniform_int(left_seed, tf.maximum(width - box_w + 1, 1))
    return tf.where(erase, tf.stack([top, left, box_h, box_w]), tf.zeros([4], tf.int32))


def random_erasing(image, seed, probability=0.25, area=(0.02, 1 / 3),
                   log_ratio=(math.log(0.3), math.log(1 / 0.3)), mode: str = "pixel",
                   attempts: int = 10):
    """Replace a `sample_erase_box` box of a normalised float image by N(0, 1) noise
    (mode 'pixel': per pixel and channel; 'rand': one colour per channel; 'const': 0)."""
    if mode not in ("pixel", "rand", "const"):
        raise ValueError(f"unknown random erasing mode {mode!r}; use 'pixel', 'rand' or 'const'")
    box_seed, noise_seed = split_seed(seed, 2)
    image = tf.convert_to_tensor(image, tf.float32)
    shape = tf.shape(image)
    top, left, box_h, box_w = tf.unstack(
        sample_erase_box(shape, box_seed, probability, area, log_ratio, attempts))

    def erase():
        # Noise for the box only, padded into place: most images are not erased, and
        # the erased ones should not pay for a full image of random numbers.
        if mode == "pixel":
            fill = tf.random.stateless_normal([box_h, box_w, shape[2]], noise_seed)
        elif mode == "rand":
            fill = (tf.random.stateless_normal([1, 1, shape[2]], noise_seed)
                    + tf.zeros([box_h, box_w, shape[2]]))
        else:
            fill = tf.zeros([box_h, box_w, shape[2]])
        # Put in place by concatenation (copies), not a select over the whole image.
        band = image[top:top + box_h]
        band = tf.concat([band[:, :left], fill, band[:, left + box_w:]], axis=1)
        return tf.concat([image[:top], band, image[top + box_h:]], axis=0)

    out = tf.cond(box_h * box_w > 0, erase, lambda: image)
    out.set_shape(image.shape)
    return out


# ----------------------------------------------------------------------------------
# Mixup / CutMix (timm Mixup, mode 'batch', correct_lam=True), on a batch.
# ----------------------------------------------------------------------------------
def _sample_beta(seed, alpha):
    gammas = tf.random.stateless_gamma([2], seed, alpha=alpha)
    return gammas[0] / (gammas[0] + gammas[1])


def sample_mix_params(image_shape, seed, mixup_alpha=0.8, cutmix_alpha=1.0,
                      switch_prob=0.5, mix_prob=1.0):
    """timm's per-batch draw: (lam float32, use_cutmix bool, box int32 [4]).

    With probability `mix_prob`: CutMix with probability `switch_prob` (when both
    alphas are positive), lam ~ Beta(alpha, alpha) of the chosen mode. CutMix's box
    (top, left, height, width) has a centre uniform over the image and sides
    int(side * sqrt(1 - lam)), halved and clipped at the border as timm does; lam is
    then corrected to 1 - box area / image area. Mixup and no mixing give a zero box.
    `image_shape` is [H, W] or [B, H, W, C] (only H and W are read).
    """
    shape = tf.cast(tf.convert_to_tensor(image_shape), tf.int32)
    height, width = (shape[1], shape[2]) if shape.shape[0] == 4 else (shape[0], shape[1])
    mix_seed, switch_seed, beta_seed, cy_seed, cx_seed = split_seed(seed, 5)
    mix = tf.random.stateless_uniform([], mix_seed) < mix_prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform([], switch_seed) < switch_prob
    else:
        use_cutmix = tf.constant(cutmix_alpha > 0)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        mix = tf.constant(False)
    alpha = tf.where(use_cutmix, float(cutmix_alpha), float(mixup_alpha))
    lam = _sample_beta(beta_seed, tf.fill([2], tf.maximum(alpha, 1e-6)))
    use_cutmix = use_cutmix & mix
    lam = tf.where(mix, lam, 1.0)

    cut = tf.sqrt(1.0 - lam)
    cut_h = tf.cast(tf.cast(height, tf.float32) * cut, tf.int32)
    cut_w = tf.cast(tf.cast(width, tf.float32) * cut, tf.int32)
    cy, cx = _uniform_int(cy_seed, height), _uniform_int(cx_seed, width)
    top = tf.clip_by_value(cy - cut_h // 2, 0, height)
    bottom = tf.clip_by_value(cy + cut_h // 2, 0, height)
    left = tf.clip_by_value(cx - cut_w // 2, 0, width)
    right = tf.clip_by_value(cx + cut_w // 2, 0, width)
    box = tf.stack([top, left, bottom - top, right - left])
    box_area = tf.cast((bottom - top) * (right - left), tf.float32)
    corrected = 1.0 - box_area / tf.cast(height * width, tf.float32)
    lam = tf.where(use_cutmix, corrected, lam)
    box = tf.where(use_cutmix, box, tf.zeros([4], tf.int32))
    return lam, use_cutmix, box


def mixup_cutmix(images, labels, seed, *, num_classes: int | None = None, mixup_alpha=0.8,
                 cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, mix_prob=1.0):
    """timm Mixup in batch mode: each example mixes with its mirror in the batch (b with
    B - 1 - b), one lam for the whole batch (`sample_mix_params`).

    images: float [B, H, W, C] (normalised); labels: one-hot/multi-hot [B, K] or int [B]
    (then `num_classes` is needed). Returns (images, targets float32 [B, K]) with
    targets = lam * smooth(y) + (1 - lam) * smooth(y[::-1]),
    smooth(y) = y * (1 - label_smoothing) + label_smoothing / K. B should be even
    (timm requires it; with odd B the middle example mixes with itself).
    """
    images = tf.convert_to_tensor(images)
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 1:
        if num_classes is None:
            raise ValueError("integer labels need num_classes")
        labels = tf.one_hot(labels, num_classes)
    labels = tf.cast(labels, tf.float32)
    k = tf.cast(tf.shape(labels)[-1], tf.float32)
    smooth = labels * (1.0 - label_smoothing) + label_smoothing / k
    shape = tf.shape(images)
    lam, use_cutmix, box = sample_mix_params(shape, seed, mixup_alpha, cutmix_alpha,
                                             switch_prob, mix_prob)
    lam_x = tf.cast(lam, images.dtype)

    def paste():
        # The mirror's box put in place by concatenation (copies of slices), not a
        # select over the whole batch.
        top, left, height, width = tf.unstack(box)
        band = images[:, top:top + height]
        pasted = tf.reverse(band[:, :, left:left + width], axis=[0])
        band = tf.concat([band[:, :, :left], pasted, band[:, :, left + width:]], axis=2)
        out = tf.concat([images[:, :top], band, images[:, top + height:]], axis=1)
        out.set_shape(images.shape)
        return out

    def blend():
        return images * lam_x + tf.reverse(images, axis=[0]) * (1 - lam_x)

    # Only the branch in use is computed; lam = 1 (no mixing this batch) copies nothing.
    mixed = tf.cond(use_cutmix, paste,
                    lambda: tf.cond(lam_x < 1, blend, lambda: tf.identity(images)))
    targets = lam * smooth + (1.0 - lam) * tf.reverse(smooth, axis=[0])
    return mixed, targets
