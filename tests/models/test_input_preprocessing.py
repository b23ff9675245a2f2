"""Each family's input preprocessing is the reference's (noah_jax/models/input_preprocessing.py).

The reference's evaluation transforms are written out here independently, with PIL as
torchvision runs them on a PIL image: Resize(int) (shorter side to that size, the longer
int(size * long / short), PIL's BILINEAR or BICUBIC filter), CenterCrop (offsets
int(round((h - th) / 2.0))), ToTensor (/ 255) and Normalize. Our tf.data evaluation must
land within what TensorFlow's resampling allows against PIL's, and clearly apart from the
same transform with the other normalisation, the other filter or the other crop ratio.
"""

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from configs import common  # noqa: E402
from noah_jax.data import pipeline  # noqa: E402
from noah_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess  # noqa: E402
from noah_jax.errors import ConfigError  # noqa: E402
from noah_jax.models.heads import Classifier  # noqa: E402
from noah_jax.models import create_model, input_preprocessing, list_models  # noqa: E402
from noah_jax.models import register_family, unregister_family  # noqa: E402

SIZE = 224
INCEPTION = (0.5, 0.5, 0.5)  # timm's IMAGENET_INCEPTION_MEAN / _STD
# The reference's evaluation of each family at 224 px: (the shorter side's new length as
# the reference computes it, PIL filter, mean, std).
TORCHVISION = (256, Image.BILINEAR, IMAGENET_MEAN, IMAGENET_STD)  # main.py: Resize(256)
REFERENCE_EVAL = {
    "resnet18": TORCHVISION,
    "mobilenetv2_100": TORCHVISION,
    "mobilenetv3_large": TORCHVISION,
    "shufflenetv2_100": TORCHVISION,
    # DeiT datasets.py: Resize(int(input_size / eval_crop_ratio), interpolation=3).
    "deit_tiny_patch16_224": (int(SIZE / 0.875), Image.BICUBIC, IMAGENET_MEAN, IMAGENET_STD),
    # PVT datasets.py: Resize(int((256 / 224) * input_size), interpolation=3).
    "pvt_tiny": (int((256 / 224) * SIZE), Image.BICUBIC, IMAGENET_MEAN, IMAGENET_STD),
    # timm transforms_imagenet_eval: Resize(floor(img_size / crop_pct)), crop_pct 0.9 from
    # the yaml, bicubic and mean = std = 0.5 from the model's default_cfg.
    "mixer_s16_224": (math.floor(SIZE / 0.9), Image.BICUBIC, INCEPTION, INCEPTION),
    "gmlp_ti16_224": (math.floor(SIZE / 0.9), Image.BICUBIC, INCEPTION, INCEPTION),
}
OTHER_FILTER = {Image.BILINEAR: Image.BICUBIC, Image.BICUBIC: Image.BILINEAR}
OTHER_NORMALISATION = {IMAGENET_MEAN: (INCEPTION, INCEPTION),
                       INCEPTION: (IMAGENET_MEAN, IMAGENET_STD)}

# Measured (TensorFlow 2.21, Pillow 13): our uint8 resize is at most 1 grey level from
# PIL's on these images, 0.06-0.08 levels on average; the other filter is 17-23 levels
# away at the edge, the other normalisation 65-159. PIL resamples in two passes with
# an 8-bit intermediate and fixed-point weights, TensorFlow in float: hence the level.
MAX_LEVELS = 1.0 + 1e-3
MEAN_LEVELS = 0.1
APART = 8  # the wrong transforms are at least this many times MAX_LEVELS away


def synthetic_image(height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3]: smooth colour waves and a sharp-edged red rectangle."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    image = np.stack([128 + 100 * np.sin(2 * np.pi * (1.3 * x + 0.4 * y)),
                      128 + 90 * np.cos(2 * np.pi * (0.7 * y - 0.9 * x * y)),
                      60 + 150 * x * y], axis=-1)
    image[(x > 0.55) & (y > 0.3)] = (240, 20, 30)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


IMAGES = {shape: synthetic_image(*shape) for shape in ((300, 257), (200, 333))}


def reference_eval(pixels: np.ndarray, resize_to: int, resample, mean, std) -> np.ndarray:
    """torchvision Resize(resize_to, resample) + CenterCrop(SIZE) + ToTensor + Normalize on
    a PIL image, as HWC float."""
    image = Image.fromarray(pixels)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = resize_to, int(resize_to * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    image = image.resize((new_w, new_h), resample)
    top, left = int(round((new_h - SIZE) / 2.0)), int(round((new_w - SIZE) / 2.0))
    image = image.crop((left, top, left + SIZE, top + SIZE))
    tensor = np.asarray(image, np.float64) / 255.0
    return (tensor - np.array(mean)) / np.array(std)


def ours(pixels: np.ndarray, model: str) -> np.ndarray:
    family = input_preprocessing.for_model(model)
    p = Preprocess(image_size=SIZE, **dataclasses.asdict(family))
    return pipeline.eval_image(tf.io.encode_png(pixels), p).numpy()


def levels(a: np.ndarray, b: np.ndarray, std) -> np.ndarray:
    """|a - b| of normalised images in grey levels (0..255) of the model's input."""
    return np.abs(a - b) * np.array(std) * 255.0


@pytest.mark.parametrize("shape", list(IMAGES), ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("model", list(REFERENCE_EVAL))
def test_each_familys_evaluation_is_the_references(model, shape):
    resize_to, resample, mean, std = REFERENCE_EVAL[model]
    pixels = IMAGES[shape]
    got = ours(pixels, model)
    assert got.shape == (SIZE, SIZE, 3)
    right = levels(got, reference_eval(pixels, resize_to, resample, mean, std), std)
    assert right.max() <= MAX_LEVELS and right.mean() <= MEAN_LEVELS, (right.max(),
                                                                         right.mean())
    wrong_filter = levels(got, reference_eval(pixels, resize_to, OTHER_FILTER[resample],
                                              mean, std), std)
    wrong_norm = levels(got, reference_eval(pixels, resize_to, resample,
                                            *OTHER_NORMALISATION[mean]), std)
    # The other crop ratio (0.875: 256; 0.9: 248), too.
    wrong_crop = levels(got, reference_eval(pixels, 256 + 248 - resize_to, resample, mean,
                                            std), std)
    assert wrong_filter.max() >= APART * MAX_LEVELS, wrong_filter.max()
    assert wrong_norm.max() >= APART * MAX_LEVELS, wrong_norm.max()
    assert wrong_crop.max() >= APART * MAX_LEVELS, wrong_crop.max()


def test_every_model_has_its_familys_values():
    expected = {"resnet": "torchvision", "mobilenetv2": "torchvision",
                "mobilenetv3": "torchvision", "shufflenetv2": "torchvision", "deit": "deit",
                "vit_large": "deit", "pvt": "deit", "mixer": "mlp", "gmlp": "mlp"}
    values = {"torchvision": (IMAGENET_MEAN, IMAGENET_STD, "bilinear", 0.875),
              "deit": (IMAGENET_MEAN, IMAGENET_STD, "bicubic", 0.875),
              "mlp": (INCEPTION, INCEPTION, "bicubic", 0.9)}
    for name in list_models():
        family = next(v for k, v in expected.items() if name.startswith(k))
        assert dataclasses.astuple(input_preprocessing.for_model(name)) == values[family], name
    assert dataclasses.astuple(input_preprocessing.TORCHVISION_IMAGENET) == values["torchvision"]


def test_a_family_that_states_none_gets_torchvisions():
    class Plain(Classifier):
        def __call__(self, x, train=False):
            return self.classify(x, train=train, dense_init=None)

    register_family({"plain_test_model": (Plain, {})})
    try:
        assert input_preprocessing.for_model("plain_test_model") == (
            input_preprocessing.TORCHVISION_IMAGENET)
    finally:
        unregister_family({"plain_test_model": None})


def test_reference_eval_is_at_the_models_own_size():
    mixer = create_model("mixer_s16_224", num_classes=10, img_size=32, num_blocks=1)
    p = input_preprocessing.reference_eval(mixer)
    assert (p.image_size, p.eval_crop, p.eval_interpolation, p.eval_crop_ratio, p.mean) == (
        32, "center", "bicubic", 0.9, INCEPTION)
    cnn = create_model("resnet18", num_classes=10)
    assert input_preprocessing.reference_eval(cnn).image_size == 224
    assert input_preprocessing.reference_eval(cnn, 160).image_size == 160


def test_resolve_fills_only_what_the_config_leaves_to_the_family():
    c = common.imagenet_config("gmlp_ti16_224", "noah")
    c.lock()
    resolved = input_preprocessing.resolve(c)
    assert (resolved.dataset.mean, resolved.dataset.std, resolved.dataset.eval_interpolation,
            resolved.dataset.eval_crop_ratio) == (INCEPTION, INCEPTION, "bicubic", 0.9)
    assert c.dataset.mean is None  # a copy: the config given is left as it is
    c.dataset.eval_interpolation = "bilinear"
    assert input_preprocessing.resolve(c).dataset.eval_interpolation == "bilinear"


def test_unresolved_or_unknown_settings_fail_in_one_line():
    with pytest.raises(ConfigError) as info:
        Preprocess.from_config(common.base_config().dataset, common.base_config().augment)
    assert str(info.value) == ("dataset.mean is None (the model family's) and was not "
                               "resolved: pass the config through "
                               "noah_jax.models.input_preprocessing.resolve")
    with pytest.raises(ConfigError) as info:
        Preprocess(image_size=8, train_interpolation="nearest")
    assert str(info.value) == ("augment.train_interpolation must be one of ('bilinear', "
                               "'bicubic', 'random'), got 'nearest'")
    with pytest.raises(ConfigError, match=r"^dataset.eval_interpolation must be one of "
                                          r"\('bilinear', 'bicubic'\), got 'random'$"):
        Preprocess(image_size=8, eval_interpolation="random")
    with pytest.raises(ConfigError, match=r"^dataset.mean needs 3 values \(R, G, B\)"):
        Preprocess(image_size=8, mean=(0.5,))
    with pytest.raises(ConfigError, match=r"^dataset.std must be positive"):
        Preprocess(image_size=8, std=(0.5, 0.0, 0.5))


def test_the_eval_record_round_trips_through_json():
    import json

    p = Preprocess(image_size=48, eval_crop="resize", eval_interpolation="bicubic",
                   mean=INCEPTION, std=INCEPTION, eval_crop_ratio=0.9)
    record = json.loads(json.dumps(p.eval_record()))
    assert record == {"image_size": 48, "eval_crop": "resize", "mean": [0.5] * 3,
                      "std": [0.5] * 3, "eval_interpolation": "bicubic",
                      "eval_crop_ratio": 0.9}
    assert Preprocess.from_eval_record(record) == Preprocess(
        image_size=48, eval_crop="resize", eval_interpolation="bicubic", mean=INCEPTION,
        std=INCEPTION, eval_crop_ratio=0.9)


def test_an_old_config_without_the_new_fields_means_imagenet_and_bilinear():
    c = common.imagenet_config("mixer_s16_224", "noah")
    old_dataset = {k: v for k, v in c.dataset.to_dict().items()
                   if k not in ("mean", "std", "eval_interpolation")}
    old_dataset["eval_crop_ratio"] = 0.9
    old_augment = {k: v for k, v in c.augment.to_dict().items() if k != "train_interpolation"}
    import ml_collections

    p = Preprocess.from_config(ml_collections.ConfigDict(old_dataset),
                               ml_collections.ConfigDict(old_augment))
    assert (p.mean, p.std, p.eval_interpolation, p.train_interpolation, p.eval_crop_ratio) == (
        IMAGENET_MEAN, IMAGENET_STD, "bilinear", "bilinear", 0.9)
