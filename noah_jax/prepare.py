"""Builds TFDS datasets for training: `python -m noah_jax.prepare NAME... --data_dir=DIR`.

  python -m noah_jax.prepare imagenet2012 --data_dir=/data/tfds
  python -m noah_jax.prepare coco/2017 voc/2007 --data_dir=/data/tfds

It calls the TFDS builder API (`download_and_prepare`) with nothing but
`requirements.txt` installed; the `tfds build` command line needs Apache Beam and
mlcroissant besides, which this project does not install.

Archives are read from `--manual_dir` (default DATA_DIR/downloads/manual):
ImageNet's must be put there by hand (they need a registration); COCO's and VOC's are
downloaded when the machine is online, or read from there under their usual names
when it is not. Before building it checks that the archives are there and that the
disk can hold the result, so a build does not fail hours in. A name that is already
prepared is left alone.

The files are ArrayRecord (`--file_format=array_record`), which training reads by
record index, so that a start or resume costs the same at any step; into a gs://
bucket, which the array_record reader cannot open, TFRecord (`--file_format=tfrecord`),
read in sequence.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tarfile
import time
import zipfile

from noah_jax.data import tfds_source

_GB = 1e9


class PrepareError(Exception):
    """A problem the user can fix; its message says how."""


def _local(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _nearest_existing(path: str) -> str | None:
    """`path` or its nearest existing parent; None for a bucket."""
    if "://" in path:
        return None
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path


def _free_bytes(path: str) -> float | None:
    """Free space on the disk that holds `path` (None for a bucket)."""
    existing = _nearest_existing(path)
    return None if existing is None else shutil.disk_usage(existing).free


def _same_disk(a: str, b: str) -> bool:
    a, b = _nearest_existing(a), _nearest_existing(b)
    return a is not None and b is not None and os.stat(a).st_dev == os.stat(b).st_dev


def check(name: str, data_dir: str, manual_dir: str, spec: tfds_source.DatasetSpec, *,
          disk: bool = True) -> None:
    """Refuses, before any work, a build that cannot succeed here."""
    import tensorflow as tf  # tf.io.gfile reads gs:// paths too

    missing = [f for f in spec.manual_files
               if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
    if missing:
        raise PrepareError(
            f"{name} needs {' and '.join(missing)} in {manual_dir} (from {spec.source}); "
            f"put {'them' if len(missing) > 1 else 'it'} there, or pass --manual_dir=DIR "
            "where they are")
    free = _free_bytes(data_dir) if disk else None
    if free is None:
        return
    archives = [os.path.join(manual_dir, f)
                for f in (*spec.manual_files, *spec.optional_manual_files)]
    present = [a for a in archives if tf.io.gfile.exists(a)]
    present_bytes = sum(tf.io.gfile.stat(a).length for a in present)
    if len(present) == len(archives) and archives:
        # Nothing to download: the prepared files take about as much as the archives (they
        # keep the JPEG bytes as they are).
        needed = 1.05 * present_bytes
        what = f"about {needed / _GB:.1f} GB for the prepared files"
    elif spec.disk_gb:
        # Archives already in manual_dir need no more room if they are on the same disk.
        needed = spec.disk_gb * _GB - (present_bytes if _same_disk(manual_dir, data_dir)
                                       else 0)
        what = f"{spec.disk}, {needed / _GB:.0f} GB of it still to be written"
    else:
        return
    if free < needed:
        raise PrepareError(
            f"{name} needs {what}, but only {free / _GB:.1f} GB are free on the disk of "
            f"{data_dir}; choose another --data_dir or free some space "
            "(--skip_disk_check to try anyway)")


FILE_FORMATS = ("tfrecord", "array_record")


def default_file_format(data_dir: str) -> str:
    """ArrayRecord on a file system (benchmarks/results/start_time: a start or resume
    costs the same at any dataset size and step), TFRecord in a gs:// bucket, which
    the array_record reader cannot open (google/array_record#120) and tf.data streams."""
    return "tfrecord" if data_dir.startswith("gs://") else "array_record"


def prepare(name: str, data_dir: str, manual_dir: str, *, skip_disk_check: bool = False,
            file_format: str | None = None) -> str:
    """Builds `name` in `data_dir` unless it is already there; returns what was done.
    `file_format`: TFRecord files (read in sequence by tf.data) or ArrayRecord files
    (read by record index: training starts and resumes without reading ahead); None:
    `default_file_format(data_dir)`, or the format of a dataset already there."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import download_manager

    if name in ("digits", "digits_multilabel", "synthetic", "folder"):
        raise PrepareError(f"{name!r} is not a TFDS dataset and needs no preparation (the "
                           "digits and their canvases come from scikit-learn, synthetic "
                           "images are generated, a folder is read as it is)")
    try:
        spec = tfds_source.spec_for(name, data_dir)
    except ValueError as e:
        raise PrepareError(str(e)) from None
    if file_format is not None and file_format not in FILE_FORMATS:
        raise PrepareError(f"--file_format={file_format!r}: choose one of "
                           f"{', '.join(FILE_FORMATS)}")
    builder = tfds.builder(name, data_dir=data_dir)
    if tfds_source.is_prepared(builder):
        had = builder.info.file_format.value
        if file_format is not None and had != file_format:
            raise PrepareError(
                f"{name} is prepared in {builder.data_dir} as {had} files; a dataset "
                f"folder holds one format: prepare the {file_format} copy in another "
                f"--data_dir, or run without --file_format={file_format}")
        return f"{name}: already prepared in {builder.data_dir} ({had})"
    file_format = file_format or default_file_format(data_dir)
    builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
    check(name, data_dir, manual_dir, spec, disk=not skip_disk_check)
    print(f"preparing {name} in {data_dir} from {manual_dir}"
          + (f" ({spec.disk})" if spec.disk else ""), flush=True)
    start = time.time()
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except download_manager.NonMatchingChecksumError as e:
        found = re.search(r"downloaded to (\S+),", str(e))
        raise PrepareError(
            f"{name}: {found.group(1) if found else 'an archive in ' + manual_dir} is not "
            "the official file (its checksum differs from the one TFDS registered); "
            f"download it again from {spec.source or 'its source'}") from e
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise PrepareError(f"{name}: an archive in {manual_dir} is damaged or not the "
                           f"expected one ({type(e).__name__}: {e}); download it again") from e
    except (OSError, ConnectionError) as e:
        offline = (f"; offline, put {', '.join(spec.optional_manual_files)} (from "
                   f"{spec.source}) in {manual_dir}" if spec.optional_manual_files else "")
        raise PrepareError(f"{name}: {type(e).__name__}: {e}{offline}") from e
    splits = ", ".join(f"{split} {info.num_examples:,}"
                       for split, info in builder.info.splits.items())
    return (f"{name}: prepared in {builder.data_dir} in {time.time() - start:.0f} s "
            f"({splits} examples, {file_format})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m noah_jax.prepare",
        description="Build TFDS datasets (ArrayRecord or TFRecord files) that the training "
                    "configs read with dataset.name=NAME and dataset.data_dir=DATA_DIR.")
    parser.add_argument("names", nargs="+", metavar="NAME",
                        help=f"TFDS names: {', '.join(tfds_source.DATASETS)}, or any TFDS "
                             "image-classification dataset")
    parser.add_argument("--data_dir", default="~/tensorflow_datasets",
                        help="where the built dataset goes (default: %(default)s)")
    parser.add_argument("--manual_dir", default="",
                        help="where the manually downloaded archives lie "
                             "(default: DATA_DIR/downloads/manual)")
    parser.add_argument("--file_format", default=None, choices=FILE_FORMATS,
                        help="array_record (read by index: a start or resume reads no "
                             "record before its position; the default) or tfrecord (read "
                             "in sequence; the default for a gs:// data_dir)")
    parser.add_argument("--skip_disk_check", action="store_true",
                        help="build even if the disk looks too small")
    args = parser.parse_args(argv)
    data_dir = _local(args.data_dir)
    manual_dir = _local(args.manual_dir or tfds_source.default_manual_dir(data_dir))
    for name in args.names:
        try:
            print(prepare(name, data_dir, manual_dir, skip_disk_check=args.skip_disk_check,
                          file_format=args.file_format), flush=True)
        except PrepareError as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            # TFDS builds in an `incomplete.*` folder that it renames only when done, so an
            # interrupted build is never taken for a prepared dataset.
            print(f"{parser.prog}: interrupted while preparing {name}; run the same command "
                  "again to start its build afresh", file=sys.stderr)
            return 130
    print(f"train with --config.dataset.data_dir={data_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
