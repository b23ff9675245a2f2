"""Input sources: `get_source(config.dataset, seed=config.seed) -> Source`.

A `Source` (noah_jax/data/base.py) gives sizes, the image shape and two iterators
of host-side numpy batches: an endless, resumable `train_batches` and a finite,
padded and masked `eval_batches`. Names:

  digits     scikit-learn's 8x8 handwritten digits, upsampled (noah_jax/data/digits.py);
             the CPU demo, no download.
  synthetic  random labelled images of any size and class count
             (noah_jax/data/synthetic.py); benchmarks and smoke tests.

Submodules are imported on demand, so asking for 'synthetic' never imports
scikit-learn, and nothing here imports TensorFlow.
"""

from __future__ import annotations

import ml_collections

from noah_jax.data.base import Batch, Source

__all__ = ["AVAILABLE_SOURCES", "Batch", "Source", "get_source"]

AVAILABLE_SOURCES = ("digits", "synthetic")


def get_source(dataset_config: ml_collections.ConfigDict, *, seed: int) -> Source:
    """The source named by `dataset_config.name`, built from the `dataset` config fields."""
    name = dataset_config.name
    if name == "digits":
        from noah_jax.data.digits import NUM_CLASSES, DigitsSource

        # These fields mean something only for 'synthetic'; a nonzero value here is a
        # config mistake, not something to ignore.
        if dataset_config.num_train_examples or dataset_config.num_eval_examples:
            raise ValueError("dataset.num_train_examples / num_eval_examples apply to "
                             "'synthetic' only; leave them 0 for 'digits'")
        if dataset_config.num_classes != NUM_CLASSES:
            raise ValueError(f"dataset 'digits' has {NUM_CLASSES} classes, but "
                             f"dataset.num_classes = {dataset_config.num_classes}")
        return DigitsSource(seed=seed, image_size=dataset_config.image_size)
    if name == "synthetic":
        from noah_jax.data import synthetic

        return synthetic.SyntheticSource(
            seed=seed, image_size=dataset_config.image_size,
            num_classes=dataset_config.num_classes,
            num_train_examples=(dataset_config.num_train_examples
                                or synthetic.DEFAULT_NUM_TRAIN_EXAMPLES),
            num_eval_examples=(dataset_config.num_eval_examples
                               or synthetic.DEFAULT_NUM_EVAL_EXAMPLES))
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(AVAILABLE_SOURCES)}. "
                     "TFDS datasets such as imagenet2012 are not wired in yet.")
