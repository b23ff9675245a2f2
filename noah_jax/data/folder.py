"""Train and evaluate on your own images: a folder of class-named image folders.

Expected layout (local or any filesystem `tf.io.gfile` reads, e.g. gs://):

  root/
    train/                 the training split (`train_split`, default 'train')
      cat/  a.jpg b.png ...  one folder per class; its name is the class name
      dog/  ...
    val/                   the eval split (`eval_split`, default: the first of
      cat/  ...            'val', 'validation', 'test' that exists)
      dog/  ...

Classes are the sorted names of the training split's folders, so label k is the k-th
name; the eval split uses the same labels and may lack classes, but must not have one
the training split does not. Images are found by extension, case-insensitively (.jpg
.jpeg .png .gif .bmp), anywhere below a class folder; other files and hidden files or
folders (names starting with '.') are ignored, so stray notes or .DS_Store files do
no harm.

Corrupt images. One unreadable file should not stop a run hours in, so construction
reads and decodes every listed file once (a parallel tf.data pass, a few ms per image
per core) and keeps only those that decode; the rest are logged and listed in
`skipped`. So are images with more than `max_image_pixels` pixels, judged from their
headers and never decoded, here or later: a small file can declare an image that
takes gigabytes to decode. The sizes the trainer sees (`num_train_examples`, ...)
count valid files only.

Order and sharding. Each split's valid files are taken in sorted path order; process
p of P reads files p, p + P, p + 2P, ... of it, so the shards are disjoint, cover the
split, and differ in size by at most one. The batches themselves come from
`noah_jax.data.pipeline` (per-process shuffling, exact resumption, padded eval).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow as tf
from absl import logging

from noah_jax.data import base, pipeline
from noah_jax.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
DEFAULT_TRAIN_SPLIT = "train"
DEFAULT_EVAL_SPLITS = ("val", "validation", "test")
_SKIPPED_SHOWN = 5  # how many skipped paths a warning names
_PIECES_TAG = 0x50494543  # "PIEC": the fixed order a shard is cut into pieces in

_LAYOUT = ("expected root/<split>/<class name>/<images>, e.g. root/train/cat/1.jpg and "
           "root/val/cat/2.jpg")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _subfolders(path: str) -> list[str]:
    """Sorted names of the non-hidden folders directly inside `path`."""
    names = []
    for entry in tf.io.gfile.listdir(path):
        name = entry.rstrip("/")  # cloud filesystems mark folders with a trailing '/'
        if not _is_hidden(name) and tf.io.gfile.isdir(tf.io.gfile.join(path, name)):
            names.append(name)
    return sorted(names)


def image_files(folder: str) -> list[str]:
    """Paths of the image files anywhere below `folder`, skipping hidden files and
    folders (anything below a hidden folder included). `noah_jax.inference` finds the
    images to predict on with it, by the same rules."""
    paths = []
    for directory, subdirs, files in tf.io.gfile.walk(folder):
        # Pruning in place stops the (top-down) walk from entering hidden folders.
        subdirs[:] = [d for d in subdirs if not _is_hidden(d.rstrip("/"))]
        for name in files:
            if not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(tf.io.gfile.join(directory, name))
    return paths


def _check_images(paths: list[str], max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (int64) of the `paths` that read and decode as images of at most
    `max_pixels` pixels (0: any size), and of those that have more pixels.

    Decoding is the only reliable test (a truncated JPEG has a valid header), so every
    file is decoded once, in parallel, unless its header declares more than
    `max_pixels` pixels: not decoding those is the point of the limit. Files whose
    read, header or decode fails are dropped by `ignore_errors`, so they are in
    neither list. Only the index and a flag leave the pipeline, not the pixels.
    """
    if not paths:
        return np.zeros([0], np.int64), np.zeros([0], np.int64)

    def probe(index, path):
        encoded = tf.io.read_file(path)
        within = pipeline.within_pixel_limit(encoded, max_pixels)
        # The decoded size is an output, so the decode runs (and can fail) when taken.
        decoded = tf.cond(within, lambda: tf.size(pipeline.decode(encoded)) >= 0,
                          lambda: tf.constant(False))
        return index, within, decoded

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string)).enumerate()
    # Order does not matter (the results are sorted), so let the fastest file go first.
    ds = ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors()
    decodable, too_large = [], []
    for index, within, _ in ds.as_numpy_iterator():
        (decodable if within else too_large).append(int(index))
    return np.sort(np.array(decodable, np.int64)), np.sort(np.array(too_large, np.int64))


def _parse(record: dict) -> tuple[tf.Tensor, tf.Tensor]:
    """Record {'path', 'label'} -> (encoded image bytes, int32 label)."""
    return tf.io.read_file(record["path"]), tf.cast(record["label"], tf.int32)


class FolderSource:
    """The images under `root` (see the module docstring for the layout).

    `num_classes` is the configured class count; it must equal the number of class
    folders, so that a typo'd or missing folder fails here instead of training a
    head of the wrong width. `train_split` / `eval_split` name the split folders
    ('' = the defaults). Training order: each process's files, in a fixed random
    order, are cut into `shuffle_pieces` chunks that `pipeline.train_dataset`
    interleaves anew each epoch, then shuffles with a `shuffle_buffer` buffer.

    Attributes besides the `Source` ones: `root`, `train_split`, `eval_split` (the
    resolved folder names), `class_names` (label k is class_names[k]), `skipped`
    (split folder name -> paths that could not be decoded or have more than
    preprocess.max_image_pixels pixels; the log says which), and `multilabel` (False).
    """

    name = "folder"
    multilabel = False
    eval_label_type = base.CLASS_IDS

    def __init__(self, root: str, preprocess: pipeline.Preprocess, *, seed: int,
                 num_classes: int, train_split: str = "", eval_split: str = "",
                 shuffle_buffer: int = 10_000, shuffle_pieces: int = 16):
        if not root or not tf.io.gfile.isdir(root):
            raise DataError(f"image folder {root!r} does not exist or is not a folder; give "
                            f"the path of a folder laid out as: {_LAYOUT}")
        self.root = root
        self.preprocess = preprocess
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_pieces = shuffle_pieces
        self.train_split = train_split or DEFAULT_TRAIN_SPLIT
        self.eval_split = eval_split or self._default_eval_split()
        train_dir = tf.io.gfile.join(root, self.train_split)
        eval_dir = tf.io.gfile.join(root, self.eval_split)
        for split, folder in ((self.train_split, train_dir), (self.eval_split, eval_dir)):
            if not tf.io.gfile.isdir(folder):
                raise DataError(f"split folder {folder!r} does not exist; create it, or name "
                                f"an existing folder of {root!r} as the split; {_LAYOUT}")

        self.class_names = _subfolders(train_dir)
        if not self.class_names:
            raise DataError(f"{train_dir!r} has no class folders; put each class's images "
                            f"in a folder named after the class: {_LAYOUT}")
        if num_classes != len(self.class_names):
            raise DataError(
                f"the config says num_classes={num_classes}, but {train_dir!r} has "
                f"{len(self.class_names)} class folders ({self._names_preview()}); set "
                f"dataset.num_classes={len(self.class_names)}, or add or remove class folders")
        unknown = sorted(set(_subfolders(eval_dir)) - set(self.class_names))
        if unknown:
            raise DataError(
                f"eval split {eval_dir!r} has class folders the training split lacks: "
                f"{unknown}; every eval class needs a folder of the same name in {train_dir!r}"
                f" (rename or remove these)")
        self.num_classes = num_classes
        self.image_shape = (preprocess.image_size, preprocess.image_size, 3)

        self.skipped: dict[str, list[str]] = {}
        self._train_paths, self._train_labels = self._valid_files(self.train_split)
        self._eval_paths, self._eval_labels = self._valid_files(self.eval_split)
        self.num_train_examples = len(self._train_paths)
        self.num_eval_examples = len(self._eval_paths)
        if not self.num_train_examples:
            raise DataError(f"no readable images in {train_dir!r}; accepted extensions are "
                            f"{', '.join(IMAGE_EXTENSIONS)}")
        if not self.num_eval_examples:
            raise DataError(f"no readable images in {eval_dir!r}; accepted extensions are "
                            f"{', '.join(IMAGE_EXTENSIONS)}")

    def _default_eval_split(self) -> str:
        for name in DEFAULT_EVAL_SPLITS:
            if tf.io.gfile.isdir(tf.io.gfile.join(self.root, name)):
                return name
        raise DataError(f"found no eval split in {self.root!r}: expected a folder named one "
                        f"of {list(DEFAULT_EVAL_SPLITS)}, or set the eval split's folder name "
                        f"explicitly; {_LAYOUT}")

    def _names_preview(self, limit: int = 10) -> str:
        names = self.class_names
        return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")

    def _valid_files(self, split: str) -> tuple[list[str], np.ndarray]:
        """The split's decodable image paths (sorted) and their labels; records the
        rest in `self.skipped[split]` and logs them."""
        split_dir = tf.io.gfile.join(self.root, split)
        labelled = []
        for label, class_name in enumerate(self.class_names):
            class_dir = tf.io.gfile.join(split_dir, class_name)
            if tf.io.gfile.isdir(class_dir):  # an eval split may lack classes
                labelled += [(path, label) for path in image_files(class_dir)]
        labelled.sort()
        paths = [path for path, _ in labelled]
        labels = np.array([label for _, label in labelled], np.int32)
        max_pixels = self.preprocess.max_image_pixels
        keep, too_large = _check_images(paths, max_pixels)
        unreadable = np.ones(len(paths), bool)
        unreadable[keep] = unreadable[too_large] = False
        bad = [path for path, failed in zip(paths, unreadable) if failed]
        large = [paths[i] for i in too_large]
        self.skipped[split] = sorted(bad + large)  # path order, as `paths`
        for problem, skipped in (("that could not be read or decoded", bad),
                                 (f"with more than max_image_pixels={max_pixels} pixels "
                                  "(never decoded)", large)):
            if skipped:
                shown = ", ".join(skipped[:_SKIPPED_SHOWN]) + (
                    ", ..." if len(skipped) > _SKIPPED_SHOWN else "")
                logging.warning("Skipping %d of %d images in %s %s: %s", len(skipped),
                                len(paths), split_dir, problem, shown)
        return [paths[i] for i in keep], labels[keep]

    @staticmethod
    def _records(paths: list[str], labels: np.ndarray) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(
            {"path": tf.constant(paths, tf.string, shape=[len(paths)]),
             "label": tf.constant(labels, tf.int32, shape=[len(labels)])})

    def train_batches(self, *, start_step: int, local_batch_size: int, process_index: int,
                      process_count: int) -> Iterator[base.Batch]:
        """Endless {'image' f32 [b,S,S,3], 'label'} batches of this process's shard, from
        step `start_step` on (`pipeline.train_dataset` describes the order)."""
        base.check_process_args(local_batch_size, process_index, process_count)
        if self.num_train_examples < process_count:
            raise DataError(f"{self.num_train_examples} training images cannot be shared "
                            f"among {process_count} processes; add images or use fewer "
                            f"processes")
        paths = np.asarray(self._train_paths[process_index::process_count], object)
        labels = self._train_labels[process_index::process_count]
        # The sorted list is grouped by class: put the shard in a fixed random order
        # (from the seed) before cutting it into the pieces the pipeline interleaves.
        order = np.argsort(base.hash_u64(self.seed, _PIECES_TAG, process_index,
                                         np.arange(len(paths), dtype=np.uint64)), kind="stable")
        pieces = [(self._records(list(paths[chunk]), labels[chunk]), len(chunk))
                  for chunk in np.array_split(order, min(self.shuffle_pieces, len(order)))]
        # Every file was checked against max_image_pixels when the source was built.
        ds = pipeline.train_dataset(
            pieces, _parse, self.preprocess, seed=self.seed,
            process_index=process_index, start_step=start_step,
            local_batch_size=local_batch_size, num_classes=self.num_classes,
            shuffle_buffer=self.shuffle_buffer, check_pixels=False)
        return pipeline.as_numpy(ds)

    def eval_batches(self, *, local_batch_size: int, process_index: int,
                     process_count: int) -> Iterator[base.Batch]:
        """This process's {'image', 'label' i32, 'mask'} eval batches: its shard once,
        padded so every process runs the same number of batches."""
        base.check_process_args(local_batch_size, process_index, process_count)
        shard_sizes = [len(range(p, self.num_eval_examples, process_count))
                       for p in range(process_count)]
        num_batches = -(-max(shard_sizes) // local_batch_size)
        paths = self._eval_paths[process_index::process_count]
        labels = self._eval_labels[process_index::process_count]
        ds = pipeline.eval_dataset(
            self._records(paths, labels), len(paths), _parse, self.preprocess,
            num_batches=num_batches, local_batch_size=local_batch_size, label_shape=(),
            label_dtype=tf.int32)
        # The files were checked when the source was built; one replaced since by a
        # larger image is left out, and reported, rather than decoded.
        return pipeline.eval_numpy(ds, len(paths), self.preprocess,
                                   f"{self.eval_split} split, process {process_index}")
