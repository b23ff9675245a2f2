"""`python -m noah_jax.export`: every family and both heads give the Flax model's logits
from StableHLO, the SavedModel and ONNX, each read back as a user would (plain JAX,
TensorFlow, onnxruntime) at two batch sizes; predict on an export gives the workdir's
top-5; malformed and mismatched export folders end in one line."""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from noah_jax import export, inference, predict
from noah_jax.data import augment
from noah_jax.data.preprocess import Preprocess
from noah_jax.models import create_model
from noah_jax.train import checkpoint

# A small model of every family: (create_model overrides, image side).
# Depthwise convolutions in their grouped form, which compiles several times faster than
# the CPU's shifted form (test_layers.py shows the two equal); the multi-label test
# exports the 'auto' setting, a form per platform.
GROUPED = {"depthwise": "grouped"}
FAMILIES = {
    "resnet18": ({}, 32),
    "resnet50": ({"stage_sizes": (1, 1, 1, 1)}, 32),
    "mobilenetv2_035": (GROUPED, 32),
    "mobilenetv3_small": (GROUPED, 32),
    "shufflenetv2_050": (GROUPED, 32),
    "deit_tiny_patch16_224": ({"img_size": 32, "depth": 1}, 32),
    "pvt_tiny": ({"img_size": 32, "depths": (1, 1, 1, 1)}, 32),
    "mixer_s16_224": ({"img_size": 32, "num_blocks": 1}, 32),
    "gmlp_ti16_224": ({"img_size": 32, "num_blocks": 1}, 32),
}
TOLERANCE = 1e-5  # the acceptance: max |diff| relative to the largest |logit|
CLASSES = 7


def relative_error(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def tiny_loaded(name, head, *, multilabel=False, seed=0, **changes):
    """An inference.Loaded of a small `name` model whose parameters are moved off their
    init (logits of a real scale, BatchNorm statistics away from 0 and 1)."""
    overrides, size = FAMILIES[name]
    overrides = {**overrides, **changes}
    model = create_model(name, num_classes=CLASSES, head=head, **overrides)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))

    def moved(path, leaf, key):
        noise = jax.random.normal(key, leaf.shape, leaf.dtype)
        if getattr(path[-1], "key", None) == "var":  # a BatchNorm variance stays positive
            return leaf * (1 + 0.5 * jnp.abs(noise))
        return leaf + 0.05 * noise

    variables = jax.tree.unflatten(tree, [moved(p, leaf, k) for (p, leaf), k in
                                          zip(leaves, keys)])
    meta = {"model": name, "head": head, "num_classes": CLASSES, "overrides": overrides,
            "dataset": "imagenet2012"}
    return inference.Loaded(
        model=model, variables=variables, meta=meta,
        class_names=[f"c{k}" for k in range(CLASSES)], config=None, image_size=size,
        multilabel=multilabel, ema=False, checkpoint="(in memory)", step=0,
        transform=None, preprocessing=Preprocess(image_size=size))


def flax_logits(loaded, images):
    """The Flax model's logits, compiled as training and evaluation run it."""
    apply = jax.jit(lambda v, x: loaded.model.apply(v, x, train=False))
    return np.asarray(apply(loaded.variables, jnp.asarray(images)))


def images_and_pixels(size, batch, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))


def normalised(pixels, p: Preprocess):
    """What the evaluation pipeline's normalisation makes of uint8 pixels."""
    return augment.normalize(tf.constant(pixels), p.mean, p.std).numpy()


@pytest.mark.parametrize("head", ["noah", "linear"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_format_gives_the_models_logits_at_two_batch_sizes(name, head, tmp_path):
    loaded = tiny_loaded(name, head)
    out = tmp_path / "export"
    # One platform (the multi-label test exports two); checked here, read as users would.
    record = export.write_export(loaded, str(out), export.FORMATS, platforms=("cpu",),
                                 check=False)
    size = loaded.image_size
    manifest = json.loads((out / "noah_export.json").read_text())
    assert manifest == json.loads(json.dumps(record))
    assert manifest["formats"].keys() == {"stablehlo", "savedmodel", "onnx"}

    # StableHLO, read with nothing but JAX and Flax, as the README shows.
    from flax import serialization
    logits_module = jax.export.deserialize(bytearray((out / "stablehlo/logits.jaxexport")
                                                     .read_bytes()))
    probabilities_module = jax.export.deserialize(bytearray(
        (out / "stablehlo/probabilities.jaxexport").read_bytes()))
    variables = serialization.msgpack_restore((out / "stablehlo/variables.msgpack").read_bytes())
    assert logits_module.platforms == ("cpu",)
    saved = tf.saved_model.load(str(out / "savedmodel/1"))
    import onnxruntime
    session = onnxruntime.InferenceSession(str(out / "model.onnx"),
                                           providers=["CPUExecutionProvider"])

    for batch in (1, 3):  # the logits entries at both sizes, the uint8 ones at 3
        images, pixels = images_and_pixels(size, batch, seed=batch)
        want = flax_logits(loaded, images)
        assert np.abs(want).max() > 0.1  # logits of a real scale
        errors = {
            "stablehlo": relative_error(logits_module.call(variables, images), want),
            "savedmodel": relative_error(saved.signatures["logits"](
                images=tf.constant(images))["logits"], want),
            "onnx": relative_error(session.run(["logits"], {"images": images})[0], want),
        }
        if batch == 3:
            want_from_pixels = flax_logits(loaded, normalised(pixels, loaded.preprocessing))
            errors["stablehlo uint8"] = relative_error(
                probabilities_module.call(variables, pixels),
                jax.nn.softmax(want_from_pixels, axis=-1))
            served = saved.signatures["serving_default"](images=tf.constant(pixels))
            errors["savedmodel uint8"] = relative_error(served["logits"], want_from_pixels)
            errors["savedmodel probabilities"] = relative_error(
                served["probabilities"], jax.nn.softmax(want_from_pixels, axis=-1))
        assert max(errors.values()) <= TOLERANCE, (batch, errors, np.abs(want).max())


def test_a_multi_label_export_gives_sigmoid_scores(tmp_path):
    loaded = tiny_loaded("mobilenetv2_035", "noah", multilabel=True, depthwise="auto")
    out = tmp_path / "export"
    export.write_export(loaded, str(out), ("stablehlo", "savedmodel"), platforms=("cpu", "cuda"),
                        check=False)
    images, pixels = images_and_pixels(loaded.image_size, 2)
    want = jax.nn.sigmoid(flax_logits(loaded, normalised(pixels, loaded.preprocessing)))
    module = jax.export.deserialize(bytearray((out / "stablehlo/probabilities.jaxexport")
                                              .read_bytes()))
    got = module.call(inference.load(str(out)).variables, pixels)
    assert relative_error(got, want) <= TOLERANCE
    served = tf.saved_model.load(str(out / "savedmodel/1")).signatures["serving_default"]
    assert relative_error(served(images=tf.constant(pixels))["probabilities"], want) <= TOLERANCE
    assert not np.allclose(np.asarray(got).sum(-1), 1.0)  # not a softmax


def test_the_uint8_entry_of_the_demo_makes_pixels_grey_as_its_source_does():
    """digits: the uint8 entry is p / 255 made grey, with the source's mean and std:
    the demo's own transform of an 8x8 image of levels 0 and 16 (p = 0, 255; at 8 px
    the resize is the identity)."""
    from noah_jax.data.digits import DigitsSource

    source = DigitsSource(seed=0, image_size=8, augment=False)
    loaded = inference.Loaded(model=None, variables={}, meta={"dataset": "digits"},
                              class_names=[], config=None, image_size=8, multilabel=False,
                              ema=False, checkpoint="", step=0, transform=None)
    pixels_of = export.pixels_of(loaded)
    levels = np.random.default_rng(0).integers(0, 2, (2, 8, 8)) * 16
    grey = (levels * 255 // 16).astype(np.uint8)
    colour = np.stack([grey] * 3, -1)
    np.testing.assert_allclose(np.asarray(pixels_of.normalise(jnp.asarray(colour))),
                               source.images_from_levels(levels), rtol=0, atol=1e-5)
    rgb = np.random.default_rng(1).integers(0, 256, (1, 4, 4, 3), dtype=np.uint8)
    luma = (rgb @ np.array(export.LUMA)) / 255
    np.testing.assert_allclose(np.asarray(pixels_of.normalise(jnp.asarray(rgb)))[..., 1],
                               (luma - source.mean) / source.std, atol=1e-5)


def test_predict_gives_the_same_top_5_from_an_export_as_from_the_workdir(demo_run, digit_pngs,
                                                                          tmp_path, capsys):
    workdir, _ = demo_run
    folder, paths, _ = digit_pngs
    out = tmp_path / "export"
    assert export.main([str(workdir), "--out", str(out), "--format", "stablehlo"]) == 0
    printed = capsys.readouterr().out
    assert "stablehlo" in printed and "EMA" in printed
    rows = {}
    for source in (workdir, out):
        assert predict.main([str(source), str(folder), "--format", "json"]) == 0
        rows[source] = json.loads(capsys.readouterr().out)
    assert len(rows[out]) == len(paths)
    for a, b in zip(rows[workdir], rows[out]):
        assert a["path"] == b["path"]
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in a["predictions"]],
                                   [p["probability"] for p in b["predictions"]], atol=1e-6)
    loaded = inference.load(str(out))
    assert loaded.ema and loaded.class_names == [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    """(checkpoint, export folder, images folder): a small ResNet saved with an ImageNet
    evaluation (resize, centre crop, ImageNet's mean and std), exported, and three RGB
    photos of other sizes."""
    root = tmp_path_factory.mktemp("rgb")
    loaded = tiny_loaded("resnet18", "noah")
    meta = {**loaded.meta, "class_names": loaded.class_names,
            **Preprocess(image_size=32).eval_record()}
    checkpoint.save_model(root / "ckpt", loaded.variables, meta)
    assert export.main([str(root / "ckpt"), "--out", str(root / "export"), "--format",
                        "stablehlo", "--platforms", "cpu"]) == 0
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(40, 50, 3), (32, 32, 3), (64, 36, 3)]):
        (root / "images").mkdir(exist_ok=True)
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        (root / "images" / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    return root / "ckpt", root / "export", root / "images"


def test_predict_on_an_rgb_export_matches_its_checkpoint(rgb_run, capsys):
    ckpt, out, images = rgb_run
    capsys.readouterr()
    rows = []
    for source in (ckpt, out):
        assert predict.main([str(source), str(images), "--format", "json", "--top-k", "5"]) == 0
        rows.append(json.loads(capsys.readouterr().out))
    for a, b in zip(*rows):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in a["predictions"]],
                                   [p["probability"] for p in b["predictions"]], atol=1e-6)
    from_export = inference.load(str(out))
    assert from_export.preprocessing == inference.load(str(ckpt)).preprocessing


def predict_refused(capsys, *args):
    with pytest.raises(SystemExit) as info:
        predict.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith("python -m noah_jax.predict: error: ")
    return err


def test_malformed_and_mismatched_exports_end_in_one_line(rgb_run, tmp_path, capsys):
    _, good, images = rgb_run

    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return predict_refused(capsys, folder, images)

    def manifest(change):
        def edit(folder):
            record = json.loads((folder / "noah_export.json").read_text())
            change(record)
            (folder / "noah_export.json").write_text(json.dumps(record))
        return edit

    assert "is not valid JSON" in broken(
        "json", lambda f: (f / "noah_export.json").write_text("{not json"))
    assert "format version 1 (it has 99)" in broken(
        "version", manifest(lambda r: r.update(format_version=99)))
    assert "lacks class_names" in broken("keys", manifest(lambda r: r.pop("class_names")))
    assert "cannot read the StableHLO module" in broken(
        "module", lambda f: (f / "stablehlo/logits.jaxexport").unlink())
    assert "is not a serialised jax.export module" in broken(
        "damaged", lambda f: (f / "stablehlo/logits.jaxexport").write_bytes(b"\x00" * 64))
    assert "holds no StableHLO modules (its formats: onnx)" in broken(
        "formats", manifest(lambda r: r.update(formats={"onnx": {"path": "model.onnx"}})))
    assert "says 48 px images and 7 classes: the files come from different exports" in broken(
        "size", manifest(lambda r: r.update(image_size=48)))

    # The variables of another model: the mismatched keys, counted and named.
    other = tiny_loaded("mobilenetv2_035", "noah")
    export.write_export(other, str(tmp_path / "other"), ("stablehlo",), platforms=("cpu",),
                        check=False)
    err = broken("variables", lambda f: shutil.copy(
        tmp_path / "other/stablehlo/variables.msgpack", f / "stablehlo/variables.msgpack"))
    assert "do not fit its module:" in err and "missing (" in err and "unexpected (" in err

    assert "no checkpoint in" in predict_refused(capsys, tmp_path / "other/stablehlo", images)


def test_export_mistakes_end_in_one_line_and_leave_nothing(rgb_run, tmp_path, capsys,
                                                          monkeypatch):
    ckpt, out, _ = rgb_run

    def refused(*args, status=1):
        with pytest.raises(SystemExit) as info:
            export.main([str(a) for a in args])
        err = capsys.readouterr().err
        assert info.value.code == status and err.count("\n") == 1, err
        return err

    assert "already holds an export" in refused(ckpt, "--out", out)
    assert "unknown format 'tflite'; choose from stablehlo, savedmodel, onnx" in refused(
        ckpt, "--out", tmp_path / "x", "--format", "stablehlo,tflite", status=2)
    assert "is an export" in refused(out, "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()

    # A failure half way (here the SavedModel) leaves neither the folder nor a partial one.
    def fail(*args):
        raise export.ExportError("the SavedModel failed")
    monkeypatch.setattr(export, "export_savedmodel", fail)
    assert "the SavedModel failed" in refused(ckpt, "--out", tmp_path / "y", "--format",
                                              "stablehlo,savedmodel", "--platforms", "cpu")
    assert os.listdir(tmp_path) == []


def test_an_export_computes_logits_only(rgb_run, tmp_path, capsys):
    _, out, _ = rgb_run
    loaded = inference.load(str(out))
    images = np.zeros((1, 32, 32, 3), np.float32)
    assert loaded.model.apply(loaded.variables, images, train=False).shape == (1, CLASSES)
    from noah_jax.errors import UserError
    with pytest.raises(UserError, match="load the checkpoint it was exported from"):
        loaded.model.apply(loaded.variables, images, train=False, mutable=["intermediates"])
    with pytest.raises(UserError, match="its image size is the one it was exported at"):
        inference.load(str(out), image_size=64)
    assert pathlib.Path(loaded.checkpoint) == out.resolve()
    # visualize needs the model's insides: it refuses an export before loading anything.
    from noah_jax import visualize
    capsys.readouterr()
    assert visualize.main([str(out), str(out / "noah_export.json"), "--out",
                           str(tmp_path / "figures")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is an export" in err and "give the checkpoint" in err
