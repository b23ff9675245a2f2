"""The multi-label demo dataset (noah_jax/data/digits_multilabel.py): canvases that hold
exactly their layouts, a split by source digit, fixed canvases whatever the seed, a
shift that cuts no digit, and the trainer, evaluator and loader on it end to end."""

import importlib

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from configs import common
from helpers import assert_follows_source_protocol, set_fields
from noah_jax.train import checkpoint, metrics, trainer
from noah_jax import inference, prepare
from noah_jax.data import base, digits, get_source
from noah_jax.data.digits_multilabel import DigitsMultilabelSource
from noah_jax.errors import ConfigError
from noah_jax.models import create_model

S = 64
SOURCE_GREY = load_digits().images / 16.0  # [1797, 8, 8] on [0, 1]
TARGETS = load_digits().target
DEMO_RECIPES = ["gmlp_noah", "mixer_noah", "mobilenetv2_noah", "mobilenetv3_noah",
                "pvt_noah", "shufflenetv2_noah", "vit_noah"]


@pytest.fixture(scope="module")
def source():
    return DigitsMultilabelSource(seed=3, image_size=S)


def resized_digit(index: int, size: int) -> np.ndarray:
    """load_digits() image `index` on [0, 1], bilinearly resized to size x size."""
    w = digits.linear_resize_matrix(8, size)
    return w @ SOURCE_GREY[index] @ w.T


def assert_canvas_holds(canvas, layout, dy=0, dx=0, atol=0.0):
    """`canvas` [S, S] on [0, 1] is `layout`'s digits, moved by (dy, dx), on a background
    of 0: the digits to float32 rounding, the background exactly (or to `atol`)."""
    outside = np.ones(canvas.shape, bool)
    for index, _, top, left, size in layout:
        box = (slice(top + dy, top + dy + size), slice(left + dx, left + dx + size))
        np.testing.assert_allclose(canvas[box], resized_digit(index, size),
                                   atol=max(atol, 1e-6))
        outside[box] = False
    np.testing.assert_allclose(canvas[outside], 0.0, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------
# The canvases.
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "test"])
def test_canvases_hold_exactly_their_layouts_and_labels(source, split):
    n = source.num_train_examples if split == "train" else source.num_eval_examples
    labels = source.train_labels if split == "train" else source.eval_labels
    indices = np.arange(0, n, 7)  # every 7th canvas: 572 / 143 of them
    canvases = source.render(split, indices)
    margin, (low, high) = source.margin, (source.min_size, source.max_size)
    assert (margin, low, high) == (4, 16, 24)
    sizes = []
    for canvas, index in zip(canvases, indices):
        layout = source.layout(split, int(index))
        assert_canvas_holds(canvas, layout)
        expected = np.zeros(10, np.float32)
        expected[[digit for _, digit, *_ in layout]] = 1.0
        np.testing.assert_array_equal(labels[index], expected)
        for a, (source_index, digit, top, left, size) in enumerate(layout):
            assert digit == TARGETS[source_index]
            assert low <= size <= high and margin <= min(top, left)
            assert max(top, left) + size <= S - margin
            sizes.append(size)
            for _, _, top2, left2, size2 in layout[a + 1:]:  # no shared pixel
                assert (top + size <= top2 or top2 + size2 <= top
                        or left + size <= left2 or left2 + size2 <= left)
    assert set(sizes) == set(range(low, high + 1))
    counts = np.bincount([len(source.layout(split, i)) for i in range(n)], minlength=5)
    assert counts[0] == 0 and counts[1:].min() > n / 4 * 0.85  # 1..4, about uniform


def test_examples_are_the_canvases_normalised_by_the_training_pixel_statistics(source):
    indices = np.arange(0, 1000, 9)
    images = source.eval_examples(indices)["image"]
    assert images.shape == (len(indices), S, S, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    np.testing.assert_allclose(images[..., 1] * source.std + source.mean,
                               source.render("test", indices), atol=1e-6)
    assert images.min() == source.background == np.float32(-source.mean / source.std)
    canvases = source.render("train", np.arange(source.num_train_examples)).astype(np.float64)
    assert source.mean == pytest.approx(canvases.mean(), rel=1e-9)
    assert source.std == pytest.approx(canvases.std(), rel=1e-7)
    # Golden: these, and the layouts below, move only if the canvases do.
    assert (round(source.mean, 5), round(source.std, 5)) == (0.07039, 0.20223)


def test_no_test_digit_appears_in_any_training_canvas(source):
    used = {split: {index for i in range(n) for index, *_ in source.layout(split, i)}
            for split, n in (("train", source.num_train_examples),
                             ("test", source.num_eval_examples))}
    train_digits, test_digits = digits.split_indices()
    assert used["train"] <= set(train_digits) and used["test"] <= set(test_digits)
    assert not used["train"] & used["test"]
    assert len(used["train"]) > 1400 and len(used["test"]) > 350  # nearly all are used


def test_canvases_are_fixed_whatever_the_seed_and_each_is_computed_on_its_own(source):
    other = DigitsMultilabelSource(seed=11, image_size=S)
    for split in ("train", "test"):
        indices = np.arange(0, 1000, 3)
        np.testing.assert_array_equal(other.render(split, indices),
                                      source.render(split, indices))
        one = source.render(split, [999])
        np.testing.assert_array_equal(one[0], source.render(split, indices)[-1])
    np.testing.assert_array_equal(other.train_labels, source.train_labels)
    evals = [list(s.eval_batches(local_batch_size=96, process_index=0, process_count=1))
             for s in (source, other)]
    assert len(evals[0]) == len(evals[1]) == 11
    for a, b in zip(*evals):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(a[key], b[key])
    assert source.layout("train", 0) == [(93, 1, 17, 24, 20), (532, 6, 40, 37, 18),
                                         (104, 6, 24, 5, 17)]  # golden
    assert source.train_labels[0].tolist() == [0, 1, 0, 0, 0, 0, 1, 0, 0, 0]  # two 6s: one 1
    # The seed drives the training order and shifts.
    first = [next(s.train_batches(start_step=0, local_batch_size=32, process_index=0,
                                  process_count=1)) for s in (source, other)]
    assert not np.array_equal(first[0]["label"], first[1]["label"])
    assert not np.array_equal(source.shifts(np.arange(32)), other.shifts(np.arange(32)))


def test_training_shift_moves_every_digit_whole(source):
    plain = DigitsMultilabelSource(seed=3, image_size=S, augment=False)
    batch = next(source.train_batches(start_step=5, local_batch_size=256, process_index=0,
                                      process_count=1))
    positions = np.arange(5 * 256, 6 * 256)
    indices = base.train_indices(source.seed, positions, source.num_train_examples)
    dy, dx = source.shifts(positions)
    assert dy.min() == dx.min() == -4 and dy.max() == dx.max() == 4
    # Pad with the background and crop back, as DigitsSource's shift ...
    unshifted = plain.train_examples(indices, positions)
    np.testing.assert_array_equal(unshifted["label"], batch["label"])
    padded = np.pad(unshifted["image"], ((0, 0), (4, 4), (4, 4), (0, 0)),
                    constant_values=source.background)
    for b in range(0, 256, 5):
        crop = padded[b, 4 - dy[b]:4 - dy[b] + S, 4 - dx[b]:4 - dx[b] + S]
        np.testing.assert_allclose(batch["image"][b], crop, atol=1e-6)
        # ... and every digit is still whole: the label holds.
        grey = batch["image"][b, :, :, 0] * source.std + source.mean
        assert_canvas_holds(grey, source.layout("train", int(indices[b])), dy[b], dx[b],
                            atol=1e-6)


# ----------------------------------------------------------------------------------
# Plumbing: the config, the source protocol, a run, the loader.
# ----------------------------------------------------------------------------------
def test_the_demo_config_gives_this_source_with_masked_multi_hot_batches():
    config = importlib.import_module("configs.vit_noah").get_config("demo,multilabel")
    assert (config.loss, config.label_smoothing, config.model.overrides.patch_size) == (
        "sigmoid_xent", 0.0, 16)
    s = get_source(config.dataset, seed=config.seed)
    assert isinstance(s, DigitsMultilabelSource) and s.eval_label_type == "multi_hot"
    # 1000 test canvases in batches of 6: the last batch has 2 of padding.
    assert_follows_source_protocol(
        s, name="digits_multilabel", num_classes=10, image_shape=(S, S, 3),
        num_train_examples=4000, num_eval_examples=1000, class_names=list("0123456789"),
        multilabel=True, local_batch_size=6)


@pytest.mark.parametrize("recipe", DEMO_RECIPES)
def test_every_demo_recipe_takes_multilabel_and_only_with_demo(recipe):
    module = importlib.import_module(f"configs.{recipe}")
    c = module.get_config("demo,multilabel")
    assert (c.dataset.name, c.dataset.image_size, c.dataset.num_classes) == (
        "digits_multilabel", 64, 10)
    assert (c.loss, c.label_smoothing) == ("sigmoid_xent", 0.0)
    model = create_model(c.model.name, num_classes=10, head=c.model.head,
                         **c.model.overrides.to_dict())
    x = jax.ShapeDtypeStruct((2, S, S, 3), np.float32)
    logits = jax.eval_shape(lambda x: model.apply(model.init(jax.random.key(0), x), x), x)
    assert logits.shape == (2, 10)
    assert module.get_config("demo").dataset.name == "digits"
    with pytest.raises(ValueError, match="use it with 'demo'"):
        module.get_config("multilabel")


def test_mistakes_are_one_line_errors():
    dataset = common.base_config().dataset
    dataset.name, dataset.image_size = "digits_multilabel", 64
    with pytest.raises(ConfigError, match="has 10 classes, but dataset.num_classes = 1000"):
        get_source(dataset, seed=0)
    with pytest.raises(ValueError, match="needs image_size >= 32"):
        DigitsMultilabelSource(seed=0, image_size=24)
    small = DigitsMultilabelSource(seed=0, image_size=32)  # 8..12 px digits, 2 px margin
    assert (small.min_size, small.max_size, small.margin) == (8, 12, 2)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        small.layout("eval", 0)
    with pytest.raises(ValueError, match="more than the margin, 2 px, would cut digits off"):
        small.render("train", [0], (np.array([3]), np.array([0])))
    with pytest.raises(ValueError, match="dataset is one of"):
        common.apply_demo(common.base_config(), dataset="digit_canvases")
    with pytest.raises(prepare.PrepareError, match="needs no preparation"):
        prepare.prepare("digits_multilabel", "/nonexistent", "/nonexistent")


def test_a_tiny_run_scores_exact_map_and_f1_and_its_canvases_load_back(tmp_path):
    c = importlib.import_module("configs.vit_noah").get_config("demo,multilabel")
    set_fields(c, model__overrides__depth=1, model__overrides__embed_dim=96,
               model__overrides__attn_heads=3, num_epochs=0.0, total_steps=4, batch_size=16,
               eval_batch_size=48, log_every_steps=2, eval_every_steps=4,
               checkpoint_every_steps=4, attention_figure_images=0)
    results = trainer.train_and_evaluate(c, str(tmp_path))
    assert results["eval/count"] == 1000
    for key in ("eval/mAP", "eval/CF1", "eval/OF1", "eval/loss"):
        assert np.isfinite(results[key]), key

    # The evaluator's mAP and F1 are those of the whole test set, computed here directly.
    variables, meta = checkpoint.restore_model(tmp_path / "checkpoints")
    assert (meta["multilabel"], meta["loss"], meta["dataset"]) == (
        True, "sigmoid_xent", "digits_multilabel")
    s = DigitsMultilabelSource(seed=0, image_size=S, augment=False)
    images = s.eval_examples(np.arange(1000))["image"]
    model = create_model(c.model.name, num_classes=10, head=c.model.head,
                         **c.model.overrides.to_dict())
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
    assert results["eval/mAP"] == pytest.approx(
        metrics.mean_average_precision(logits, s.eval_labels), abs=1e-6)
    f1 = metrics.multilabel_f1(1 / (1 + np.exp(-logits.astype(np.float64))), s.eval_labels)
    assert results["eval/OF1"] == pytest.approx(f1["OF1"], abs=1e-6)

    # Test canvases written as PNGs come back within half a grey level, as multi-label.
    import tensorflow as tf

    paths = []
    for i, canvas in enumerate(s.render("test", np.arange(3))):
        pixels = np.round(canvas * 255).astype(np.uint8)[..., None]
        paths.append(str(tmp_path / f"canvas{i}.png"))
        with open(paths[-1], "wb") as f:
            f.write(tf.io.encode_png(pixels).numpy())
    loaded = inference.load(tmp_path)
    assert loaded.multilabel and loaded.class_names == list("0123456789")
    np.testing.assert_allclose(loaded.preprocess(paths), images[:3],
                               atol=0.5 / 255 / s.std + 1e-6)
    # A larger picture is area-averaged down: twice the canvas, pixels doubled, is the canvas.
    rgb = np.random.default_rng(0).integers(0, 256, (S, S, 3))
    np.testing.assert_allclose(inference.canvas_grey(rgb.repeat(2, 0).repeat(2, 1), S),
                               inference.canvas_grey(rgb, S), atol=1e-12)
