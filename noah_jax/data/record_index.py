"""What a training start needs to know of every record, read once per prepared dataset.

The exact data order (`noah_jax.data.pipeline`) needs, before step 1, how many of a
process's records are left out: images over dataset.max_image_pixels and, for
multi-label data with dataset.drop_unlabeled, images without a label. Finding out
means reading every record of the shard (on ImageNet, about 140 GB on one host). A
`RecordIndex` reads them once and keeps, per record of a split, the two facts those
counts come from:

  pixels   int64: the pixels decoding the image takes, read from its headers
           (`pipeline.image_pixels_from_header`; every frame of a GIF; 0 for bytes of
           no known format, which no limit leaves out)
  labels   int32: how many label ids the record holds

So any max_image_pixels, any process count and any number of shuffle pieces is a sum
over a slice of these arrays: a later start, a resume and a run on another topology
read no record.

Where it is kept: a folder `noah_jax_record_index/<split>-<fingerprint>/` in the
prepared dataset's own directory (`builder.data_dir`, a local path or a bucket), one
`.npz` per range of records a process has indexed (`records-<start>-<stop>.npz`,
written whole under a temporary name and renamed, so a process killed while writing
leaves nothing half-written). Processes index their own ranges and write distinct
files; a range is served from any files that cover it, whoever wrote them. Where the
dataset's directory is read-only, the index goes to ~/.cache/noah_jax/record_index/
instead (looked up in both places). The fingerprint is the split's shard lengths and
bytes from the TFDS metadata, so re-preparing the dataset differently starts a new
index. Delete the folder to rebuild it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import uuid
from typing import Callable

import numpy as np
import tensorflow as tf
from absl import logging

FIELDS = ("pixels", "labels")
FOLDER = "noah_jax_record_index"
Compute = Callable[[int, int], dict[str, np.ndarray]]

_FILE = re.compile(r"records-(\d+)-(\d+)\.npz$")


def fallback_root() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "noah_jax", "record_index")


class RecordIndex:
    """`pixels` and `labels` of the records [start, stop) of one split, from the files
    under `directory` (or its fallback), computing and saving only the ranges none
    covers. `compute(start, stop)` reads those records and returns both arrays."""

    def __init__(self, directory: str, compute: Compute, fallback: str | None = None):
        self.directory = directory
        self.fallback = fallback or os.path.join(
            fallback_root(), hashlib.sha256(directory.encode()).hexdigest()[:16])
        self._compute = compute

    def get(self, start: int, stop: int) -> dict[str, np.ndarray]:
        if not 0 <= start <= stop:
            raise ValueError(f"a range of records needs 0 <= start <= stop, got "
                             f"[{start}, {stop})")
        out = {"pixels": np.zeros(stop - start, np.int64),
               "labels": np.zeros(stop - start, np.int32)}
        known = np.zeros(stop - start, bool)
        for path, (a, b) in self._files():
            lo, hi = max(a, start), min(b, stop)
            if lo >= hi or known[lo - start:hi - start].all():
                continue
            saved = _load(path)
            if saved is None or any(len(saved[f]) != b - a for f in FIELDS):
                continue  # unreadable (left by another program): compute it again
            for field in FIELDS:
                out[field][lo - start:hi - start] = saved[field][lo - a:hi - a]
            known[lo - start:hi - start] = True
        for a, b in _gaps(known):
            computed = self._compute(start + a, start + b)
            for field in FIELDS:
                values = np.asarray(computed[field])
                if values.shape != (b - a,):
                    raise ValueError(f"indexing records [{start + a}, {start + b}) gave "
                                     f"{field} of shape {values.shape}")
                out[field][a:b] = values
            self._save(start + a, start + b, {f: out[f][a:b] for f in FIELDS})
        return out

    def _files(self):
        for folder in (self.directory, self.fallback):
            if not tf.io.gfile.isdir(folder):
                continue
            for name in sorted(tf.io.gfile.listdir(folder)):
                match = _FILE.match(name)
                if match:
                    yield (os.path.join(folder, name), (int(match[1]), int(match[2])))

    def _save(self, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        name = f"records-{start:010d}-{stop:010d}.npz"
        for folder in (self.directory, self.fallback):
            try:
                tf.io.gfile.makedirs(folder)
                partial = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.partial")
                with tf.io.gfile.GFile(partial, "wb") as f:
                    f.write(buffer.getvalue())
                tf.io.gfile.rename(partial, os.path.join(folder, name), overwrite=True)
                return
            except (OSError, tf.errors.OpError) as e:
                logging.warning("could not keep the record index of records [%d, %d) in "
                                "%s (%s)%s", start, stop, folder, e,
                                "; trying " + self.fallback if folder != self.fallback
                                else "; the next start will read them again")


def _load(path: str) -> dict[str, np.ndarray] | None:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            with np.load(io.BytesIO(f.read())) as npz:
                return {field: npz[field] for field in FIELDS}
    except (OSError, KeyError, ValueError, tf.errors.OpError):
        return None


def _gaps(known: np.ndarray) -> list[tuple[int, int]]:
    """The [a, b) runs of False in `known`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[1], known.astype(np.int8), [1]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def fingerprint(shard_lengths, num_bytes: int) -> str:
    """A short name for a split's content as its TFDS metadata describes it."""
    text = f"{list(map(int, shard_lengths))}:{int(num_bytes)}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]
