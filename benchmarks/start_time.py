"""Time to the first training batch against dataset size, TFRecord and ArrayRecord.

    .venv/bin/python benchmarks/start_time.py --root DIR [--sizes 10000,100000,1000000] \
        [--formats tfrecord,array_record] [--batch_size 128] [--out results.json]

For each size N and file format, a synthetic TFDS dataset (`start_time_images`: N small
JPEGs of 32x32 pixels in 100 classes, a 1,000-image validation split) is prepared in
DIR/<format>-<N> by the real TFDS writer (once; later runs reuse it), and then three
fresh processes each build the training source the trainer builds
(`noah_jax.data.get_source` with the ResNet recipe's dataset and augmentation
settings: shuffle buffer 50,000, 16 pieces, the pixel limit on) and time it up to the
first batch of `source.train_batches`:

  first start   step 0, on a dataset never trained on: builds the record index (one
                pass over every record's header, once per prepared dataset)
  start         step 0 again: the index is read back
  resume        a step half way through the second epoch

The time counted starts before the source is built and ends when the first batch is in
numpy; the model's compilation, which does not depend on the dataset, is left out. The
page cache is warm (the files were just written or read), as on a host whose disk is
fast next to the network filesystem of a pod: the numbers are the work a start does, not
the disk's speed. Each child prints one JSON line; the parent prints a table and, with
--out, writes them all.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

NUM_CLASSES, NUM_VALIDATION, IMAGE_SIDE, DISTINCT_IMAGES = 100, 1000, 32, 256
SIZES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)  # the builder's configs
STARTS = ("first start", "start", "resume")


@functools.cache
def _builder_class():
    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds

    class StartTimeImages(tfds.core.GeneratorBasedBuilder):
        """N small JPEGs; record i holds image i % 256 and label i % 100."""

        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=str(n)) for n in SIZES]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

        def _split_generators(self, dl_manager):
            del dl_manager
            rng = np.random.default_rng(0)
            jpegs = [tf.io.encode_jpeg(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3),
                                                    dtype=np.uint8)).numpy()
                     for _ in range(DISTINCT_IMAGES)]
            n = int(self.builder_config.name)
            return {"train": self._generate_examples(jpegs, n),
                    "validation": self._generate_examples(jpegs, NUM_VALIDATION)}

        def _generate_examples(self, jpegs, n):
            for i in range(n):
                yield i, {"image": jpegs[i % len(jpegs)], "label": i % NUM_CLASSES}

    return StartTimeImages


def data_dir_of(root: str, file_format: str, n: int) -> str:
    return os.path.join(root, f"{file_format}-{n}")


def prepare(root: str, file_format: str, n: int) -> float:
    """Prepares the dataset (unless it is there); the seconds it took."""
    import tensorflow_datasets as tfds
    _builder_class()
    builder = tfds.builder(f"start_time_images/{n}", data_dir=data_dir_of(root, file_format, n),
                           file_format=file_format)
    began = time.monotonic()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        beam_options=None, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return time.monotonic() - began


def first_batch(root: str, file_format: str, n: int, start: str, batch_size: int) -> dict:
    """In this process: the seconds from building the source to its first batch."""
    began = time.monotonic()
    from configs import resnet18_noah
    from noah_jax.data import get_source
    from noah_jax.models import input_preprocessing
    _builder_class()
    imported = time.monotonic()

    c = resnet18_noah.get_config()
    c.dataset.name = f"start_time_images/{n}"
    c.dataset.data_dir = data_dir_of(root, file_format, n)
    c.dataset.num_classes = NUM_CLASSES
    c.dataset.image_size = IMAGE_SIDE
    c = input_preprocessing.resolve(c)
    t0 = time.monotonic()
    source = get_source(c.dataset, seed=c.seed, augment=c.augment,
                        label_smoothing=c.label_smoothing)
    step = 0 if start != "resume" else (3 * n // 2) // batch_size
    batch = next(iter(source.train_batches(start_step=step, local_batch_size=batch_size,
                                           process_index=0, process_count=1)))
    assert batch["image"].shape[0] == batch_size
    return {"format": file_format, "records": n, "start": start, "step": step,
            "seconds": time.monotonic() - t0, "import_seconds": imported - began}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="where the datasets are prepared")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--formats", default="tfrecord,array_record")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--starts", default=",".join(STARTS),
                        help="which starts to time; default: %(default)s")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh processes per measurement; the median is reported")
    parser.add_argument("--out", default="", help="write the results here as JSON")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if set(sizes) - set(SIZES) or set(args.formats.split(",")) - {"tfrecord", "array_record"}:
        parser.error(f"--sizes: some of {','.join(map(str, SIZES))}; --formats: some of "
                     "tfrecord,array_record")
    starts = [x.strip() for x in args.starts.split(",") if x.strip()]
    if not starts or set(starts) - set(STARTS):
        parser.error(f"--starts: some of {','.join(STARTS)}")
    if args.repeats < 1 or args.batch_size < 1:
        parser.error("need --repeats >= 1 and --batch_size >= 1")
    if args.child:
        file_format, n, start = args.child.split(",")
        print(json.dumps(first_batch(args.root, file_format, int(n), start, args.batch_size)),
              flush=True)
        return 0

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=here, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    rows, prepared = [], {}
    for n in sizes:
        for file_format in args.formats.split(","):
            prepared[f"{file_format}-{n}"] = round(prepare(args.root, file_format, n), 1)
            print(f"prepared {file_format} {n:,}: {prepared[f'{file_format}-{n}']} s",
                  flush=True)
            for start in starts:
                times = []
                for _ in range(args.repeats):
                    if start == "first start":  # the index of an earlier run goes
                        index = os.path.join(data_dir_of(args.root, file_format, n),
                                             "start_time_images", str(n), "1.0.0",
                                             "noah_jax_record_index")
                        subprocess.run(["rm", "-rf", index], check=True)
                    out = subprocess.run(
                        [sys.executable, __file__, "--root", args.root, "--batch_size",
                         str(args.batch_size), "--child", f"{file_format},{n},{start}"],
                        env=env, check=True, capture_output=True, text=True).stdout
                    row = json.loads(out.strip().splitlines()[-1])
                    times.append(row.pop("seconds"))
                row.update(seconds=float(np.median(times)), each=[round(t, 2) for t in times])
                rows.append(row)
                print(f"  {start:12s} step {row['step']:>6,}: {row['seconds']:7.2f} s "
                      f"(median of {len(times)}: {row['each']})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                       "batch_size": args.batch_size, "prepare_seconds": prepared,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
