"""Fake TFDS datasets for tests: the real builders, metadata and feature specs, our data.

`fake_tfds(data_dir, {"imagenet2012": {"train": 40, "validation": 13}, ...})` writes each
builder's real `dataset_info.json` (with the given split sizes) into `data_dir` and
enters `tfds.testing.mock_data` with an `as_dataset` that serves deterministic
examples: they are encoded and serialised by the builder's own `FeaturesDict`, sliced
by the split's real file instructions (so `tfds.split_for_jax_process` sub-splits
read their own examples), then parsed and decoded by the builder's features with the
caller's decoders (`SkipDecoding`, `PartialDecoding`), as a prepared dataset would be.

Examples are functions of (dataset, split, index), see `example`, so a test can
recompute the truth: e.g. `coco_label_ids(split, i)`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import test_utils as tfds_test_utils

COCO_EMPTY_EVERY = 5  # every 5th COCO / VOC image has no object


def write_metadata(data_dir: str, name: str, splits: dict[str, int]) -> None:
    builder = tfds.builder(name, data_dir=data_dir)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0, filename_template=None)
        for split, n in splits.items()]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


def _rng(name: str, split: str, i: int) -> np.random.Generator:
    key = sum(ord(c) * 31**k for k, c in enumerate(f"{name}/{split}")) % 2**31
    return np.random.default_rng([key, i])


def image(name: str, split: str, i: int) -> np.ndarray:
    """uint8 [h, w, 3], 24-60 px a side: a smooth gradient plus noise."""
    rng = _rng(name, split, i)
    h, w = rng.integers(24, 61, size=2)
    rows, cols = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = rng.uniform(0, 255, 3) * rows[..., None] + rng.uniform(0, 255, 3) * cols[..., None]
    return np.clip(base / 2 + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def single_label(split: str, i: int, num_classes: int = 1000) -> int:
    return (i * 37 + len(split)) % num_classes


def coco_label_ids(split: str, i: int, num_classes: int = 80) -> list[int]:
    """Object categories of image i (repeats allowed; empty every COCO_EMPTY_EVERY-th)."""
    if i % COCO_EMPTY_EVERY == 0:
        return []
    return [(i * 7 + k * k * 13 + len(split)) % num_classes for k in range(1 + i % 4)]


def example(name: str, split: str, i: int) -> dict:
    img = image(name, split, i)
    if name in ("imagenet2012", "imagenet_v2/matched-frequency"):
        return {"image": img, "label": single_label(split, i), "file_name": f"{split}_{i}.JPEG"}
    if name == "cifar10":  # 32 x 32 PNGs
        rng = _rng(name, split, i)
        return {"id": f"{split}_{i}", "label": single_label(split, i, 10),
                "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)}
    if name == "imagenet2012_real":
        real = [] if i % 4 == 0 else sorted({single_label(split, i), (i * 11) % 1000})
        return {"image": img, "original_label": single_label(split, i), "real_label": real,
                "file_name": f"{split}_{i}.JPEG"}
    if name == "coco/2017":
        ids = coco_label_ids(split, i)
        return {"image": img, "image/filename": f"{i:012d}.jpg", "image/id": i, "objects": {
            "area": [10 * (k + 1) for k in range(len(ids))],
            "bbox": [tfds.features.BBox(0.1, 0.1, 0.5, 0.6) for _ in ids],
            "id": [1000 * i + k for k in range(len(ids))],
            "is_crowd": [k == 2 for k in range(len(ids))],
            "label": ids}}
    if name == "voc/2007":
        ids = coco_label_ids(split, i, 20)
        return {"image": img, "image/filename": f"{i:06d}.jpg", "labels": sorted(set(ids)),
                "labels_no_difficult": sorted(set(ids)), "objects": {
                    "bbox": [tfds.features.BBox(0.1, 0.1, 0.5, 0.6) for _ in ids],
                    "is_difficult": [False] * len(ids), "is_truncated": [False] * len(ids),
                    "label": ids, "pose": [0] * len(ids)}}
    raise KeyError(f"no fake examples for {name}")


def _full_name(builder) -> str:
    config = builder.builder_config
    return f"{builder.name}/{config.name}" if config else builder.name


_SERIALIZED: dict[tuple[str, str, int], tuple[bytes, ...]] = {}


def _serialized(features, name: str, split: str, n: int) -> tuple[bytes, ...]:
    key = (name, split, n)
    if key not in _SERIALIZED:
        _SERIALIZED[key] = tuple(features.serialize_example(example(name, split, i))
                                 for i in range(n))
    return _SERIALIZED[key]


def _as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del read_config, shuffle_files
    name = _full_name(self)
    records = []
    for instruction in self.info.splits[split].file_instructions:
        split_name = re.search(r"-(\w+)\.tfrecord", instruction.filename).group(1)
        all_records = _serialized(self.info.features, name, split_name,
                                  self.info.splits[split_name].num_examples)
        records += all_records[instruction.skip:instruction.skip + instruction.take]
    features = self.info.features
    if isinstance(decoders, tfds.decode.PartialDecoding):
        features = decoders.extract_features(features)
        decoders = decoders.decoders
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(records, tf.string))
    return ds.map(functools.partial(features.deserialize_example, decoders=decoders))


@contextlib.contextmanager
def fake_tfds(data_dir: str, datasets: dict[str, dict[str, int]] | None = None):
    """Prepared-looking fake `datasets` in `data_dir` (see the module docstring).
    `datasets=None` reuses the metadata an earlier call wrote there (for the
    processes of a cluster, which must not all write the same files at once)."""
    for name, splits in (datasets or {}).items():
        write_metadata(data_dir, name, splits)
    # TFDS's mock wraps each `as_dataset` in a MockFs, which redirects every epath and
    # gfile call of the whole process into a temporary folder while it runs, so an Orbax
    # checkpoint that a background thread writes meanwhile lands there and fails. The
    # fake data_dir is real: the calls may go to the real files.
    with mock.patch.object(tfds_test_utils, "MockFs", _RealFs), tfds.testing.mock_data(
            policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir,
            as_dataset_fn=_as_dataset):
        yield


class _RealFs:
    """Stands in for tfds.testing's MockFs: no redirection."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def add_file(self, path, content=None):
        pass
