"""ImageNet prepared as ArrayRecord files (`prepare --file_format=array_record`, the real
TFDS builder on tiny archives in the ILSVRC2012 layout) and read by record index:
training order, exact resumption from any step, the record index and evaluation."""

import pathlib
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from commands.test_prepare import (IMAGES_PER_SYNSET, NUM_VAL,  # noqa: E402
                                   validation_synsets, write_ilsvrc2012_archives)
from test_tfds import dataset_config, eval_rows, source_of  # noqa: E402
from noah_jax import prepare  # noqa: E402
from noah_jax.data import pipeline  # noqa: E402
from noah_jax.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(data_dir, train labels by record, validation labels by record)."""
    data_dir = tmp_path_factory.mktemp("array_record")
    synsets = sorted(set(validation_synsets()[:NUM_VAL]))
    write_ilsvrc2012_archives(pathlib.Path(data_dir) / "manual", synsets)
    done = prepare.prepare("imagenet2012", str(data_dir), str(pathlib.Path(data_dir) / "manual"),
                           skip_disk_check=True, file_format="array_record")
    assert done.endswith("array_record)"), done
    builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    labels = {split: np.array([int(r["label"]) for r in builder.as_data_source(split=split)])
              for split in ("train", "validation")}
    assert len(labels["train"]) == len(synsets) * IMAGES_PER_SYNSET == 24
    return str(data_dir), labels


def batches(source, start, n, b=4, process_index=0, process_count=1):
    it = source.train_batches(start_step=start, local_batch_size=b,
                              process_index=process_index, process_count=process_count)
    return [next(it) for _ in range(n)]


def test_each_epoch_is_a_new_permutation_and_every_resume_is_exact(prepared):
    data_dir, labels = prepared
    source = source_of(dataset_config(data_dir, "imagenet2012"))
    assert source._train.random_access
    straight = batches(source, 0, 18)  # 72 positions: 3 epochs of 24
    epochs = np.concatenate([b["label"] for b in straight]).reshape(3, 24)
    for epoch in epochs:
        assert sorted(epoch) == sorted(labels["train"])
    assert not np.array_equal(epochs[0], epochs[1])
    for start in (1, 5, 6, 13):  # mid-epoch, the last step of one, the first of the next
        for a, b in zip(straight[start:], batches(source, start, 3)):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])


def test_a_resume_far_into_training_reads_nothing_before_it(prepared):
    """A million steps in: reading ahead would take hours; by index it is immediate,
    and it is the step after the one before it."""
    data_dir, _ = prepared
    source = source_of(dataset_config(data_dir, "imagenet2012"))
    step = 1_000_000
    began = time.monotonic()
    [at] = batches(source, step, 1)
    _, after = batches(source, step - 1, 2)
    assert time.monotonic() - began < 120
    np.testing.assert_array_equal(at["image"], after["image"])
    np.testing.assert_array_equal(at["label"], after["label"])


def test_processes_train_on_their_own_shards(prepared):
    data_dir, labels = prepared
    source = source_of(dataset_config(data_dir, "imagenet2012"))
    for p, shard in enumerate((range(0, 12), range(12, 24))):
        np.testing.assert_array_equal(source._train.kept(p, 2, 0), np.array(shard))
        seen = np.concatenate([b["label"] for b in batches(source, 0, 3, 4, p, 2)])
        assert sorted(seen) == sorted(labels["train"][list(shard)])


def test_images_over_the_limit_are_left_out_by_the_index(prepared, monkeypatch):
    """The archives' JPEGs are all 36x48 = 1728 pixels."""
    data_dir, _ = prepared
    source = source_of(dataset_config(data_dir, "imagenet2012",
                                      dataset__max_image_pixels=1728))
    assert len(source._train.kept(0, 1, 1728)) == 24
    assert len(source._train.kept(0, 1, 1727)) == 0
    tight = source_of(dataset_config(data_dir, "imagenet2012", dataset__max_image_pixels=1727))
    with pytest.raises(Exception, match="no training records within"):
        batches(tight, 0, 1)
    # The counts came from the index, which read each record once.
    monkeypatch.setattr(pipeline, "records_by_index", lambda *a: pytest.fail("read"))
    assert len(source_of(dataset_config(data_dir, "imagenet2012"))._train.kept(0, 3, 0)) == 8


def test_evaluation_reads_every_validation_image_once(prepared):
    data_dir, labels = prepared
    source = source_of(dataset_config(data_dir, "imagenet2012"))
    scored, counts = eval_rows(source.eval_batches, 2, 2)
    assert sorted(scored.tolist()) == sorted(labels["validation"].tolist())
    assert counts == [2, 2]


def test_a_dataset_prepared_in_one_format_is_not_prepared_again_in_another(prepared):
    data_dir, _ = prepared
    assert "already prepared" in prepare.prepare("imagenet2012", data_dir, data_dir,
                                                 file_format="array_record")
    # Without --file_format, the dataset there is kept whatever its format.
    assert prepare.prepare("imagenet2012", data_dir, data_dir).endswith("(array_record)")
    assert prepare.default_file_format("/data/tfds") == "array_record"
    assert prepare.default_file_format("gs://bucket/tfds") == "tfrecord"
    with pytest.raises(prepare.PrepareError, match="as array_record files; a dataset folder"):
        prepare.prepare("imagenet2012", data_dir, data_dir, file_format="tfrecord")
    with pytest.raises(prepare.PrepareError, match="choose one of tfrecord, array_record"):
        prepare.prepare("imagenet2012", data_dir, data_dir, file_format="parquet")


def test_array_record_files_that_cannot_be_opened_end_in_one_line(prepared, monkeypatch):
    """As a gs:// data_dir does where the array_record reader opens local files only."""
    data_dir, _ = prepared
    source = source_of(dataset_config(data_dir, "imagenet2012"))

    def unreadable(*args, **kwargs):
        raise RuntimeError("open() failed: No such file or directory; opening gs://b/x\nmore")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", unreadable)
    with pytest.raises(DataError) as e:
        batches(source, 0, 1)
    message = str(e.value)
    assert "\n" not in message and "open() failed" in message
    assert "--file_format=tfrecord" in message and "Cloud Storage FUSE" in message
