"""TFDS sources and the trainer on them, under tfds.testing.mock_data (tests/tfds_fakes.py).

The fakes use the real builders' metadata and feature specs for imagenet2012,
imagenet2012_real, coco/2017 and voc/2007; examples are functions of their index, so
every label can be checked against the truth.
"""

import collections
import importlib
import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

import tfds_fakes  # noqa: E402
from configs import common  # noqa: E402
from helpers import assert_follows_source_protocol, free_port, set_fields  # noqa: E402
from noah_jax.train import checkpoint, trainer  # noqa: E402
from noah_jax import inference, visualize
from noah_jax.data import catalog, get_eval_set, get_source, tfds_source  # noqa: E402
from noah_jax.models import create_model, input_preprocessing, layers  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPLITS = {
    "imagenet2012": {"train": 40, "validation": 13},
    "imagenet2012_real": {"validation": 13},
    "coco/2017": {"train": 30, "validation": 11},
    "voc/2007": {"train": 6, "validation": 4, "test": 7},
    "cifar10": {"train": 12, "test": 5},
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    with tfds_fakes.fake_tfds(path, SPLITS):
        yield path


def dataset_config(data_dir, name, **changes):
    c = common.base_config()
    c.dataset.name = name
    c.dataset.data_dir = data_dir
    c.dataset.image_size = 32
    c.dataset.num_classes = {"coco/2017": 80, "voc/2007": 20, "cifar10": 10}.get(name, 1000)
    c.dataset.shuffle_buffer = 16
    return set_fields(c, **changes)


def source_of(c):
    c = input_preprocessing.resolve(c)  # the model's mean/std and eval resize, as training
    return get_source(c.dataset, seed=c.seed, augment=c.augment,
                      label_smoothing=c.label_smoothing)


def eval_set_of(c, name):
    """Dataset `name`'s evaluation split, preprocessed as `c`'s evaluation images."""
    c = input_preprocessing.resolve(c)
    return get_eval_set(c.dataset, name, augment=c.augment)


def eval_rows(batches_fn, process_count, local_batch_size):
    """All processes' eval batches: (labels of mask-1 rows, per-process batch counts)."""
    labels, counts = [], []
    for p in range(process_count):
        batches = list(batches_fn(local_batch_size=local_batch_size, process_index=p,
                                  process_count=process_count))
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (local_batch_size, 32, 32, 3)
            assert b["image"].dtype == np.float32
            labels.extend(b["label"][b["mask"] > 0])
            assert not b["label"][b["mask"] == 0].any()  # padding is zeros
    return np.asarray(labels), counts


# ----------------------------------------------------------------------------------
# Preparing, naming and configuring.
# ----------------------------------------------------------------------------------
def test_an_unprepared_dataset_says_how_to_prepare_it(tmp_path):
    c = dataset_config(str(tmp_path), "imagenet2012")
    with pytest.raises(tfds_source.DatasetNotPreparedError) as e:
        source_of(c)
    message = str(e.value)
    for needle in ("not prepared", str(tmp_path), "ILSVRC2012_img_train.tar",
                   "ILSVRC2012_img_val.tar", f"{tmp_path}/downloads/manual",
                   f"python -m noah_jax.prepare imagenet2012 --data_dir={tmp_path}",
                   "310 GB"):
        assert needle in message, (needle, message)
    assert "\n" not in message
    c = dataset_config(str(tmp_path), "coco/2017")
    with pytest.raises(tfds_source.DatasetNotPreparedError) as e:
        source_of(c)
    for needle in (f"python -m noah_jax.prepare coco/2017 --data_dir={tmp_path}",
                   "train2017.zip", "54 GB"):
        assert needle in str(e.value), (needle, str(e.value))


def test_main_reports_an_unprepared_dataset_once_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "main.py"),
               f"--config={ROOT / 'configs' / 'resnet18_noah.py'}",
               f"--workdir={workdir}", f"--config.dataset.data_dir={tmp_path}"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    output = proc.stderr + proc.stdout
    assert output.count(f"python -m noah_jax.prepare imagenet2012 --data_dir={tmp_path}") == 1
    assert "Traceback" not in output
    assert not workdir.exists()  # no config.json, no event file, no checkpoint folder


def test_unknown_names_and_wrong_class_counts_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="available: .*coco/2017.*imagenet2012.*folder"):
        source_of(dataset_config(str(tmp_path), "imagenet2021"))
    with pytest.raises(ValueError, match="has 80 classes.*set it to 80"):
        source_of(dataset_config(str(tmp_path), "coco/2017", dataset__num_classes=81))
    with pytest.raises(ValueError, match="evaluation-only"):
        source_of(dataset_config(str(tmp_path), "imagenet_v2"))
    with pytest.raises(ValueError, match="train_crop must be one of"):
        source_of(dataset_config(str(tmp_path), "imagenet2012", augment__train_crop="random"))
    assert tfds_source.spec_for("imagenette/320px-v2").tfds_name == "imagenette/320px-v2"
    assert tfds_source.spec_for("imagenet2012:5.1.0").num_classes == 1000


# ----------------------------------------------------------------------------------
# ImageNet.
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("process_count,local_batch", [(1, 5), (2, 4), (3, 2)])
def test_imagenet_eval_covers_every_image_once_with_its_label(data_dir, process_count,
                                                              local_batch):
    source = source_of(dataset_config(data_dir, "imagenet2012"))
    assert (source.num_train_examples, source.num_eval_examples) == (40, 13)
    assert source.image_shape == (32, 32, 3) and not source.multilabel
    labels, counts = eval_rows(source.eval_batches, process_count, local_batch)
    assert len(set(counts)) == 1  # the same number of batches on every process
    truth = [tfds_fakes.single_label("validation", i) for i in range(13)]
    assert collections.Counter(labels.tolist()) == collections.Counter(truth)
    assert labels.dtype == np.int32


def test_imagenet_train_shards_epochs_resume_and_recipe_augmentation(data_dir):
    c = dataset_config(data_dir, "imagenet2012")
    source = source_of(c)
    truth = collections.Counter(tfds_fakes.single_label("train", i) for i in range(40))
    seen = collections.Counter()
    for p in range(2):  # each process's first epoch is its own 20 images, once
        it = source.train_batches(start_step=0, local_batch_size=4, process_index=p,
                                  process_count=2)
        epoch = np.concatenate([next(it)["label"] for _ in range(5)])
        assert len(set(epoch.tolist())) == 20
        seen.update(epoch.tolist())
    assert seen == truth

    # The DeiT recipe: RandAugment, erasing, mixup/cutmix and repeated augmentation.
    c.augment.update(dict(rand_augment_layers=2, random_erasing=0.25, mixup_alpha=0.8,
                          cutmix_alpha=1.0, repeats=3))
    c.label_smoothing = 0.1
    source = source_of(c)

    def batches(start, n):
        it = source.train_batches(start_step=start, local_batch_size=6, process_index=0,
                                  process_count=1)
        return [next(it) for _ in range(n)]

    straight = batches(0, 22)  # 132 positions: past the first 40 x 3 = 120-long epoch
    resumed = batches(19, 3)   # starts 6 positions before the epoch boundary
    for a, b in zip(straight[19:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    for b in straight:
        assert b["image"].shape == (6, 32, 32, 3) and b["label"].shape == (6, 1000)
        np.testing.assert_allclose(b["label"].sum(1), 1.0, rtol=1e-5)  # a distribution
        assert b["label"].min() >= 0.1 / 1000 * 0.999  # smoothed: no zero target
    # Repeated augmentation: runs of 3 copies of an image, each augmented differently.
    # Without mixing, the copies' labels are equal and their pixels are not.
    c.augment.update(dict(mixup_alpha=0.0, cutmix_alpha=0.0))
    it = source_of(c).train_batches(start_step=0, local_batch_size=6, process_index=0,
                                    process_count=1)
    b = next(it)
    assert b["label"].dtype == np.int32
    np.testing.assert_array_equal(b["label"][0::3], b["label"][1::3])
    np.testing.assert_array_equal(b["label"][0::3], b["label"][2::3])
    assert not np.array_equal(b["image"][0], b["image"][1])


def test_resume_across_epoch_boundary_and_reshuffled_epochs(data_dir):
    source = source_of(dataset_config(data_dir, "imagenet2012"))

    def labels(start, n):
        it = source.train_batches(start_step=start, local_batch_size=8, process_index=0,
                                  process_count=1)
        return [next(it)["label"] for _ in range(n)]

    straight = labels(0, 12)  # 96 positions: epochs 0, 1 and part of 2
    for a, b in zip(straight[4:], labels(4, 8)):  # step 4 starts in the middle of epoch 0
        np.testing.assert_array_equal(a, b)
    epochs = np.concatenate(straight)[:80].reshape(2, 40)
    assert sorted(epochs[0]) == sorted(epochs[1])  # each epoch is a permutation
    assert not np.array_equal(epochs[0], epochs[1])  # a different one


def test_images_over_max_image_pixels_are_neither_trained_on_nor_scored(data_dir, caplog):
    """The fake images have 600 to 3,600 pixels; 14 of 40 training and 3 of 13
    validation images have more than 2,000."""
    def over(split, n):
        return [i for i in range(n)
                if np.prod(tfds_fakes.image("imagenet2012", split, i).shape[:2]) > 2000]

    def labels_except(split, n, left_out):
        return [tfds_fakes.single_label(split, i) for i in range(n) if i not in left_out]

    source = source_of(dataset_config(data_dir, "imagenet2012",
                                      dataset__max_image_pixels=2000))
    assert len(over("train", 40)) == 14 and over("validation", 13) == [0, 6, 10]
    train_labels = labels_except("train", 40, over("train", 40))
    eval_labels = labels_except("validation", 13, [0, 6, 10])

    def labels(start, n):
        it = source.train_batches(start_step=start, local_batch_size=8, process_index=0,
                                  process_count=1)
        return [next(it)["label"] for _ in range(n)]

    with caplog.at_level(logging.WARNING):
        straight = labels(0, 13)  # 104 positions: 4 epochs of the 26 small images
    assert ("process 0: 14 of its 40 training images have more than max_image_pixels=2000 "
            "pixels") in caplog.text
    for epoch in np.concatenate(straight).reshape(4, 26):
        assert sorted(epoch) == sorted(train_labels)
    for a, b in zip(straight[7:], labels(7, 3)):  # step 7 starts in epoch 2 (56 = 2*26 + 4)
        np.testing.assert_array_equal(a, b)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        scored, counts = eval_rows(source.eval_batches, 2, 4)
    assert sorted(scored.tolist()) == sorted(eval_labels)
    assert counts == [2, 2]  # shards of 7 and 6, as without the limit
    skipped = re.findall(r"process (\d): (\d+) of (\d+) evaluation images were not scored",
                         caplog.text)
    # Process 0 reads images 0-6, process 1 images 7-12.
    assert sorted(skipped) == [("0", "2", "7"), ("1", "1", "6")]


def test_cifar_png_images_through_the_non_jpeg_path(data_dir):
    c = dataset_config(data_dir, "cifar10", dataset__eval_crop_ratio=1.0)
    source = source_of(c)
    assert_follows_source_protocol(source, name="cifar10", num_classes=10,
                                   image_shape=(32, 32, 3), num_train_examples=12,
                                   # TFDS names CIFAR's classes when it builds the data;
                                   # the fake's metadata has the builder's bare ClassLabel.
                                   num_eval_examples=5, class_names=list("0123456789"))
    labels, _ = eval_rows(source.eval_batches, 1, 4)
    assert sorted(labels) == sorted(tfds_fakes.single_label("test", i, 10) for i in range(5))
    # At 32 px with crop ratio 1 the eval image is the stored PNG, normalised.
    batch = next(source.eval_batches(local_batch_size=5, process_index=0, process_count=1))
    stored = {tfds_fakes.single_label("test", i, 10):
              tfds_fakes.example("cifar10", "test", i)["image"] for i in range(5)}
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for image, label in zip(batch["image"], batch["label"]):
        np.testing.assert_allclose(image, (stored[label] / 255.0 - mean) / std, atol=1e-5)
    train = next(source.train_batches(start_step=0, local_batch_size=4, process_index=0,
                                      process_count=1))
    assert train["image"].shape == (4, 32, 32, 3) and np.isfinite(train["image"]).all()
    assert train["image"].std() > 0.3  # real pixels, not padding


def test_imagenet_real_labels_and_metric(data_dir):
    c = dataset_config(data_dir, "imagenet2012")
    with pytest.raises(tfds_source.DatasetNotPreparedError):
        eval_set_of(c, "imagenet_v2")  # not prepared
    real = eval_set_of(c, "imagenet2012_real")
    assert real.label_type == "real_labels" and real.num_examples == 13
    labels, _ = eval_rows(real.batches, 2, 4)
    truth = [tfds_fakes.example("imagenet2012_real", "validation", i)["real_label"]
             for i in range(13)]
    assert sorted(map(tuple, (np.flatnonzero(row).tolist() for row in labels))) == sorted(
        map(tuple, truth))


# ----------------------------------------------------------------------------------
# COCO / VOC multi-label.
# ----------------------------------------------------------------------------------
def multi_hot(ids, k):
    row = np.zeros(k, np.float32)
    row[list(ids)] = 1.0
    return row


@pytest.mark.parametrize("drop_unlabeled", [True, False])
def test_coco_multi_hot_labels_and_unlabeled_images(data_dir, drop_unlabeled):
    c = dataset_config(data_dir, "coco/2017", dataset__drop_unlabeled=drop_unlabeled)
    source = source_of(c)
    assert source.multilabel and source.num_classes == 80
    ids = [tfds_fakes.coco_label_ids("validation", i) for i in range(11)]
    kept = [x for x in ids if x or not drop_unlabeled]
    assert source.num_eval_examples == len(kept) == (8 if drop_unlabeled else 11)
    labels, counts = eval_rows(source.eval_batches, 2, 3)
    assert len(set(counts)) == 1 and labels.dtype == np.float32
    truth = sorted(tuple(multi_hot(x, 80)) for x in kept)
    assert sorted(map(tuple, labels)) == truth
    # Training labels: multi-hot rows of the train split's labelled images only.
    it = source.train_batches(start_step=0, local_batch_size=6, process_index=0,
                              process_count=1)
    train_truth = {tuple(multi_hot(tfds_fakes.coco_label_ids("train", i), 80))
                   for i in range(30)}
    for _ in range(3):
        b = next(it)
        assert b["label"].shape == (6, 80)
        assert all(tuple(row) in train_truth for row in b["label"])
        assert (b["label"].sum(1) > 0).all() or not drop_unlabeled


VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]


def test_voc_uses_trainval_and_test(data_dir):
    source = source_of(dataset_config(data_dir, "voc/2007"))
    labelled_test_images = sum(1 for i in range(7) if tfds_fakes.coco_label_ids("test", i, 20))
    assert_follows_source_protocol(source, name="voc/2007", num_classes=20,
                                   image_shape=(32, 32, 3),
                                   num_train_examples=6 + 4,  # train + validation
                                   num_eval_examples=labelled_test_images, multilabel=True,
                                   class_names=VOC_CLASSES)
    labels, _ = eval_rows(source.eval_batches, 1, 8)
    assert labels.shape[1] == 20


# ----------------------------------------------------------------------------------
# The trainer on TFDS data.
# ----------------------------------------------------------------------------------
def tiny_config(data_dir, name, **changes):
    c = importlib.import_module("configs.vit_noah").get_config("demo")
    c.model.overrides.update(dict(depth=1, embed_dim=32, attn_heads=2, img_size=32,
                                  patch_size=8))
    c.dataset = dataset_config(data_dir, name).dataset
    c.num_epochs, c.total_steps = 0.0, 4
    c.batch_size, c.eval_batch_size = 16, 8
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 4
    return set_fields(c, **changes)


def direct_logits(config, variables, batches_fn):
    """Logits and labels of every eval row, by applying the model directly."""
    model = create_model(config.model.name, num_classes=config.dataset.num_classes,
                         head=config.model.head, **config.model.overrides.to_dict())
    images, labels = [], []
    for b in batches_fn(local_batch_size=64, process_index=0, process_count=1):
        keep = b["mask"] > 0
        images.append(b["image"][keep])
        labels.append(b["label"][keep])
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return (np.asarray(apply(variables, np.concatenate(images)), np.float64),
            np.concatenate(labels))


@pytest.fixture(scope="module")
def imagenet_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("imagenet_run")
    # ImageNet's evaluations: ImageNet-V2 is not prepared (skipped), ReaL is.
    config = tiny_config(data_dir, "imagenet2012", augment__rand_augment_layers=2,
                         augment__mixup_alpha=0.8, augment__cutmix_alpha=1.0,
                         augment__random_erasing=0.25, augment__repeats=3)
    common.imagenet_extra_evals(config)
    return config, workdir, trainer.train_and_evaluate(config, str(workdir))


def test_imagenet_training_and_exact_evaluation(imagenet_run):
    config, workdir, results = imagenet_run
    assert results["eval/count"] == 13 and results["eval/imagenet2012_real/count"] == 9
    assert not any("imagenet_v2" in key for key in results)  # not prepared: skipped
    variables, meta = checkpoint.restore_model(workdir / "checkpoints")
    assert meta["class_names"] == catalog.imagenet_class_names()  # the synsets TFDS ships
    source = source_of(config)
    logits, labels = direct_logits(config, variables, source.eval_batches)
    assert results["eval/top1"] == pytest.approx(np.mean(logits.argmax(1) == labels), abs=1e-9)
    logits, real = direct_logits(config, variables,
                                 eval_set_of(config, "imagenet2012_real").batches)
    has = real.sum(1) > 0
    hits = real[np.arange(len(real)), logits.argmax(1)] > 0
    assert results["eval/imagenet2012_real/top1"] == pytest.approx(hits[has].mean(), abs=1e-9)


def sklearn_map(logits, labels):
    metrics = pytest.importorskip("sklearn.metrics")
    aps = [metrics.average_precision_score(labels[:, k], logits[:, k])
           for k in range(labels.shape[1]) if labels[:, k].any()]
    return float(np.mean(aps))


@pytest.fixture(scope="module")
def coco_run(data_dir, imagenet_run, tmp_path_factory):
    """COCO fine-tuning at 48 px from the 32 px ImageNet run, without its head."""
    _, imagenet_workdir, _ = imagenet_run
    workdir = tmp_path_factory.mktemp("coco_run")
    config = tiny_config(data_dir, "coco/2017", loss="sigmoid_xent",
                         evals__val__type="multilabel",
                         init_from__path=str(imagenet_workdir / "checkpoints"),
                         init_from__drop_head=True, dataset__image_size=48,
                         model__overrides__img_size=48, augment__train_crop="resize",
                         augment__eval_crop="resize", eval_batch_size=24)
    results = trainer.train_and_evaluate(config, str(workdir))
    visualize.run_attention_figure(config, str(workdir))  # as main.py draws it after a run
    return config, workdir, results


def test_coco_fine_tuning_from_imagenet_and_exact_map(coco_run, imagenet_run):
    config, workdir, results = coco_run
    assert results["eval/count"] == 8
    variables, meta = checkpoint.restore_model(workdir / "checkpoints")
    # Read back as multi-label: scores are sigmoids, classes named by the TFDS feature
    # (the fake's bare ClassLabel numbers them).
    assert (meta["multilabel"], meta["class_names"]) == (True, [str(k) for k in range(80)])
    assert inference.load(workdir).multilabel
    # The recipe's end-of-run figure (4 images x (1 + 4 NOAH heads)), multi-hot truths.
    from PIL import Image
    from noah_jax import figures
    with Image.open(workdir / "attention.png") as png:
        assert png.size == figures.figure_size(4, 1 + 4)
    logits, labels = direct_logits(config, variables, source_of(config).eval_batches)
    assert results["eval/mAP"] == pytest.approx(sklearn_map(logits, labels), abs=1e-6)
    # The ImageNet backbone (32 px) initialised the 48 px model: its 4 x 4 grid of
    # position embeddings (no class token with the NOAH head) resized to 6 x 6.
    _, imagenet_workdir, _ = imagenet_run
    stored, _ = checkpoint.restore_model(imagenet_workdir / "checkpoints")
    assert stored["params"]["pos_embed"].shape == (1, 16, 32)
    assert variables["params"]["pos_embed"].shape == (1, 36, 32)
    model = create_model(config.model.name, num_classes=80, head=config.model.head,
                         **config.model.overrides.to_dict())
    target = jax.jit(model.init)(jax.random.key(1), np.zeros((1, 48, 48, 3), np.float32))
    start, _ = checkpoint.restore_model(imagenet_workdir / "checkpoints", target,
                                        drop_head=True, adapt=model.adapt_checkpoint)
    np.testing.assert_allclose(
        start["params"]["pos_embed"],
        layers.resize_position_embedding(stored["params"]["pos_embed"], 36), rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, start["params"]["head"],
                 target["params"]["head"])
    np.testing.assert_array_equal(start["params"]["blocks_0"]["attn"]["qkv"]["kernel"],
                                  stored["params"]["blocks_0"]["attn"]["qkv"]["kernel"])
    for key in ("CF1", "OF1", "CP", "CR", "OP", "OR", "loss"):
        assert np.isfinite(results[f"eval/{key}"])


def test_multilabel_data_needs_a_multilabel_loss(data_dir, tmp_path):
    config = tiny_config(data_dir, "coco/2017")
    with pytest.raises(ValueError, match="multi-label.*sigmoid_xent.*asl"):
        trainer.train_and_evaluate(config, str(tmp_path))


def test_coco_map_over_two_processes_equals_one_process(coco_run, data_dir, tmp_path):
    """eval_only of the same checkpoint on a real 2-process cluster (gloo)."""
    config, workdir, results = coco_run
    script = f"""if True:
        import sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import jax
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[1],
                                   num_processes=2, process_id=int(sys.argv[2]))
        assert len(jax.devices()) == 8  # join the cluster before the slow imports
        import json, ml_collections, tfds_fakes
        from noah_jax.train import trainer
        config = ml_collections.ConfigDict(json.loads(open(sys.argv[3]).read()))
        with tfds_fakes.fake_tfds({data_dir!r}):  # the metadata the fixture wrote
            results = trainer.train_and_evaluate(config, sys.argv[4])
        print("RESULT", jax.process_index(), repr(results["eval/mAP"]),
              int(results["eval/count"]))
    """
    config = config.copy_and_resolve_references()
    config.eval_only = True
    config.init_from.path = str(workdir / "checkpoints")
    config.init_from.drop_head = False
    config_path = tmp_path / "config.json"
    config_path.write_text(config.to_json())
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("device_count=8", "device_count=4")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", script, port, str(i), str(config_path),
                               str(tmp_path / "eval")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-2500:] for o in outs)
    for i, out in enumerate(outs):
        match = re.search(rf"RESULT {i} (\S+) (\d+)", out)
        assert match, out[-3000:]
        assert int(match.group(2)) == 8
        assert float(match.group(1)) == pytest.approx(results["eval/mAP"], abs=1e-6)


@pytest.mark.parametrize("name,model_name,tokens", [
    ("coco_resnet101_noah", "resnet101", None),
    ("coco_vit_large_noah", "vit_large_patch16_224", 784)])
def test_coco_configs_build_their_448px_models(name, model_name, tokens):
    module = importlib.import_module(f"configs.{name}")
    with pytest.raises(ValueError, match="init=DIR"):
        module.get_config()
    config = module.get_config("init=/ckpt/imagenet,head=linear,loss=asl")
    assert (config.model.name, config.model.head, config.loss) == (model_name, "linear", "asl")
    assert (config.dataset.name, config.dataset.num_classes, config.dataset.image_size) == (
        "coco/2017", 80, 448)
    assert config.init_from.path == "/ckpt/imagenet" and config.init_from.drop_head
    assert config.augment.train_crop == config.augment.eval_crop == "resize"
    config = module.get_config("init=/ckpt/imagenet")
    model = create_model(config.model.name, num_classes=80, head=config.model.head,
                         **config.model.overrides.to_dict())
    variables = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 448, 448, 3)))
    logits = jax.eval_shape(lambda v: model.apply(v, np.zeros((2, 448, 448, 3)), train=False),
                            variables)
    assert logits.shape == (2, 80)
    if tokens:
        assert variables["params"]["pos_embed"].shape == (1, tokens, 1024)
    voc = module.get_config("init=/x,dataset=voc/2007")
    assert voc.dataset.num_classes == 20
