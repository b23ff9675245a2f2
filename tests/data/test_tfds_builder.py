"""A real TFDS dataset built on disk (no mocking): TFRecord files, the TFDS reader,
partial decoding, even splits into pieces, and the trainer's source on top.

`tiny_shapes` is a builder defined here: JPEG images whose single colour channel
encodes the label, written by `download_and_prepare` into a temporary data_dir.
"""

import collections

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from configs import common  # noqa: E402
from noah_jax.data import get_source, tfds_source  # noqa: E402
from noah_jax.models import input_preprocessing  # noqa: E402

NUM_TRAIN, NUM_TEST, NUM_CLASSES = 37, 11, 5


def label_of(split, i):
    return (3 * i + len(split)) % NUM_CLASSES


class TinyShapes(tfds.core.GeneratorBasedBuilder):
    """Solid-colour JPEGs; the red level is 40 + 40 * label."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples("train", NUM_TRAIN),
                "test": self._generate_examples("test", NUM_TEST)}

    def _generate_examples(self, split, n):
        for i in range(n):
            label = label_of(split, i)
            pixels = np.zeros((20 + i % 7, 24, 3), np.uint8)
            pixels[..., 0] = 40 + 40 * label
            yield f"{split}_{i}", {"image": pixels, "label": label}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds_real"))
    TinyShapes(data_dir=path).download_and_prepare()
    return path


def config(data_dir, **dataset):
    c = common.base_config()
    c.dataset.update(dict(name="tiny_shapes", data_dir=data_dir, image_size=16,
                          num_classes=NUM_CLASSES, shuffle_buffer=8, shuffle_pieces=4,
                          eval_crop_ratio=1.0, **dataset))
    c.augment.flip = False
    return input_preprocessing.resolve(c)  # the model's mean/std and eval resize, as training


def red_label(images):
    """The label encoded in each normalised image's red level."""
    red = images[..., 0].mean(axis=(1, 2)) * 0.229 + 0.485
    return np.rint((red * 255 - 40) / 40).astype(int)


def test_any_classification_dataset_trains_and_evaluates_from_real_files(data_dir):
    c = config(data_dir)
    source = get_source(c.dataset, seed=0, augment=c.augment)
    assert (source.num_train_examples, source.num_eval_examples) == (NUM_TRAIN, NUM_TEST)
    # Evaluation ('test', as there is no 'validation'): each image once, 2 processes.
    seen = []
    for p in range(2):
        for b in source.eval_batches(local_batch_size=4, process_index=p, process_count=2):
            keep = b["mask"] > 0
            np.testing.assert_array_equal(red_label(b["image"][keep]), b["label"][keep])
            seen.extend(b["label"][keep].tolist())
    assert collections.Counter(seen) == collections.Counter(
        label_of("test", i) for i in range(NUM_TEST))
    # Training: the two processes' first epochs (their pieces) partition the split.
    epochs = []
    for p in range(2):
        it = source.train_batches(start_step=0, local_batch_size=2, process_index=p,
                                  process_count=2)
        pieces = source._train.pieces(p, 2, 4)
        n = sum(size for _, size in pieces)
        batches = [next(it) for _ in range(-(-n // 2))]
        images = np.concatenate([b["image"] for b in batches])[:n]
        labels = np.concatenate([b["label"] for b in batches])[:n]
        np.testing.assert_array_equal(red_label(images), labels)
        epochs.append(labels)
    assert sorted(map(len, epochs)) == [18, 19]
    assert collections.Counter(np.concatenate(epochs).tolist()) == collections.Counter(
        label_of("train", i) for i in range(NUM_TRAIN))


def test_a_dataset_that_is_not_image_classification_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'.*any TFDS"):
        tfds_source.spec_for("no_such_dataset", str(tmp_path))
    with pytest.raises(ValueError, match="image classification"):
        tfds_source.spec_for("glue/cola", str(tmp_path))
