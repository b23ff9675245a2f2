"""Input sources: `get_source(config.dataset, seed=..., augment=config.augment) -> Source`.

A `Source` (noah_jax/data/base.py) gives sizes, the image shape, the class names and
two iterators of host-side numpy batches: an endless, resumable `train_batches` and a finite,
padded and masked `eval_batches`. Names:

  digits     scikit-learn's 8x8 handwritten digits, upsampled (noah_jax/data/digits.py);
             the CPU demo, no download.
  digits_multilabel  canvases of 1 to 4 of those digits with multi-hot labels
             (noah_jax/data/digits_multilabel.py); the multi-label CPU demo, scored
             by mAP and F1 like COCO.
  synthetic  random labelled images of any size and class count
             (noah_jax/data/synthetic.py); benchmarks and smoke tests.
  folder     your own images, root/<split>/<class>/<image> under dataset.data_dir
             (noah_jax/data/folder.py).
  TFDS names imagenet2012, coco/2017, voc/2007, cifar10, cifar100, imagenette,
             oxford_iiit_pet, or any TFDS image-classification dataset
             (noah_jax/data/tfds_source.py); imagenet_v2 and imagenet2012_real as
             evaluation sets (`get_eval_set`, named by config.evals).

The TFDS and folder sources run tf.data pipelines (noah_jax/data/pipeline.py) with
the augmentation of config.augment. Submodules are imported on demand, so asking for
'synthetic' never imports scikit-learn or TensorFlow.
"""

from __future__ import annotations

import ml_collections

from noah_jax.data.base import (CLASS_IDS, LABEL_TYPES, MULTI_HOT, REAL_LABELS, Batch,
                                Source)
from noah_jax.errors import ConfigError

__all__ = ["Batch", "CLASS_IDS", "LABEL_TYPES", "MULTI_HOT", "REAL_LABELS", "Source",
           "get_eval_set", "get_source", "keep_tensorflow_off_accelerators"]


def keep_tensorflow_off_accelerators() -> None:
    """TensorFlow (the tf.data pipelines, TensorBoard's writer) never needs an
    accelerator and must not reserve one's memory, which JAX needs. It has to run before
    TensorFlow initialises its devices: the trainer calls it first thing, and the
    pipeline module on import. Without TensorFlow installed there is nothing to do."""
    try:
        import tensorflow as tf
    except ImportError:
        return
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass  # devices already initialised (by an earlier call): nothing left to hide


def get_source(dataset_config: ml_collections.ConfigDict, *, seed: int,
               augment: ml_collections.ConfigDict | None = None,
               label_smoothing: float = 0.0) -> Source:
    """The source named by `dataset_config.name`, built from the `dataset` config fields.

    `augment` (config.augment) drives the tf.data sources' preprocessing; the
    in-memory demo sources have their own fixed augmentation and ignore it.
    `label_smoothing` smooths the targets that mixup/cutmix produce.
    """
    name = dataset_config.name
    if name != "synthetic" and (dataset_config.num_train_examples
                                or dataset_config.num_eval_examples):
        # These fields mean something only for 'synthetic'; a nonzero value elsewhere is
        # a config mistake, not something to ignore.
        raise ConfigError("dataset.num_train_examples / num_eval_examples apply to "
                          f"'synthetic' only; leave them 0 for {name!r}")
    if name == "digits":
        from noah_jax.data.digits import NUM_CLASSES, DigitsSource

        if dataset_config.num_classes != NUM_CLASSES:
            raise ConfigError(f"dataset 'digits' has {NUM_CLASSES} classes, but "
                              f"dataset.num_classes = {dataset_config.num_classes}")
        return DigitsSource(seed=seed, image_size=dataset_config.image_size)
    if name == "digits_multilabel":
        from noah_jax.data.digits_multilabel import NUM_CLASSES, DigitsMultilabelSource

        if dataset_config.num_classes != NUM_CLASSES:
            raise ConfigError(f"dataset 'digits_multilabel' has {NUM_CLASSES} classes, but "
                              f"dataset.num_classes = {dataset_config.num_classes}")
        return DigitsMultilabelSource(seed=seed, image_size=dataset_config.image_size)
    if name == "synthetic":
        from noah_jax.data import synthetic

        return synthetic.SyntheticSource(
            seed=seed, image_size=dataset_config.image_size,
            num_classes=dataset_config.num_classes,
            num_train_examples=(dataset_config.num_train_examples
                                or synthetic.DEFAULT_NUM_TRAIN_EXAMPLES),
            num_eval_examples=(dataset_config.num_eval_examples
                               or synthetic.DEFAULT_NUM_EVAL_EXAMPLES))

    # tf.data sources from here on.
    if augment is None:
        raise ConfigError(f"dataset {name!r} needs the augmentation config: "
                          "get_source(config.dataset, seed=..., augment=config.augment)")
    from noah_jax.data import pipeline

    preprocess = pipeline.Preprocess.from_config(dataset_config, augment, label_smoothing)
    if name == "folder":
        from noah_jax.data.folder import FolderSource

        if not dataset_config.data_dir:
            raise ConfigError("dataset 'folder' reads dataset.data_dir/<split>/<class>/"
                              "<image>; set dataset.data_dir to that root folder")
        return FolderSource(dataset_config.data_dir, preprocess, seed=seed,
                            num_classes=dataset_config.num_classes,
                            train_split=dataset_config.train_split,
                            eval_split=dataset_config.eval_split,
                            shuffle_buffer=dataset_config.shuffle_buffer,
                            shuffle_pieces=dataset_config.shuffle_pieces)
    from noah_jax.data import tfds_source

    return tfds_source.TfdsSource(
        name, preprocess, seed=seed, num_classes=dataset_config.num_classes,
        data_dir=dataset_config.data_dir, train_split=dataset_config.train_split,
        eval_split=dataset_config.eval_split, shuffle_buffer=dataset_config.shuffle_buffer,
        shuffle_pieces=dataset_config.shuffle_pieces,
        drop_unlabeled=dataset_config.drop_unlabeled)


def get_eval_set(dataset_config: ml_collections.ConfigDict, name: str, split: str = "", *,
                 augment: ml_collections.ConfigDict):
    """A split of the TFDS dataset `name` (its evaluation split unless `split` is given)
    as an evaluation set: `.label_type` (a label type of noah_jax/data/base.py),
    `.num_examples` and `.batches(...)`, like a source's eval_batches. Images are
    preprocessed as the training dataset's evaluation images (`dataset_config`); raises
    a DatasetNotPreparedError if `name` is not prepared in dataset.data_dir."""
    if name in ("digits", "digits_multilabel", "synthetic", "folder"):
        raise ConfigError(f"only TFDS datasets can be evaluated on besides the training "
                          f"dataset's own evaluation split, not {name!r}")
    from noah_jax.data import pipeline, tfds_source

    preprocess = pipeline.Preprocess.from_config(dataset_config, augment)
    return tfds_source.eval_set(name, preprocess, num_classes=dataset_config.num_classes,
                                data_dir=dataset_config.data_dir, split=split,
                                drop_unlabeled=dataset_config.drop_unlabeled)
