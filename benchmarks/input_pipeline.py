"""Input-pipeline throughput of the ImageNet recipes, in images/s per CPU core.

    .venv/bin/python benchmarks/input_pipeline.py [--num_images 512] [--batch_size 64] \
        [--batches 50] [--warmup 5] [--recipes cnn,deit,mixer,eval] [--threads N]

The input is N JPEG files synthesized in memory at ImageNet-like sizes (about 500x375,
375x500 or 400x400, each scaled by a random factor in [0.8, 1.2]) and quality 90. Their
content is random colour structure at every scale plus mild, mostly-brightness grain
(`synthetic_image`): pure noise would make the JPEGs several times larger than real
photos and their decoding unrealistically slow, smooth gradients alone unrealistically
small. The mean encoded size is printed for comparison with ImageNet's (about 110 KB
per training file); the defaults give about 90 KB.

Every recipe goes through the real `pipeline.train_dataset` / `pipeline.eval_dataset`,
so the timing covers what a training run pays on the host: record shuffling, JPEG
decoding (only the crop window for the inception crop), augmentation, normalisation,
batching, mixup/cutmix and the conversion of each batch to numpy. Recipes:

  cnn    inception crop 224 (bilinear) + flip
  deit   inception crop (bicubic) + flip + RandAugment(2, 9, std 0.5, increasing),
         random erasing 0.25, mixup 0.8 / cutmix 1.0 (smoothing 0.1), repeated
         augmentation x3
  mixer  inception crop (ratio 0.67 to 1.5, bilinear or bicubic at random) + flip +
         RandAugment(3, 6, std 1.0, increasing), mixup 0.5 / cutmix 1.0 (smoothing 0.1)
  eval   resize (bilinear) + centre crop 224, crop ratio 0.875 (ResNet's)

Each recipe's settings are read from its config (configs/resnet18_noah.py,
vit_noah.py, mixer_noah.py) through `Preprocess.from_config`, as training does (the
model family's mean, std and evaluation resize filled in by
`input_preprocessing.resolve`).

Timing: `--warmup` batches are drawn first (tracing, autotuning, filling the prefetch
buffers), then the time to draw `--batches` more is measured. Train datasets repeat
the N records endlessly; the eval dataset is built over the records repeated to
(warmup + batches) * batch_size examples.

Cores: without --threads, the CPUs this process may run on (its affinity mask, else
os.cpu_count()); TensorFlow is left to size its own thread pools over them. With
--threads N, each dataset gets a private tf.data threadpool of N threads and intra-op
parallelism 1 (every op runs in the thread that calls it), and the per-core number
divides by N. Throughput is only meaningful on an otherwise idle machine: other
processes competing for the same cores lower it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

# TensorFlow only feeds the host pipeline here: keep it off any accelerator.
tf.config.set_visible_devices([], "GPU")

# Runnable as a plain script from the repository root (or anywhere).
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from noah_jax.data import pipeline  # noqa: E402
from noah_jax.models import input_preprocessing  # noqa: E402

NUM_CLASSES = 1000
IMAGE_SIZE = 224
BASE_SHAPES = ((375, 500), (500, 375), (400, 400))  # (height, width)

# The recipes: the augmentation of the project's own ImageNet configs, so the numbers
# follow any change to them (config module, what the recipe runs).
RECIPE_CONFIGS = {"cnn": "resnet18_noah", "deit": "vit_noah", "mixer": "mixer_noah",
                  "eval": "resnet18_noah"}
RECIPES = tuple(RECIPE_CONFIGS)


def preprocess_for(recipe: str) -> pipeline.Preprocess:
    """`pipeline.Preprocess` of the recipe's config, exactly as `noah_jax.train.trainer` builds it."""
    config = importlib.import_module(f"configs.{RECIPE_CONFIGS[recipe]}").get_config()
    config = input_preprocessing.resolve(config)  # the model family's mean, std, eval resize
    return pipeline.Preprocess.from_config(config.dataset, config.augment,
                                           config.label_smoothing)


DESCRIPTIONS = {
    "cnn": "CNN train (inception crop + flip)",
    "deit": "DeiT train (RandAug 2/9, erase, mixup/cutmix, repeats 3)",
    "mixer": "Mixer train (RandAug 3/6, mixup/cutmix)",
    "eval": "eval (centre crop 224, ratio 0.875)",
}


# ----------------------------------------------------------------------------------
# Synthetic JPEGs.
# ----------------------------------------------------------------------------------
def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 [height, width, 3].

    Structure at every scale: the sum of random colour grids of 2x2, 4x4, ..., 256x256
    cells, each upsampled bilinearly to the image, with equal weights. On top, grain
    that is mostly in brightness (sigma 12) and a little in colour (sigma 4), as in a
    photo, where JPEG's chroma subsampling then has little to discard.
    """
    texture = np.zeros((height, width, 3), np.float32)
    for octave in range(1, 9):
        cells = 2 ** octave
        grid = rng.uniform(-1.0, 1.0, size=(1, cells, cells, 3)).astype(np.float32)
        texture += tf.image.resize(grid, (height, width), method="bilinear")[0].numpy()
    image = 128.0 + 165.0 * texture / 8
    image += rng.normal(0.0, 12.0, size=(height, width, 1))   # luma grain
    image += rng.normal(0.0, 4.0, size=(height, width, 3))    # chroma grain
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def synthetic_jpegs(num_images: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    """`num_images` JPEG files (quality 90) at ImageNet-like sizes, and random labels."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(num_images):
        base_h, base_w = BASE_SHAPES[rng.integers(len(BASE_SHAPES))]
        scale = rng.uniform(0.8, 1.2)
        image = synthetic_image(rng, round(base_h * scale), round(base_w * scale))
        encoded.append(tf.io.encode_jpeg(image, quality=90).numpy())
    labels = rng.integers(0, NUM_CLASSES, size=num_images).astype(np.int64)
    return encoded, labels


def parse(record: dict) -> tuple[tf.Tensor, tf.Tensor]:
    """Record -> (encoded image, label), the `pipeline.Parse` contract."""
    return record["image"], tf.cast(record["label"], tf.int32)


# ----------------------------------------------------------------------------------
# Benchmark.
# ----------------------------------------------------------------------------------
def build_dataset(recipe: str, records: tf.data.Dataset, num_records: int, *,
                  batch_size: int, total_batches: int, threads: Optional[int]
                  ) -> tf.data.Dataset:
    """The dataset a training or evaluation run would build for `recipe`."""
    p = preprocess_for(recipe)
    if recipe == "eval":
        n = total_batches * batch_size
        ds = pipeline.eval_dataset(records.repeat(), n, parse, p, num_batches=total_batches,
                                   local_batch_size=batch_size, label_shape=(),
                                   label_dtype=tf.int32)
    else:
        ds = pipeline.train_dataset([(records, num_records)], parse, p, seed=0, process_index=0,
                                    start_step=0, local_batch_size=batch_size,
                                    num_classes=NUM_CLASSES, shuffle_buffer=num_records)
    if threads is not None:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
        ds = ds.with_options(options)
    return ds


_PREPARED: dict = {}  # what the builder below writes: "encoded", "labels"


@functools.cache
def _builder_class():
    import tensorflow_datasets as tfds

    class InputPipelineImages(tfds.core.GeneratorBasedBuilder):
        """The synthetic JPEGs of this benchmark as a TFDS dataset."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (image, label) in enumerate(zip(_PREPARED["encoded"], _PREPARED["labels"])):
                yield i, {"image": image, "label": int(label)}

    return InputPipelineImages


def prepare_files(encoded: list[bytes], labels: np.ndarray, root: str, file_format: str
                  ) -> str:
    """The JPEGs written by the TFDS writer in `file_format` under `root`; the data_dir."""
    import tensorflow_datasets as tfds
    _PREPARED.update(encoded=encoded, labels=labels)
    data_dir = os.path.join(root, file_format)
    _builder_class()
    tfds.builder("input_pipeline_images", data_dir=data_dir, file_format=file_format
                 ).download_and_prepare(download_config=tfds.download.DownloadConfig(
                     compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return data_dir


def file_batches(recipe: str, data_dir: str, num_records: int, batch_size: int):
    """The training batches of `recipe`'s config read from the prepared files, through
    the source the trainer builds (`noah_jax.data.get_source`): TFRecord files by
    tf.data in sequence, ArrayRecord files by record index."""
    from noah_jax.data import get_source
    config = importlib.import_module(f"configs.{RECIPE_CONFIGS[recipe]}").get_config()
    config.dataset.name = "input_pipeline_images"
    config.dataset.data_dir = data_dir
    config.dataset.num_classes = NUM_CLASSES
    config.dataset.image_size = IMAGE_SIZE
    config.dataset.shuffle_buffer = num_records
    config.dataset.eval_split = "train"  # the only split; only training is read here
    config = input_preprocessing.resolve(config)
    source = get_source(config.dataset, seed=0, augment=config.augment,
                        label_smoothing=config.label_smoothing)
    return source.train_batches(start_step=0, local_batch_size=batch_size, process_index=0,
                                process_count=1)


def measure(ds, *, warmup: int, batches: int, batch_size: int) -> float:
    """Images/s while drawing `batches` numpy batches after `warmup` untimed ones; `ds`:
    a tf.data dataset or an iterator of numpy batches."""
    iterator = pipeline.as_numpy(ds) if isinstance(ds, tf.data.Dataset) else iter(ds)
    for _ in range(warmup):
        batch = next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    assert batch["image"].shape == (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), batch["image"].shape
    return batches * batch_size / elapsed


def available_cores() -> int:
    """The CPUs this process (and so TensorFlow) may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def markdown_table(results: dict[tuple[str, str], float], cores: int) -> str:
    """Rows: recipes; columns: images/s (and per core) of each way of reading."""
    reads = list(dict.fromkeys(read for read, _ in results))
    recipes = list(dict.fromkeys(recipe for _, recipe in results))
    head = " | ".join(f"{READS[r]} images/s (/core)" for r in reads)
    lines = [f"| pipeline | {head} |", "|---|" + "---:|" * len(reads)]
    for recipe in recipes:
        cells = [f"{results[r, recipe]:.1f} ({results[r, recipe] / cores:.1f})"
                 if (r, recipe) in results else "-" for r in reads]
        lines.append(f"| {DESCRIPTIONS[recipe]} | {' | '.join(cells)} |")
    return "\n".join(lines)


READS = {"memory": "in memory", "tfrecord": "TFRecord files", "array_record": "ArrayRecord files"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Throughput of the ImageNet input pipelines on synthetic JPEGs.")
    parser.add_argument("--num_images", type=int, default=512,
                        help="distinct JPEG files synthesized (records repeat as needed)")
    parser.add_argument("--batch_size", type=int, default=64, help="examples per batch")
    parser.add_argument("--batches", type=int, default=50,
                        help="timed batches per recipe")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed batches drawn first per recipe")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated subset of {','.join(RECIPES)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="cap tf.data at a private threadpool of this many threads "
                             "(and intra-op parallelism 1); per-core figures then divide "
                             "by it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument("--reads", default=",".join(READS),
                        help="memory (records handed to pipeline.train_dataset from memory), "
                             "tfrecord and array_record (the JPEGs prepared as a TFDS dataset "
                             "in that format, read by the trainer's own source; train "
                             "recipes only); comma-separated, default: %(default)s")
    args = parser.parse_args(argv)

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    if args.num_images < 1 or args.batch_size < 2 or args.batches < 1 or args.warmup < 0:
        parser.error("need --num_images >= 1, --batch_size >= 2, --batches >= 1, "
                     "--warmup >= 0")
    if args.batch_size % 2 and any(preprocess_for(r).mixes for r in recipes):
        parser.error("mixup/cutmix recipes need an even --batch_size")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    reads = [r.strip() for r in args.reads.split(",") if r.strip()]
    if not reads or set(reads) - set(READS):
        parser.error(f"--reads: choose from {list(READS)}")
    if args.threads is not None and reads != ["memory"]:
        parser.error("--threads caps the in-memory pipelines only: add --reads=memory")

    machine_cores = available_cores()
    cores = args.threads if args.threads is not None else machine_cores

    start = time.perf_counter()
    encoded, labels = synthetic_jpegs(args.num_images, args.seed)
    mean_kb = np.mean([len(e) for e in encoded]) / 1024
    print(f"synthesized {args.num_images} JPEGs (quality 90) in "
          f"{time.perf_counter() - start:.1f}s, mean size {mean_kb:.1f} KB")
    records = tf.data.Dataset.from_tensor_slices(
        {"image": tf.constant(encoded, tf.string), "label": tf.constant(labels)})

    results = {}
    root = tempfile.mkdtemp(prefix="input_pipeline_")
    try:
        for read in reads:
            if read != "memory":
                began = time.perf_counter()
                data_dir = prepare_files(encoded, labels, root, read)
                print(f"prepared them as {read} files in {time.perf_counter() - began:.1f}s")
            for recipe in recipes:
                if read == "memory":
                    ds = build_dataset(recipe, records, args.num_images,
                                       batch_size=args.batch_size,
                                       total_batches=args.warmup + args.batches,
                                       threads=args.threads)
                elif recipe == "eval":
                    continue
                else:
                    ds = file_batches(recipe, data_dir, args.num_images, args.batch_size)
                rate = measure(ds, warmup=args.warmup, batches=args.batches,
                               batch_size=args.batch_size)
                results[read, recipe] = rate
                print(f"{read:12s} {recipe:6s} {rate:8.1f} images/s  {rate / cores:7.1f} "
                      f"images/s/core  ({DESCRIPTIONS[recipe]})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    per_core = (f"{cores} tf.data threads (--threads)" if args.threads is not None
                else f"{cores} cores")
    print()
    print(f"machine: {machine_cores} usable CPU cores ({platform.machine()}), "
          f"TensorFlow {tf.__version__}; per-core = images/s / {per_core}; "
          f"batch {args.batch_size}, {args.batches} timed batches after {args.warmup} warm-up")
    print()
    print(markdown_table(results, cores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
