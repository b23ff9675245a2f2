"""The loader (noah_jax.inference): checkpoints of every kind, class names, and the
evaluation preprocessing reproduced exactly on image files."""

import importlib
import json
import re
import shutil
import struct
import zlib

import jax
import numpy as np
import pytest
import tensorflow as tf

from helpers import demo_config
from noah_jax.train import checkpoint, trainer
from noah_jax import convert, data, inference
from noah_jax.data import catalog, pipeline
from noah_jax.data.digits import DigitsSource
from noah_jax.data.preprocess import EVAL_RECORD_FIELDS, Preprocess
from noah_jax.errors import CheckpointError, ConfigError, ImageFileError
from noah_jax.models import create_model, input_preprocessing

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def top1_count(loaded, images, labels):
    logits = jax.jit(lambda v, x: loaded.model.apply(v, x, train=False))(loaded.variables, images)
    return int((np.argmax(np.asarray(logits), -1) == labels).sum())


def write_png(path, pixels):
    path.write_bytes(tf.io.encode_png(np.asarray(pixels, np.uint8)).numpy())
    return str(path)


# ----------------------------------------------------------------------------------
# A training run.
# ----------------------------------------------------------------------------------
def test_a_workdir_loads_its_newest_checkpoint_config_and_ema(demo_run):
    workdir, results = demo_run
    source = DigitsSource(seed=0, image_size=32, augment=False)
    raw_params = checkpoint.restore_model(workdir / "checkpoints")[0]["params"]
    for path in (workdir, workdir / "checkpoints", f"{workdir}/checkpoints/"):
        loaded = inference.load(path)
        assert (loaded.step, loaded.ema, loaded.multilabel, loaded.image_size) == (
            6, True, False, 32)
        assert loaded.config.total_steps == 6 and loaded.config.ema_decay == 0.5
        assert loaded.class_names == list("0123456789")
        assert loaded.checkpoint == str(workdir / "checkpoints")
    # The EMA parameters score what the run's eval_ema scored, the raw ones its eval.
    assert top1_count(loaded, source.eval_images, source.eval_labels) == round(
        results["eval_ema/top1"] * 360)
    assert not np.array_equal(loaded.variables["params"]["head"]["query"]["kernel"],
                              raw_params["head"]["query"]["kernel"])
    raw = inference.load(workdir, ema=False)
    assert not raw.ema
    jax.tree.map(np.testing.assert_array_equal, raw.variables["params"], raw_params)
    assert top1_count(raw, source.eval_images, source.eval_labels) == round(
        results["eval/top1"] * 360)
    # The attention maps are sown for whoever wants to show them: [B, N, K, L].
    _, state = raw.model.apply(raw.variables, source.eval_images[:2], train=False,
                               mutable=["intermediates"])
    (attention,) = jax.tree.leaves(state["intermediates"]["head"]["attention"])
    assert attention.shape == (2, 4, 10, 16)  # 4 heads, 10 classes, 4x4 patches of 8 px
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)


def test_test_digits_written_as_png_come_back_as_the_eval_images_exactly(demo_run, digit_pngs):
    workdir, _ = demo_run
    _, paths, labels = digit_pngs
    source = DigitsSource(seed=0, image_size=32, augment=False)
    np.testing.assert_array_equal(source.eval_labels, labels)
    images = inference.load(workdir).preprocess(paths)
    assert images.dtype == np.float32
    np.testing.assert_array_equal(images, source.eval_images)


def test_any_image_becomes_an_8x8_digit_of_17_grey_levels(demo_run, tmp_path):
    loaded = inference.load(demo_run[0])
    rgb = np.random.default_rng(0).integers(0, 256, (32, 24, 3))
    path = write_png(tmp_path / "photo.png", rgb)
    # By hand: luma, the mean of each 4 x 3 block, one of the levels 0..16.
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    blocks = luma.reshape(8, 4, 8, 3).mean(axis=(1, 3))
    levels = np.round(blocks * 16 / 255)
    source = DigitsSource(seed=0, image_size=32, augment=False)
    np.testing.assert_array_equal(loaded.preprocess([path]),
                                  source.images_from_levels(levels[None]))
    assert inference.digit_levels(np.full((5, 7, 3), 255)).tolist() == [[16.0] * 8] * 8


# ----------------------------------------------------------------------------------
# A folder dataset: its class names, and exactly its evaluation pipeline.
# ----------------------------------------------------------------------------------
def test_a_folder_run_records_its_class_names_and_preprocesses_as_it_evaluated(tmp_path):
    rng = np.random.default_rng(1)
    classes = ["cat", "dog", "fox"]
    for split, per_class in (("train", 3), ("val", 2)):
        for c, name in enumerate(classes):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for j in range(per_class):
                h, w = rng.integers(30, 60, 2)
                pixels = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
                encoded = (tf.io.encode_jpeg(pixels) if j % 2 else tf.io.encode_png(pixels))
                suffix = ".jpg" if j % 2 else ".PNG"
                (tmp_path / "images" / split / name / f"{j}{suffix}").write_bytes(
                    encoded.numpy())
    config = demo_config(dataset__name="folder", dataset__data_dir=str(tmp_path / "images"),
                         dataset__num_classes=3, total_steps=1, eval_every_steps=1,
                         checkpoint_every_steps=1, log_every_steps=1)
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
    meta = checkpoint.read_meta(tmp_path / "run" / "checkpoints", step=1)
    assert meta["class_names"] == classes
    # The run's evaluation input (DeiT's: ImageNet mean/std, bicubic, crop ratio 0.875),
    # in the meta and in config.json.
    assert {k: meta[k] for k in EVAL_RECORD_FIELDS} == {
        "image_size": 32, "eval_crop": "center", "mean": list(MEAN), "std": list(STD),
        "eval_interpolation": "bicubic", "eval_crop_ratio": 0.875}
    written = json.loads((tmp_path / "run" / "config.json").read_text())["dataset"]
    assert (written["mean"], written["eval_interpolation"], written["eval_crop_ratio"]) == (
        list(MEAN), "bicubic", 0.875)

    loaded = inference.load(tmp_path / "run")
    assert loaded.class_names == classes and not loaded.ema
    assert loaded.preprocessing.eval_record() == {k: meta[k] for k in EVAL_RECORD_FIELDS}
    paths = inference.image_files([str(tmp_path / "images" / "val")])
    assert len(paths) == 6 and paths == sorted(paths)
    resolved = input_preprocessing.resolve(config)  # as training resolved it
    source = data.get_source(resolved.dataset, seed=config.seed, augment=config.augment)
    (batch,) = source.eval_batches(local_batch_size=6, process_index=0, process_count=1)
    np.testing.assert_array_equal(loaded.preprocess(paths), batch["image"])
    assert [classes[k] for k in batch["label"]] == [p.split("/")[-2] for p in paths]
    # The checkpoints alone (no config.json beside them): what their meta records.
    shutil.copytree(tmp_path / "run" / "checkpoints", tmp_path / "moved" / "ckpts")
    alone = inference.load(tmp_path / "moved" / "ckpts")
    assert alone.config is None
    assert alone.preprocessing == Preprocess.from_eval_record(meta)
    np.testing.assert_array_equal(alone.preprocess(paths), batch["image"])


# ----------------------------------------------------------------------------------
# Converted checkpoints: the reference's evaluation preprocessing of the family.
# ----------------------------------------------------------------------------------
def convert_random(tmp_path, name, num_classes, *flags, **overrides):
    model = create_model(name, num_classes=num_classes, **overrides)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.1,
                             shapes)
    np.savez(tmp_path / f"{name}.npz", **convert.flax_to_torch(variables, name))
    out = tmp_path / f"{name}_converted"
    convert.main(["--model", name, "--input", str(tmp_path / f"{name}.npz"),
                  "--output", str(out), *flags,
                  *(f"--override={k}={v}" for k, v in overrides.items() if k != "img_size")])
    return out, variables


def test_a_converted_deit_uses_its_bicubic_imagenet_evaluation_at_the_models_size(tmp_path):
    out, variables = convert_random(tmp_path, "deit_tiny_050_patch16_224", 1000, img_size=32,
                                    depth=1)
    loaded = inference.load(out)
    assert (loaded.image_size, loaded.config, loaded.ema, loaded.multilabel) == (
        32, None, False, False)
    assert loaded.class_names == catalog.imagenet_class_names()
    jax.tree.map(np.testing.assert_array_equal, loaded.variables["params"], variables["params"])

    grey = write_png(tmp_path / "grey.png", np.full((50, 40, 3), 200))
    photo = write_png(tmp_path / "photo.png",
                      np.random.default_rng(2).integers(0, 256, (50, 70, 3)))
    images = loaded.preprocess([grey, photo])
    assert images.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(images[0], np.broadcast_to((200 / 255 - MEAN) / STD, (32, 32, 3)),
                               atol=1e-5)
    # Shorter side bicubic to 32 / 0.875 = 36, centre crop 32: DeiT's evaluation.
    assert loaded.preprocessing == Preprocess(image_size=32, eval_interpolation="bicubic")
    expected = pipeline.eval_image(tf.io.read_file(photo), loaded.preprocessing)
    np.testing.assert_array_equal(images[1], expected.numpy())
    bilinear = pipeline.eval_image(tf.io.read_file(photo), Preprocess(image_size=32))
    assert not np.array_equal(images[1], bilinear.numpy())

    with pytest.raises(ConfigError, match=r"takes 32 px images \(the model "
                                          r"\(deit_tiny_050_patch16_224\) says so\); image "
                                          r"size 64 does not fit it"):
        inference.load(out, image_size=64)


MIXER = dict(img_size=32, num_blocks=1, embed_dim=32)
# The reference's Mixer/gMLP evaluation at 32 px: mean = std = 0.5, shorter side bicubic
# to floor(32 / 0.9) = 35, centre crop 32.
MIXER_EVAL = Preprocess(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                        eval_interpolation="bicubic", eval_crop_ratio=0.9)


def test_a_converted_mixer_is_fed_its_own_normalisation_and_bicubic_crop(tmp_path):
    out, _ = convert_random(tmp_path, "mixer_s16_224", 1000, **MIXER)
    meta = checkpoint.read_meta(out, step=0)
    assert {k: meta[k] for k in EVAL_RECORD_FIELDS} == {
        "image_size": 32, "eval_crop": "center", "mean": [0.5] * 3, "std": [0.5] * 3,
        "eval_interpolation": "bicubic", "eval_crop_ratio": 0.9}
    loaded = inference.load(out)
    assert loaded.preprocessing == MIXER_EVAL and loaded.image_size == 32
    photo = write_png(tmp_path / "photo.png",
                      np.random.default_rng(3).integers(0, 256, (50, 70, 3)))
    grey = write_png(tmp_path / "grey.png", np.full((40, 50, 3), 200))
    images = loaded.preprocess([photo, grey])
    np.testing.assert_array_equal(
        images[0], pipeline.eval_image(tf.io.read_file(photo), MIXER_EVAL).numpy())
    np.testing.assert_allclose(images[1], (200 / 255 - 0.5) / 0.5, atol=1e-5)


def old_converter_meta(name, num_classes, overrides, source):
    """The meta `python -m noah_jax.convert` wrote before it recorded preprocessing."""
    return {"model": name, "head": "noah", "num_classes": num_classes,
            "overrides": overrides, "source": str(source), "dropped_head": False}


def test_an_old_converted_checkpoint_gets_its_familys_preprocessing(tmp_path):
    out, variables = convert_random(tmp_path, "mixer_s16_224", 7, **MIXER)
    old = tmp_path / "old_converted"
    checkpoint.save_model(old, variables, old_converter_meta(
        "mixer_s16_224", 7, {"img_size": 32, "num_blocks": 1, "embed_dim": 32},
        tmp_path / "mixer_s16_224.npz"))
    loaded = inference.load(old)
    assert loaded.config is None and loaded.preprocessing == MIXER_EVAL
    photo = write_png(tmp_path / "photo.png",
                      np.random.default_rng(4).integers(0, 256, (61, 45, 3)))
    np.testing.assert_array_equal(loaded.preprocess([photo]),
                                  inference.load(out).preprocess([photo]))
    # A CNN converted the old way: torchvision's (ImageNet, bilinear, 0.875) at 224.
    cnn, cnn_variables = convert_random(tmp_path, "mobilenetv2_035", 3)
    old_cnn = tmp_path / "old_cnn"
    checkpoint.save_model(old_cnn, cnn_variables, old_converter_meta(
        "mobilenetv2_035", 3, {}, tmp_path / "mobilenetv2_035.npz"))
    assert inference.load(old_cnn).preprocessing == Preprocess(image_size=224)
    assert inference.load(old_cnn, image_size=48).preprocessing == Preprocess(image_size=48)


def test_an_old_training_workdir_means_imagenet_and_bilinear(tmp_path):
    """A run written before these settings: its config.json has no dataset.mean, std,
    eval_interpolation nor augment.train_interpolation, its meta no preprocessing. It
    trained with ImageNet's mean/std and bilinear resizing, whatever its model, at its
    config's crop ratio."""
    config = importlib.import_module("configs.mixer_noah").get_config()
    config.model.overrides.update(MIXER)
    config.dataset.update(dict(name="folder", image_size=32, num_classes=5,
                               eval_crop_ratio=0.9))
    written = json.loads(config.to_json())
    for name in ("mean", "std", "eval_interpolation"):
        del written["dataset"][name]
    del written["augment"]["train_interpolation"]
    workdir = tmp_path / "old_run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(written))
    model = create_model("mixer_s16_224", num_classes=5, **MIXER)
    variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    overrides = {k: v for k, v in config.model.overrides.to_dict().items() if v is not None}
    checkpoint.save_model(workdir / "checkpoints", variables, {
        "model": "mixer_s16_224", "head": "noah", "num_classes": 5, "overrides": overrides,
        "dataset": "folder", "class_names": list("abcde"), "multilabel": False,
        "loss": "softmax_xent", "image_size": 32})
    loaded = inference.load(workdir)
    assert loaded.preprocessing.eval_record() == Preprocess(
        image_size=32, eval_crop_ratio=0.9).eval_record()
    assert loaded.preprocessing.train_interpolation == "bilinear"
    # Its checkpoints without the config.json: the base config's values.
    shutil.copytree(workdir / "checkpoints", tmp_path / "elsewhere")
    assert inference.load(tmp_path / "elsewhere").preprocessing == Preprocess(image_size=32)


def test_a_converted_cnn_takes_the_image_size_asked_for(tmp_path):
    (tmp_path / "names.txt").write_text("a\nb\nc\nd\ne\n")
    out, _ = convert_random(tmp_path, "mobilenetv2_035", 5, "--class-names",
                            str(tmp_path / "names.txt"))
    loaded = inference.load(out, image_size=48)
    assert loaded.image_size == 48 and loaded.class_names == list("abcde")
    assert inference.load(out).image_size == 224
    path = write_png(tmp_path / "x.png", np.zeros((60, 60, 3)))
    assert loaded.preprocess([path]).shape == (1, 48, 48, 3)


# ----------------------------------------------------------------------------------
# Mistakes.
# ----------------------------------------------------------------------------------
def test_a_path_without_a_checkpoint_says_what_is_expected(tmp_path):
    expected = ("expected a training workdir (with checkpoints/ inside), its checkpoints/ "
                "folder, or a converted checkpoint (the --output of python -m noah_jax.convert)")
    with pytest.raises(CheckpointError) as info:
        inference.load(tmp_path / "nowhere")
    assert str(info.value) == f"{tmp_path / 'nowhere'}: no such file or folder; {expected}"
    with pytest.raises(CheckpointError) as info:
        inference.load(tmp_path)
    assert str(info.value) == f"no checkpoint in {tmp_path}: {expected}"


def small_checkpoint(path, **meta):
    checkpoint.save_model(path, {"params": {"w": np.zeros(3, np.float32)}}, meta)
    return path


def test_checkpoints_that_cannot_classify_are_refused_by_name(tmp_path):
    unknown = small_checkpoint(tmp_path / "unknown", model="resnet9000", num_classes=3)
    with pytest.raises(CheckpointError, match=r"^checkpoint .*unknown \(step 0\) is of a model "
                                              r"this code cannot build: unknown model "
                                              r"'resnet9000'\. .*Known models: resnet18, "):
        inference.load(unknown)
    anonymous = small_checkpoint(tmp_path / "anonymous", step=3)
    with pytest.raises(CheckpointError, match=r"does not say which model it holds"):
        inference.load(anonymous)
    backbone = small_checkpoint(tmp_path / "backbone", model="resnet18", num_classes=10,
                                dropped_head=True)
    with pytest.raises(CheckpointError, match=r"holds a backbone without its head \(converted "
                                              r"with --drop-head\)"):
        inference.load(backbone)
    other = small_checkpoint(tmp_path / "other", model="resnet18", num_classes=10)
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=r"\(step 0: resnet18 .*\) does not fit the model: \d+ keys missing "
                             r"\(e\.g\. [^)]*\), 1 unexpected key \(params/w\)$") as error:
        inference.load(other)
    assert "unexpected in checkpoint: params/w (3,)" in error.value.problems


def huge_png_header(path, side=20000):
    """A PNG signature and IHDR chunk declaring side x side RGB pixels, and nothing else."""
    ihdr = struct.pack(">II5B", side, side, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(
        ">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)
    return str(path)


def test_a_jpeg_cut_in_its_header_is_told_from_one_cut_in_its_scan():
    """A JPEG that ends before its first scan is refused before TensorFlow decodes it
    (libjpeg would print on stderr); one that reaches its scan is left to decoding."""
    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)
    for encoded in (tf.io.encode_jpeg(image).numpy(),
                    tf.io.encode_jpeg(image, progressive=True, quality=20).numpy(),
                    tf.io.encode_jpeg(image[..., :1], xmp_metadata="<x>" * 50).numpy()):
        scan = encoded.index(b"\xff\xda")  # start of scan, then its header's length
        scan_end = scan + 2 + int.from_bytes(encoded[scan + 2:scan + 4], "big")
        assert not inference._jpeg_ends_before_its_scan(encoded)
        assert not inference._jpeg_ends_before_its_scan(encoded[:scan_end])
        assert all(inference._jpeg_ends_before_its_scan(encoded[:n]) for n in range(3, scan_end))
        # A few bytes between markers, as some writers leave them, are skipped.
        assert not inference._jpeg_ends_before_its_scan(encoded[:2] + b"\0\0" + encoded[2:])
    assert inference._jpeg_ends_before_its_scan(b"\xff\xd8\xff\xe0 cut short")
    assert inference._jpeg_ends_before_its_scan(b"\xff\xd8\xff\xd9")  # no image


def test_images_that_cannot_be_used_are_named(demo_run, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ImageFileError, match=r"^folder .*empty holds no images \(files ending "
                                             r"in \.jpg, \.jpeg, \.png, \.gif, \.bmp, in any "
                                             r"case\)$"):
        inference.image_files([str(tmp_path / "empty")])
    with pytest.raises(ImageFileError, match=r"^.*missing\.png: no such file or folder$"):
        inference.image_files([str(tmp_path / "missing.png")])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    huge = huge_png_header(tmp_path / "huge.png")
    for loaded in (inference.load(demo_run[0]),  # digits
                   inference.load(convert_random(tmp_path, "mobilenetv2_035", 3)[0])):
        with pytest.raises(ImageFileError,
                           match=rf"^{re.escape(str(broken))} cannot be decoded as an image"):
            loaded.preprocess([str(broken)])
        with pytest.raises(ImageFileError,
                           match=rf"^{re.escape(huge)} has more than 89,478,485 pixels"):
            loaded.preprocess([huge])
