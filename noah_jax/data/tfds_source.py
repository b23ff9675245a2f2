"""TFDS datasets as `Source`s: ImageNet (+ ImageNet-V2 / ReaL), COCO and VOC multi-label,
CIFAR, Imagenette and Oxford-IIIT Pet.

Each process reads only its own shard (`tfds.split_for_jax_process`), with images left
encoded (`tfds.decode.SkipDecoding`) until `noah_jax.data.pipeline` decodes and
augments them, so the shuffle buffer and the resume skip hold bytes, not pixels. A
dataset prepared as ArrayRecord files (`noah_jax.prepare`'s default) is read by record
index instead (`builder.as_data_source`, raw bytes deserialized inside tf.data): its
training order is `pipeline.random_access_train_dataset`'s, whose start and resume
read no record before their position.

Labels. Single-label datasets give int32 class ids. COCO and VOC give float32 multi-hot
vectors: an image is positive for a class when at least one object of that class is
annotated (COCO: crowd annotations included; VOC: objects marked difficult included,
i.e. the `labels` feature). Images with no annotated object carry no positive label;
with `dataset.drop_unlabeled` (the default) they are left out of both training and
evaluation, as ML-GCN / ASL do (COCO 2017: 1,021 of 118,287 train and 48 of 5,000
val images). Leaving them out needs their count per process shard, which comes from
the prepared dataset's record index (`noah_jax.data.record_index`: each record's
label count and image size, read once per prepared dataset, no image decoded). The
training duration in epochs counts the split's full size from the TFDS metadata.

Images with more than dataset.max_image_pixels pixels (read from their headers) are
never decoded: training leaves them out (counted per process shard from the record
index, so that resumption stays exact), evaluation
masks them out and logs how many; `noah_jax.data.pipeline` explains both. The sizes
from the TFDS metadata (`num_train_examples`, `num_eval_examples`) still count them.

Class names (`class_names`) come from the label's ClassLabel feature: ImageNet's are
WordNet synset ids, as TFDS ships them (`catalog.imagenet_class_names`).

Evaluation sets of other datasets (`eval_set`: ImageNet-V2 and ReaL for an ImageNet
model) are named by the config's evaluators (config.evals).
ImageNet-ReaL (`imagenet2012_real`) evaluates with its multi-hot "real" labels:
a prediction is right when it is one of an image's real labels, and images without
real labels are not counted (`noah_jax.train.metrics.real_accuracy_sums`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from noah_jax.data import pipeline, record_index
from noah_jax.data.base import CLASS_IDS, MULTI_HOT, Batch
from noah_jax.errors import DataError, UserError

# Re-exported: tools and tests read the catalog through this module too.
from noah_jax.data.catalog import (  # noqa: F401
    DATASETS, DatasetSpec, default_data_dir, default_manual_dir, prepare_command)


def how_to_prepare(name: str, data_dir: str = "", spec: DatasetSpec | None = None) -> str:
    """One sentence: what to put where, then the command, disk space and time."""
    spec = spec or spec_for(name, data_dir)
    steps = []
    if spec.manual_files:
        steps.append(f"put {' and '.join(spec.manual_files)} (from {spec.source}) in "
                     f"{default_manual_dir(data_dir)}")
    command = prepare_command(name, data_dir)
    steps.append(f"run `{command}`" + (
        " (it downloads the files; offline, put "
        f"{', '.join(spec.optional_manual_files)} from {spec.source} in "
        f"{default_manual_dir(data_dir)} first)" if spec.optional_manual_files else
        "" if spec.manual_files else " (it downloads the files)"))
    disk = f"; it needs {spec.disk}" if spec.disk else ""
    return ", then ".join(steps) + disk


class DatasetNotPreparedError(UserError, FileNotFoundError):
    """A TFDS dataset that has not been built in data_dir; the message says how."""


def spec_for(name: str, data_dir: str = "") -> DatasetSpec:
    """The spec of a dataset name; TFDS configs and versions ('imagenette/320px-v2',
    'imagenet2012:5.1.0') resolve to their family, keeping the full name for TFDS.

    Any other TFDS dataset with an Image feature 'image' and a ClassLabel 'label'
    (food101, stanford_dogs, ...) is read as single-label, trained on 'train' and
    evaluated on 'validation', else 'test' (dataset.train_split / eval_split override).
    """
    base = name.split(":")[0]
    spec = DATASETS.get(base) or DATASETS.get(base.split("/")[0])
    if spec is not None:
        return dataclasses.replace(spec, tfds_name=name)
    try:
        features = tfds.builder(name, data_dir=data_dir or None).info.features
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"unknown dataset {name!r}; available: "
                        f"{', '.join(sorted(DATASETS))}, digits, digits_multilabel, synthetic, "
                        "folder, or any TFDS image-classification dataset (an 'image' and a "
                        "'label' feature)") from None
    names = list(features.keys())
    if not ("image" in names and isinstance(features["image"], tfds.features.Image)
            and "label" in names and isinstance(features["label"], tfds.features.ClassLabel)):
        raise DataError(f"TFDS dataset {name!r} has features {sorted(features)}; this source "
                        "reads image classification: an Image 'image' and a ClassLabel "
                        "'label'")
    return DatasetSpec(name, "train", "", features["label"].num_classes)


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    """`builder.is_prepared()`, without the warning TFDS logs when the dataset's folder
    does not exist ("Variant folder DATA_DIR/NAME/VERSION has no dataset_info.json": a
    dataset never built there, which the caller reports in its own words). A folder that
    is there but incomplete keeps the warning."""
    return builder.data_path.exists() and builder.is_prepared()


def prepared_builder(name: str, data_dir: str = "", spec: DatasetSpec | None = None
                     ) -> tfds.core.DatasetBuilder:
    """`tfds.builder(name)`, or a DatasetNotPreparedError that says how to prepare it.
    `spec`: the name's `spec_for`, when the caller has it already."""
    spec = spec or spec_for(name, data_dir)
    builder = tfds.builder(name, data_dir=data_dir or None)
    if not is_prepared(builder):
        where = data_dir or "~/tensorflow_datasets (the default; set dataset.data_dir)"
        raise DatasetNotPreparedError(
            f"TFDS dataset {name!r} is not prepared in {where}. To prepare it, "
            f"{how_to_prepare(name, data_dir, spec)}.")
    return builder


# ----------------------------------------------------------------------------------
# Records and labels.
# ----------------------------------------------------------------------------------
def _label_features(spec: DatasetSpec) -> dict:
    """The features to decode for the label: 'objects/label' -> {'objects': {'label': True}}."""
    features = True
    for key in reversed(spec.label_feature.split("/")):
        features = {key: features}
    return features


def _label_ids(spec: DatasetSpec, record: dict) -> tf.Tensor:
    """The label feature of a record: an int class id, or the class ids of a multi-label
    record (int64 [n], possibly empty)."""
    for key in spec.label_feature.split("/"):
        record = record[key]
    return record


def class_names(features: tfds.features.FeaturesDict, spec: DatasetSpec) -> list[str]:
    """The names of the label's classes, from the dataset's ClassLabel feature:
    ImageNet's WordNet synset ids ('n01440764', ...; TFDS ships no other names), the
    COCO and VOC category names ('person', 'aeroplane', ...), CIFAR's ('airplane', ...).
    A ClassLabel built without names gives '0', '1', ..."""
    feature = features
    for key in spec.label_feature.split("/"):
        feature = feature[key]
    while isinstance(feature, tfds.features.Sequence):  # VOC's labels, ReaL's
        feature = feature.feature
    return [str(name) for name in feature.names]


def make_parse(spec: DatasetSpec, num_classes: int) -> pipeline.Parse:
    def parse(record):
        ids = _label_ids(spec, record)
        if spec.label_type == CLASS_IDS:
            return record["image"], tf.cast(ids, tf.int32)
        multi_hot = tf.reduce_sum(tf.one_hot(ids, num_classes, dtype=tf.float32), axis=0)
        return record["image"], tf.minimum(multi_hot, 1.0)
    return parse


class _Split:
    """One TFDS split as sharded records, with per-shard sizes (filtered if asked) and
    counts of images over a pixel limit, both from the prepared dataset's record index
    where the split is one contiguous range of a TFDS split (`record_index`)."""

    def __init__(self, builder, split: str, spec: DatasetSpec, drop_unlabeled: bool):
        self.builder, self.split, self.spec = builder, split, spec
        self.drop_unlabeled = drop_unlabeled and spec.label_type == MULTI_HOT
        try:
            self.raw_size = builder.info.splits[split].num_examples
        except (KeyError, ValueError) as e:
            raise DataError(f"{builder.name} has no split {split!r}; its splits: "
                            f"{', '.join(builder.info.splits)}") from e
        self._indexes: dict[str, record_index.RecordIndex] = {}

    def _range(self, split) -> tuple[str, int, int] | None:
        """(TFDS split, start, stop) of `split` (a name, a slice or an even part of
        one), or None where it is not one contiguous range."""
        instruction = (split if hasattr(split, "to_absolute")
                       else tfds.core.ReadInstruction.from_spec(str(split)))
        ranges = instruction.to_absolute(self.builder.info.splits)
        if len(ranges) != 1:
            return None
        name, start, stop = ranges[0].splitname, ranges[0].from_, ranges[0].to
        size = self.builder.info.splits[name].num_examples
        return name, int(start or 0), int(size if stop is None else stop)

    def _one_range(self, split) -> tuple[str, int, int]:
        """`_range(split)`, which reading by record index needs to exist."""
        where = self._range(split)
        if where is None:
            raise DataError(f"{split} of {self.builder.name} is not one range of records, "
                            "which an ArrayRecord dataset needs")
        return where

    def _facts(self, split) -> dict[str, np.ndarray] | None:
        """`record_index` facts of the records of `split`, or None (not a range)."""
        where = self._range(split)
        if where is None:
            return None
        name, start, stop = where
        if name not in self._indexes:
            info = self.builder.info.splits[name]
            folder = f"{name}-{record_index.fingerprint(info.shard_lengths, info.num_bytes)}"
            self._indexes[name] = record_index.RecordIndex(
                os.path.join(str(self.builder.data_dir), record_index.FOLDER, folder),
                functools.partial(self._index_records, name))
        return self._indexes[name].get(start, stop)

    def _index_records(self, name: str, start: int, stop: int) -> dict[str, np.ndarray]:
        """Each record's pixels (from its image's headers) and number of label ids: one
        pass over the records [start, stop) of split `name`, decoding no image."""
        logging.info("%s %s: indexing records [%d, %d) (once per prepared dataset: "
                     "image headers and labels)", self.builder.name, name, start, stop)
        features = {"image": True, **_label_features(self.spec)}
        if self.random_access:
            ds = pipeline.records_by_index(tf.data.Dataset.range(start, stop),
                                           self.read_serialized, self.deserialize(features))
        else:
            ds = self.builder.as_dataset(
                split=f"{name}[{start}:{stop}]", shuffle_files=False,
                decoders=tfds.decode.PartialDecoding(
                    features, decoders={"image": tfds.decode.SkipDecoding()}),
                read_config=tfds.ReadConfig(try_autocache=False))
        ds = ds.map(lambda r: (pipeline.image_pixels_from_header(r["image"]),
                               tf.size(_label_ids(self.spec, r), tf.int32)),
                    num_parallel_calls=tf.data.AUTOTUNE).batch(65536)
        pixels, labels = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)]
        for p, n in ds.as_numpy_iterator():
            pixels.append(p)
            labels.append(n)
        return {"pixels": np.concatenate(pixels), "labels": np.concatenate(labels)}

    def shard(self, process_index: int, process_count: int):
        return tfds.split_for_jax_process(self.split, process_index=process_index,
                                          process_count=process_count)

    @property
    def random_access(self) -> bool:
        """Whether the dataset was prepared as ArrayRecord files (prepare
        --file_format=array_record), which are read by record index."""
        return self.builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD

    @functools.cached_property
    def _data_source(self):
        """The split's records by index, as serialized bytes (ArrayRecord only)."""
        name = self._one_range(self.split)[0]
        try:
            source = self.builder.as_data_source(
                split=name, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
            if len(source):
                source[0]  # opens the files now: a failure is one clear error, not a hang
        except (OSError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"cannot read the ArrayRecord files of {self.builder.name} in "
                f"{self.builder.data_dir} ({first}); the array_record reader opens local "
                "and mounted paths (a gs:// bucket: mount it, e.g. with Cloud Storage FUSE, "
                "or prepare a TFRecord copy with noah_jax.prepare --file_format=tfrecord)"
            ) from None
        return source

    def read_serialized(self, indices: np.ndarray) -> np.ndarray:
        """The serialized records at `indices` of the split's TFDS split (ArrayRecord)."""
        return np.asarray(self._data_source.__getitems__(indices.tolist()), dtype=object)

    def deserialize(self, features: dict):
        """serialized record -> the record's `features` (images left encoded)."""
        decoding = tfds.decode.PartialDecoding(
            features, decoders={"image": tfds.decode.SkipDecoding()} if "image" in features
            else None)
        chosen = decoding.extract_features(self.builder.info.features)
        return functools.partial(chosen.deserialize_example, decoders=decoding.decoders)

    def _read(self, shard, features: dict) -> tf.data.Dataset:
        if self.random_access:
            ds = self._read_by_index(shard, features)
        else:
            decoders = {"image": tfds.decode.SkipDecoding()} if "image" in features else None
            ds = self.builder.as_dataset(
                split=shard, shuffle_files=False,
                decoders=tfds.decode.PartialDecoding(features, decoders=decoders),
                read_config=tfds.ReadConfig(try_autocache=False))
        if self.drop_unlabeled:
            ds = ds.filter(lambda r: tf.size(_label_ids(self.spec, r)) > 0)
        return ds

    def _read_by_index(self, split, features: dict) -> tf.data.Dataset:
        """The records of `split` (one range) in order, from the ArrayRecord files."""
        _, start, stop = self._one_range(split)
        self._data_source  # opened here, where a failure is one clear error
        return pipeline.records_by_index(
            tf.data.Dataset.range(start, stop), self.read_serialized,
            self.deserialize(features))

    def records(self, process_index: int, process_count: int) -> tf.data.Dataset:
        return self._read(self.shard(process_index, process_count), self.features)

    @property
    def features(self) -> dict:
        return {"image": True, **_label_features(self.spec)}

    def pieces(self, process_index: int, process_count: int, num_pieces: int
               ) -> list[tuple[tf.data.Dataset, int]]:
        """This process's training records as (records, count) of `num_pieces` parts:
        the split evenly divided into process_count * num_pieces contiguous parts, of
        which process p takes parts p, p + P, p + 2P, ... (so process shares differ by
        at most one record; the count is capped so that no part is empty)."""
        return [(self._read(part, self.features), self._count(part))
                for part in self._pieces(process_index, process_count, num_pieces)]

    def _pieces(self, process_index: int, process_count: int, num_pieces: int) -> list:
        num_pieces = max(1, min(num_pieces, self.raw_size // max(process_count, 1)))
        parts = tfds.even_splits(self.split, n=process_count * num_pieces)
        return parts[process_index::process_count]

    def over_limit(self, process_index: int, process_count: int, num_pieces: int,
                   max_pixels: int) -> int | None:
        """How many of this process's training records (those `pieces` reads) hold an
        image of more than `max_pixels` pixels, from the record index; None where
        the split is no single range (the pipeline then counts them itself)."""
        if max_pixels <= 0:
            return 0
        total = 0
        for part in self._pieces(process_index, process_count, num_pieces):
            facts = self._facts(part)
            if facts is None:
                return None
            over = facts["pixels"] > max_pixels
            if self.drop_unlabeled:
                over &= facts["labels"] > 0
            total += int(over.sum())
        return total

    def kept(self, process_index: int, process_count: int, max_pixels: int) -> np.ndarray:
        """The indices (in the TFDS split) of this process's training records that are
        trained on: its contiguous shard, less images over `max_pixels` (0: no limit)
        and, with drop_unlabeled, images without a label. From the record index."""
        shard = self.shard(process_index, process_count)
        _, start, _ = self._one_range(shard)
        facts = self._facts(shard)
        keep = np.ones(len(facts["pixels"]), bool)
        if max_pixels > 0:
            keep &= facts["pixels"] <= max_pixels
        if self.drop_unlabeled:
            keep &= facts["labels"] > 0
        return start + np.flatnonzero(keep)

    @functools.lru_cache(maxsize=256)
    def _count(self, split) -> int:
        if not self.drop_unlabeled:
            return self.builder.info.splits[split].num_examples
        facts = self._facts(split)
        if facts is not None:
            return int((facts["labels"] > 0).sum())
        ds = self._read(split, _label_features(self.spec))
        return int(ds.reduce(np.int64(0), lambda n, _: n + 1))

    def size(self, process_index: int, process_count: int) -> int:
        return self._count(self.shard(process_index, process_count))

    def total(self) -> int:
        return self.raw_size if not self.drop_unlabeled else self.size(0, 1)


# ----------------------------------------------------------------------------------
# The source.
# ----------------------------------------------------------------------------------
class EvalSet:
    """A finite evaluation set; `label_type` says what its labels hold (a label type of
    noah_jax/data/base.py)."""

    def __init__(self, split: _Split, preprocess: pipeline.Preprocess, num_classes: int):
        self._split, self._preprocess, self.num_classes = split, preprocess, num_classes
        self.label_type = split.spec.label_type
        self._parse = make_parse(split.spec, num_classes)

    @property
    def num_examples(self) -> int:
        return self._split.total()

    def batches(self, *, local_batch_size: int, process_index: int, process_count: int
                ) -> Iterator[Batch]:
        sizes = [self._split.size(i, process_count) for i in range(process_count)]
        num_batches = max(-(-n // local_batch_size) for n in sizes)
        single = self.label_type == CLASS_IDS
        ds = pipeline.eval_dataset(
            self._split.records(process_index, process_count), sizes[process_index],
            self._parse, self._preprocess, num_batches=num_batches,
            local_batch_size=local_batch_size,
            label_shape=() if single else (self.num_classes,),
            label_dtype=tf.int32 if single else tf.float32)
        return pipeline.eval_numpy(
            ds, sizes[process_index], self._preprocess,
            f"{self._split.builder.name} {self._split.split}, process {process_index}")


class TfdsSource:
    """A TFDS dataset; see the module docstring for labels and `pipeline` for order."""

    def __init__(self, name: str, preprocess: pipeline.Preprocess, *, seed: int,
                 num_classes: int, data_dir: str = "", train_split: str = "",
                 eval_split: str = "", shuffle_buffer: int = 50_000, shuffle_pieces: int = 16,
                 drop_unlabeled: bool = True):
        spec = spec_for(name, data_dir)
        if spec.train_split is None:
            raise DataError(f"{name!r} is an evaluation-only dataset; train on imagenet2012 "
                            f"and name it in an evaluator's dataset (config.evals)")
        if num_classes != spec.num_classes:
            raise DataError(f"dataset {name!r} has {spec.num_classes} classes, but "
                            f"dataset.num_classes = {num_classes}; set it to "
                            f"{spec.num_classes}")
        builder = prepared_builder(name, data_dir, spec)
        self.name = name
        self.num_classes = num_classes
        self.class_names = class_names(builder.info.features, spec)
        self.multilabel = spec.multilabel
        self.image_shape = (preprocess.image_size, preprocess.image_size, 3)
        self.seed, self._preprocess, self._shuffle_buffer = seed, preprocess, shuffle_buffer
        self._shuffle_pieces = shuffle_pieces
        self._train = _Split(builder, train_split or spec.train_split, spec, drop_unlabeled)
        self._eval = EvalSet(_Split(builder, _eval_split(spec, builder, eval_split), spec,
                                    drop_unlabeled), preprocess, num_classes)
        self.eval_label_type = self._eval.label_type
        self._parse = make_parse(spec, num_classes)
        self.num_train_examples = self._train.raw_size
        self.num_eval_examples = self._eval.num_examples

    def train_batches(self, *, start_step: int, local_batch_size: int, process_index: int,
                      process_count: int) -> Iterator[Batch]:
        if self._train.random_access:
            self._train._data_source  # opened here, where a failure is one clear error
            ds = pipeline.random_access_train_dataset(
                self._train.kept(process_index, process_count,
                                 self._preprocess.max_image_pixels),
                self._train.read_serialized, self._train.deserialize(self._train.features),
                self._parse, self._preprocess, seed=self.seed, process_index=process_index,
                start_step=start_step, local_batch_size=local_batch_size,
                num_classes=self.num_classes)
            return pipeline.as_numpy(ds)
        ds = pipeline.train_dataset(
            self._train.pieces(process_index, process_count, self._shuffle_pieces),
            self._parse, self._preprocess,
            seed=self.seed, process_index=process_index, start_step=start_step,
            local_batch_size=local_batch_size, num_classes=self.num_classes,
            shuffle_buffer=self._shuffle_buffer,
            over_limit=self._train.over_limit(process_index, process_count,
                                              self._shuffle_pieces,
                                              self._preprocess.max_image_pixels))
        return pipeline.as_numpy(ds)

    def eval_batches(self, *, local_batch_size: int, process_index: int,
                     process_count: int) -> Iterator[Batch]:
        return self._eval.batches(local_batch_size=local_batch_size,
                                  process_index=process_index, process_count=process_count)


def _eval_split(spec: DatasetSpec, builder, split: str) -> str:
    return split or spec.eval_split or next(
        (s for s in ("validation", "test") if s in builder.info.splits), "validation")


class LabelSpaceError(DataError):
    """An evaluation dataset whose classes are not the model's (e.g. ImageNet-V2 for a
    model trained on another dataset)."""


def eval_set(name: str, preprocess: pipeline.Preprocess, *, num_classes: int,
             data_dir: str = "", split: str = "", drop_unlabeled: bool = True) -> EvalSet:
    """A split of any known TFDS dataset as an evaluation set (its eval split unless
    `split` is given), e.g. ImageNet-V2 for a model trained on ImageNet. Raises a
    DatasetNotPreparedError that says how to prepare it if it is not in data_dir."""
    spec = spec_for(name, data_dir)
    if spec.num_classes != num_classes:
        raise LabelSpaceError(f"dataset {name!r} has {spec.num_classes} classes, but the "
                              f"model predicts {num_classes} (dataset.num_classes): it cannot "
                              "be evaluated on it")
    builder = prepared_builder(name, data_dir, spec)
    return EvalSet(_Split(builder, _eval_split(spec, builder, split), spec, drop_unlabeled),
                   preprocess, num_classes)
