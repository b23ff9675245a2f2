"""The record index: a training start's counts read once per prepared dataset.

Under tfds.testing.mock_data (tests/tfds_fakes.py), whose examples are functions of
their index, so every count is checked against the truth.
"""

import logging
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

import tfds_fakes  # noqa: E402
from test_tfds import dataset_config, source_of  # noqa: E402
from noah_jax.data import pipeline, record_index, tfds_source  # noqa: E402

SPLITS = {"imagenet2012": {"train": 40, "validation": 13},
          "coco/2017": {"train": 30, "validation": 11}}


@pytest.fixture
def data_dir(tmp_path):
    with tfds_fakes.fake_tfds(str(tmp_path / "tfds"), SPLITS):
        yield str(tmp_path / "tfds")


@pytest.fixture
def reads(monkeypatch):
    """The split (a range of records) of every read any code asks a TFDS builder for."""
    seen = []
    as_dataset = tfds.core.DatasetBuilder.as_dataset

    def counting(self, split, **kwargs):
        seen.append(str(split))
        return as_dataset(self, split=split, **kwargs)

    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", counting)
    return seen


def pixels(name, split, i):
    return int(np.prod(tfds_fakes.image(name, split, i).shape[:2]))


def forbid_reading(monkeypatch):
    def refuse(self, split, **kwargs):
        raise AssertionError(f"read {split} of {self.name}")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", refuse)
    monkeypatch.setattr(pipeline, "_count_over_limit", lambda *a: pytest.fail("counted"))


def test_a_second_start_reads_no_record_whatever_the_limit_and_the_process_count(
        data_dir, reads, monkeypatch, tmp_path):
    monkeypatch.setattr(record_index, "fallback_root", lambda: str(tmp_path / "unused"))
    train = [pixels("imagenet2012", "train", i) for i in range(40)]
    assert sum(p > 2000 for p in train) == 14

    c = dataset_config(data_dir, "imagenet2012", dataset__max_image_pixels=2000)
    source = source_of(c)
    counted = source._train.over_limit(0, 1, c.dataset.shuffle_pieces, 2000)
    assert counted == 14
    # Each record was read once, by the index's own pass over each of the 16 pieces.
    ranges = sorted(tuple(map(int, r[len("train["):-1].split(":"))) for r in reads)
    assert len(ranges) == 16 and ranges[0][0] == 0 and ranges[-1][1] == 40
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    index = os.path.join(source._train.builder.data_dir, record_index.FOLDER)
    [folder] = os.listdir(index)
    assert len(os.listdir(os.path.join(index, folder))) == 16
    # The pipeline's own count (a pass over the pieces' records) agrees.
    pieces = source._train.pieces(0, 1, c.dataset.shuffle_pieces)
    assert pipeline._count_over_limit([ds for ds, _ in pieces], source._parse, 2000) == 14

    # A fresh start with every read refused: any limit, any process count, from the index.
    forbid_reading(monkeypatch)
    for limit in (1000, 2000, 3000):
        fresh = source_of(dataset_config(data_dir, "imagenet2012",
                                         dataset__max_image_pixels=limit))
        for process_count in (1, 2, 3):
            for p in range(process_count):
                shard = fresh._train._pieces(p, process_count, 4)
                indices = [i for part in shard for i in range(
                    *fresh._train._range(part)[1:])]
                assert (fresh._train.over_limit(p, process_count, 4, limit)
                        == sum(train[i] > limit for i in indices))


def test_the_batches_are_those_of_a_run_that_counts_for_itself(data_dir, monkeypatch):
    c = dataset_config(data_dir, "imagenet2012", dataset__max_image_pixels=2000)

    def labels(start):
        it = source_of(c).train_batches(start_step=start, local_batch_size=8,
                                        process_index=0, process_count=1)
        return np.stack([next(it)["label"] for _ in range(4)])

    indexed, indexed_resumed = labels(0), labels(5)
    monkeypatch.setattr(tfds_source._Split, "over_limit", lambda *a: None)
    np.testing.assert_array_equal(indexed, labels(0))
    np.testing.assert_array_equal(indexed_resumed, labels(5))


def test_unlabeled_images_are_counted_from_the_index(data_dir, reads, monkeypatch):
    labeled = {split: [i for i in range(n) if tfds_fakes.coco_label_ids(split, i)]
               for split, n in SPLITS["coco/2017"].items()}
    source = source_of(dataset_config(data_dir, "coco/2017"))
    assert source.num_eval_examples == len(labeled["validation"]) == 8
    assert [source._train.size(p, 2) for p in range(2)] == [
        sum(i in labeled["train"] for i in range(a, b)) for a, b in ((0, 15), (15, 30))]
    assert sorted(reads) == ["train[0:15]", "train[15:30]", "validation[0:11]"]

    forbid_reading(monkeypatch)
    fresh = source_of(dataset_config(data_dir, "coco/2017", dataset__max_image_pixels=2000))
    assert fresh.num_eval_examples == 8
    assert [fresh._train.size(p, 3) for p in range(3)] == [
        sum(i in labeled["train"] for i in range(a, b)) for a, b in ((0, 10), (10, 20), (20, 30))]
    assert fresh._train.over_limit(0, 1, 4, 2000) == sum(
        pixels("coco/2017", "train", i) > 2000 for i in labeled["train"])


# ----------------------------------------------------------------------------------
# RecordIndex on its own.
# ----------------------------------------------------------------------------------
def truth(start, stop):
    n = np.arange(start, stop)
    return {"pixels": n * 10, "labels": (n % 3).astype(np.int32)}


class Counting:
    def __init__(self):
        self.ranges = []

    def __call__(self, start, stop):
        self.ranges.append((start, stop))
        return truth(start, stop)


def check(index, start, stop):
    got = index.get(start, stop)
    for field, want in truth(start, stop).items():
        np.testing.assert_array_equal(got[field], want)
        assert got[field].dtype == want.dtype


def test_only_ranges_no_file_covers_are_read(tmp_path):
    compute = Counting()
    index = record_index.RecordIndex(str(tmp_path / "index"), compute,
                                     fallback=str(tmp_path / "fallback"))
    check(index, 10, 20)
    check(index, 30, 40)
    check(index, 0, 50)  # reads [0, 10), [20, 30), [40, 50) only
    assert compute.ranges == [(10, 20), (30, 40), (0, 10), (20, 30), (40, 50)]
    fresh_compute = Counting()
    fresh = record_index.RecordIndex(str(tmp_path / "index"), fresh_compute,
                                     fallback=str(tmp_path / "fallback"))
    check(fresh, 5, 45)
    check(fresh, 0, 0)
    assert fresh_compute.ranges == []
    assert not os.path.exists(tmp_path / "fallback")


def test_a_damaged_file_is_read_again_and_a_half_written_one_ignored(tmp_path):
    folder = tmp_path / "index"
    record_index.RecordIndex(str(folder), Counting(), fallback=str(tmp_path / "f")).get(0, 8)
    (folder / "records-0000000000-0000000008.npz").write_bytes(b"not a zip")
    (folder / ".records-0000000000-0000000020.npz.1234.partial").write_bytes(b"PK")
    compute = Counting()
    check(record_index.RecordIndex(str(folder), compute, fallback=str(tmp_path / "f")), 0, 8)
    assert compute.ranges == [(0, 8)]
    check(record_index.RecordIndex(str(folder), Counting(), fallback=str(tmp_path / "f")), 0, 8)


def test_a_read_only_dataset_folder_keeps_the_index_in_the_fallback(tmp_path, monkeypatch,
                                                                   caplog):
    primary = str(tmp_path / "dataset" / "index")
    makedirs = tf.io.gfile.makedirs

    def read_only(path):
        if str(path).startswith(primary):
            raise PermissionError(f"{path}: read-only file system")
        makedirs(path)

    monkeypatch.setattr(tf.io.gfile, "makedirs", read_only)
    compute = Counting()
    with caplog.at_level(logging.WARNING):
        check(record_index.RecordIndex(primary, compute, fallback=str(tmp_path / "fallback")),
              0, 5)
    assert f"could not keep the record index of records [0, 5) in {primary}" in caplog.text
    assert os.listdir(tmp_path / "fallback") == ["records-0000000000-0000000005.npz"]
    again = Counting()
    check(record_index.RecordIndex(primary, again, fallback=str(tmp_path / "fallback")), 0, 5)
    assert again.ranges == []


def test_an_unwritable_fallback_still_gives_the_facts(tmp_path, monkeypatch, caplog):
    """Where nothing can be written, the facts are computed every start, and said so."""
    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(tf.io.gfile, "makedirs", refuse)
    compute = Counting()
    index = record_index.RecordIndex(str(tmp_path / "a"), compute, fallback=str(tmp_path / "b"))
    with caplog.at_level(logging.WARNING):
        check(index, 0, 6)
        check(index, 0, 6)
    assert compute.ranges == [(0, 6), (0, 6)]
    assert "the next start will read them again" in caplog.text
