"""FolderSource over a small folder of solid-colour images written by the tests.

Image j of class c is one solid colour: channel c at 230, the other two at 20 + 30 j.
Any crop or resize of a solid image keeps its colour, so the mean colour of a
preprocessed image tells which file it came from (class c and index j), even after
random training crops; that lets the tests check labels and coverage exactly.
"""

import collections
import dataclasses
import logging
import struct

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from helpers import assert_follows_source_protocol  # noqa: E402
from noah_jax.data import augment, pipeline  # noqa: E402
from noah_jax.data.folder import FolderSource  # noqa: E402
from noah_jax.errors import DataError  # noqa: E402  (a UserError: main.py prints one line)

CLASSES = ("cat", "dog", "fox")
SIZES = ((30, 40), (40, 30), (24, 36))
SIZE = 16
PREPROCESS = pipeline.Preprocess(image_size=SIZE, eval_crop_ratio=1.0)


def colour(c, j):
    rgb = np.full(3, 20 + 30 * j, np.uint8)
    rgb[c] = 230
    return rgb


def write_image(path, c, j):
    """A solid image of colour(c, j), encoded by the extension (.png or JPEG)."""
    h, w = SIZES[j % len(SIZES)]
    pixels = np.broadcast_to(colour(c, j), (h, w, 3)).copy()
    if path.suffix.lower() == ".png":
        data = tf.io.encode_png(pixels).numpy()
    else:
        data = tf.io.encode_jpeg(pixels, quality=95).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def identify(images):
    """(class, j) of each preprocessed image, from its mean colour."""
    pixels = (images * np.array(augment.IMAGENET_STD) + np.array(augment.IMAGENET_MEAN)) * 255
    means = pixels.mean(axis=(1, 2))
    found = []
    for mean in means:
        c = int(np.argmax(mean))
        other = np.delete(mean, c)
        j = int(round((other.mean() - 20) / 30))
        # Solid colours survive JPEG and resizing to within a few levels.
        np.testing.assert_allclose(mean, colour(c, j), atol=6)
        found.append((c, j))
    return found


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The test folder; returns (root, valid paths per split -> (c, j), skipped paths)."""
    root = tmp_path_factory.mktemp("images")
    valid = {"train": {}, "val": {}}
    counts = {"train": (4, 4, 4), "val": (3, 2, 2)}
    for split, per_class in counts.items():
        for c, (name, n) in enumerate(zip(CLASSES, per_class)):
            for j in range(n):
                ext = (".png", ".jpg", ".JPEG")[(j + c) % 3]  # extensions match any case
                valid[split][write_image(root / split / name / f"{j}{ext}", c, j)] = (c, j)
    # Images in nested folders belong to the class folder they sit in.
    valid["train"][write_image(root / "train" / "dog" / "more" / "4.png", 1, 4)] = (1, 4)
    # Ignored: hidden files, hidden folders, other extensions.
    write_image(root / "train" / "fox" / ".hidden.jpg", 0, 0)
    write_image(root / "train" / "cat" / ".thumbs" / "9.jpg", 1, 1)
    (root / "train" / "fox" / "notes.txt").write_text("not an image")
    # Skipped: random bytes, a JPEG cut in half.
    rng = np.random.default_rng(0)
    bad = root / "train" / "cat" / "bad.jpg"
    bad.write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    truncated = root / "train" / "dog" / "truncated.jpg"
    whole = tf.io.encode_jpeg(np.full((40, 40, 3), 99, np.uint8)).numpy()
    truncated.write_bytes(whole[: len(whole) // 2])
    bad_png = root / "val" / "fox" / "bad.png"
    bad_png.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    skipped = {"train": sorted([str(bad), str(truncated)]), "val": [str(bad_png)]}
    return str(root), valid, skipped


@pytest.fixture(scope="module")
def source(tree):
    root, _, _ = tree
    return FolderSource(root, PREPROCESS, seed=7, num_classes=3, shuffle_buffer=100)


def sorted_truth(valid_split):
    """(c, j) of a split's valid files in sorted path order."""
    return [valid_split[path] for path in sorted(valid_split)]


def test_attributes_counts_and_skipped(tree, source):
    _, valid, skipped = tree
    assert len(valid["train"]) == 13 and len(valid["val"]) == 7
    assert_follows_source_protocol(source, name="folder", num_classes=3,
                                   image_shape=(SIZE, SIZE, 3), num_train_examples=13,
                                   num_eval_examples=7, class_names=list(CLASSES))
    assert source.train_split == "train" and source.eval_split == "val"
    assert source.eval_label_type == "class_ids"
    assert {split: sorted(paths) for split, paths in source.skipped.items()} == skipped


def test_skipped_files_are_logged(tree, caplog):
    root, _, skipped = tree
    with caplog.at_level(logging.WARNING):
        FolderSource(root, PREPROCESS, seed=0, num_classes=3)
    text = caplog.text
    assert "Skipping 2 of 15 images" in text and "Skipping 1 of 8 images" in text
    for path in skipped["train"] + skipped["val"]:
        assert path in text


def test_eval_one_process_in_order_with_padding(tree, source):
    _, valid, _ = tree
    batches = list(source.eval_batches(local_batch_size=3, process_index=0, process_count=1))
    assert len(batches) == 3  # ceil(7 / 3)
    for batch in batches:
        assert batch["image"].shape == (3, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (3,) and batch["label"].dtype == np.int32
        assert batch["mask"].dtype == np.float32
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(mask, [1] * 7 + [0] * 2)
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    found = identify(images[:7])
    assert found == sorted_truth(valid["val"])  # every valid file once, in path order
    np.testing.assert_array_equal(labels[:7], [c for c, _ in found])
    np.testing.assert_array_equal(images[7:], 0)  # padding
    np.testing.assert_array_equal(labels[7:], 0)


def test_eval_two_processes_cover_each_example_once(tree, source):
    _, valid, _ = tree
    seen = []
    num_batches = []
    for p in range(2):
        batches = list(source.eval_batches(local_batch_size=2, process_index=p,
                                           process_count=2))
        num_batches.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (2, SIZE, SIZE, 3)
            rows = batch["mask"] == 1
            found = identify(batch["image"][rows])
            np.testing.assert_array_equal(batch["label"][rows], [c for c, _ in found])
            seen += found
    assert num_batches == [2, 2]  # shards of 4 and 3, padded to the same count
    assert len(seen) == 7
    assert collections.Counter(seen) == collections.Counter(valid["val"].values())


def test_train_batches_shapes_labels_and_shards(tree, source):
    _, valid, _ = tree
    truth = sorted_truth(valid["train"])
    for p in range(2):
        shard = truth[p::2]
        it = source.train_batches(start_step=0, local_batch_size=2, process_index=p,
                                  process_count=2)
        # One epoch of this process's shard: 7 files for process 0, 6 for process 1.
        steps = len(shard) // 2
        found = []
        for _ in range(steps):
            batch = next(it)
            assert batch["image"].shape == (2, SIZE, SIZE, 3)
            assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
            ids = identify(batch["image"])
            np.testing.assert_array_equal(batch["label"], [c for c, _ in ids])
            found += ids
        assert set(found) <= set(shard) and len(set(found)) == len(found) == 2 * steps
        if len(shard) % 2 == 0:
            assert sorted(found) == sorted(shard)


def test_train_batches_deterministic_and_resumable(source):
    def take(start_step, n):
        it = source.train_batches(start_step=start_step, local_batch_size=4, process_index=0,
                                  process_count=1)
        return [next(it) for _ in range(n)]

    first = take(0, 5)  # 20 positions: crosses into the second epoch of 13
    again = take(0, 5)
    resumed = take(3, 2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    for a, b in zip(first[3:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # The first epoch (positions 0..12) visits every training image once.
    labels = np.concatenate([b["label"] for b in first])
    assert sorted(labels[:13].tolist()) == [0] * 4 + [1] * 5 + [2] * 4


# ----------------------------------------------------------------------------------
# Layout checks and their messages.
# ----------------------------------------------------------------------------------
def small_tree(root, splits):
    """Writes one PNG into root/<split>/<class>/ for each class of each split."""
    for split, classes in splits.items():
        for c, name in enumerate(classes):
            write_image(root / split / name / "0.png", c % 3, 0)
    return str(root)


def test_wrong_num_classes(tmp_path):
    root = small_tree(tmp_path, {"train": CLASSES, "val": CLASSES})
    with pytest.raises(DataError, match=r"num_classes=5.*3 class folders.*"
                                         r"set dataset\.num_classes=3"):
        FolderSource(root, PREPROCESS, seed=0, num_classes=5)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*root/<split>/<class name>"):
        FolderSource(str(tmp_path / "nowhere"), PREPROCESS, seed=0, num_classes=3)


def test_missing_train_split(tmp_path):
    root = small_tree(tmp_path, {"val": CLASSES})
    with pytest.raises(DataError, match=r"train' does not exist; create it.*<class name>"):
        FolderSource(root, PREPROCESS, seed=0, num_classes=3)


def test_missing_eval_split(tmp_path):
    root = small_tree(tmp_path, {"train": CLASSES})
    with pytest.raises(DataError, match=r"no eval split.*\['val', 'validation', 'test'\]"):
        FolderSource(root, PREPROCESS, seed=0, num_classes=3)
    with pytest.raises(DataError, match=r"holdout' does not exist"):
        FolderSource(root, PREPROCESS, seed=0, num_classes=3, eval_split="holdout")


def test_eval_class_missing_from_train(tmp_path):
    root = small_tree(tmp_path, {"train": CLASSES, "val": CLASSES + ("wolf",)})
    with pytest.raises(ValueError, match=r"training split lacks: \['wolf'\]"):
        FolderSource(root, PREPROCESS, seed=0, num_classes=3)


def test_split_names(tmp_path):
    # Default eval split falls back to 'test'; the eval split may lack classes.
    root = small_tree(tmp_path, {"train": CLASSES, "test": CLASSES[:2], "tr": CLASSES[1:],
                                 "ev": CLASSES[1:2]})
    source = FolderSource(root, PREPROCESS, seed=0, num_classes=3)
    assert source.eval_split == "test"
    assert (source.num_train_examples, source.num_eval_examples) == (3, 2)
    source = FolderSource(root, PREPROCESS, seed=0, num_classes=2, train_split="tr",
                          eval_split="ev")
    assert source.class_names == ["dog", "fox"] and source.num_eval_examples == 1
    (batch,) = source.eval_batches(local_batch_size=1, process_index=0, process_count=1)
    assert batch["label"].tolist() == [0]  # 'dog' is class 0 here


def test_images_over_max_image_pixels_are_skipped_without_being_decoded(tmp_path, caplog):
    # 30 x 40 PNGs (1,200 pixels) of every class, under a limit of 1,500 pixels.
    root = small_tree(tmp_path, {"train": CLASSES, "val": CLASSES})
    big = str(tmp_path / "train" / "cat" / "big.jpg")  # 2,000 pixels of grey
    tf.io.write_file(big, tf.io.encode_jpeg(np.full((40, 50, 3), 99, np.uint8)))
    # A PNG that declares 20000 x 20000 pixels in its IHDR and stops there: decoding
    # it would fail, so being listed as too large shows it was judged by its header.
    bomb = tmp_path / "val" / "dog" / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sIIBBBBB", 13, b"IHDR", 20000,
                                                          20000, 8, 2, 0, 0, 0))
    preprocess = pipeline.Preprocess(image_size=SIZE, eval_crop_ratio=1.0,
                                     max_image_pixels=1500)
    with caplog.at_level(logging.WARNING):
        source = FolderSource(root, preprocess, seed=0, num_classes=3)
    assert source.skipped == {"train": [big], "val": [str(bomb)]}
    assert (source.num_train_examples, source.num_eval_examples) == (3, 3)
    assert (f"Skipping 1 of 4 images in {tmp_path / 'train'} with more than "
            f"max_image_pixels=1500 pixels (never decoded): {big}") in caplog.text
    assert (f"Skipping 1 of 4 images in {tmp_path / 'val'} with more than "
            f"max_image_pixels=1500 pixels (never decoded): {bomb}") in caplog.text
    assert "could not be read or decoded" not in caplog.text
    (batch,) = source.eval_batches(local_batch_size=3, process_index=0, process_count=1)
    assert identify(batch["image"]) == [(0, 0), (1, 0), (2, 0)] and batch["mask"].all()
    train = next(source.train_batches(start_step=0, local_batch_size=3, process_index=0,
                                      process_count=1))
    assert sorted(identify(train["image"])) == [(0, 0), (1, 0), (2, 0)]  # never the grey one

    # Without a limit the big JPEG is kept, and the bomb is decoded, which fails: its
    # IHDR is all there is.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        source = FolderSource(root, dataclasses.replace(preprocess, max_image_pixels=0),
                              seed=0, num_classes=3)
    assert source.skipped == {"train": [], "val": [str(bomb)]}
    assert source.num_train_examples == 4
    assert f"could not be read or decoded: {bomb}" in caplog.text


def test_main_trains_and_evaluates_on_an_image_folder(tree, tmp_path):
    """The documented path: main.py with dataset.name=folder and data_dir=root."""
    import pathlib
    import re
    import subprocess
    import sys

    root, _, _ = tree
    repo = pathlib.Path(__file__).resolve().parents[2]
    command = [sys.executable, str(repo / "main.py"),
               f"--config={repo / 'configs' / 'vit_noah.py'}:demo",
               f"--workdir={tmp_path / 'run'}", "--config.dataset.name=folder",
               f"--config.dataset.data_dir={root}", "--config.dataset.num_classes=3",
               "--config.dataset.image_size=16", "--config.model.overrides.img_size=16",
               "--config.model.overrides.depth=1", "--config.num_epochs=0",
               "--config.total_steps=2", "--config.batch_size=8",
               "--config.eval_batch_size=8", "--config.log_every_steps=1"]
    proc = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"test top-1: [\d.]+% \(7 images\)", out)  # the 7 valid val images
    assert "Skipping 2 of 15 images" in out
