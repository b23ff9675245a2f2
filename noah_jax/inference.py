"""A trained or converted model, ready to predict: `load(CHECKPOINT) -> Loaded`.

    loaded = inference.load("runs/demo")                # newest checkpoint, EMA if kept
    paths = inference.image_files(["photos/", "cat.jpg"])
    images = loaded.preprocess(paths)                    # float32 [n, S, S, 3]
    logits = loaded.model.apply(loaded.variables, images, train=False)
    probabilities = loaded.scores(logits)                # softmax, or sigmoid (multi-label)
    # The NOAH head's attention maps a [B, N, K, L], sown while applying:
    logits, state = loaded.model.apply(loaded.variables, images, train=False,
                                       mutable=["intermediates"])

CHECKPOINT is one of
  a training workdir      its newest checkpoint under checkpoints/, and the run's
                          config.json (the preprocessing below);
  a checkpoints/ folder   the same, with config.json from the folder above when there;
  a converted checkpoint  `python -m noah_jax.convert --output DIR`: no config; the
                          reference's evaluation preprocessing of the model's family, as
                          its meta records it (e.g. Mixer/gMLP: mean = std = 0.5, shorter
                          side bicubic to S / 0.9, centre crop S), at the model's image
                          size (224, a ViT/Mixer's img_size, or `image_size`).
The model is rebuilt from the checkpoint's meta (name, head, class count, overrides),
its variables restored and checked key by key; with `ema=True` (the default) a run
that kept an EMA of its parameters (ema_decay > 0) is loaded with those, as its
`eval_ema` scores were computed.

Preprocessing is exactly the evaluation's of the run (its config.json, or, without
one, what the checkpoint's meta records: image_size, eval_crop, eval_crop_ratio,
eval_interpolation, mean, std; `Loaded.preprocessing`):
  tf.data datasets (TFDS, folder, synthetic)  the evaluation pipeline itself,
      `noah_jax.data.pipeline.eval_dataset` (`eval_image` on every file) with
      `Preprocess.from_config(config.dataset, config.augment)`: decode, centre crop
      or squash (bilinear or bicubic), normalise with the model family's mean and std,
      bit for bit as evaluation did.
  checkpoints written before the meta recorded these  a run's config.json without
      mean/std/eval_interpolation means ImageNet's and bilinear, what every run
      trained with then; a converted checkpoint (no config.json) holds the reference's
      weights, so it gets its family's values (`input_preprocessing.reference_eval`);
      a run's checkpoints without their config.json, the base config's (ImageNet's,
      bilinear, crop ratio 0.875).
  digits (the demo)  every image becomes one of the demo's own examples: 8x8 pixels of
      17 grey levels, then `DigitsSource.images_from_levels` (bilinear to S x S, the
      training split's mean and std). An image file is decoded (any colour: made grey
      with ITU-R 601 luma weights), shrunk to 8x8 by area averaging (any size and
      aspect; an 8x8 file is taken as it is) and its pixel values p (0..255) quantised
      to the level round(16 p / 255). So an embedded digit written as a PNG of
      round(255 * level / 16) comes back exactly, and a photo of a digit gets what the
      model knows. The digits are light strokes on a dark background (level 0); dark
      ink on white paper needs inverting first.
  digits_multilabel (the multi-label demo)  every image becomes a canvas: made grey
      the same way, squashed to S x S (area averaging where it shrinks, bilinear where
      it grows; an S x S file is taken as it is), p / 255 on [0, 1], then
      `DigitsMultilabelSource.images_from_grey` (the training canvases' mean and std).
      A canvas written as a PNG of round(255 * grey) comes back to within half a grey
      level. As in training, digits should be light on dark, each about S/4 to 3S/8
      of the picture's side.

Mistakes raise `UserError`s whose message is one line: no checkpoint at the path (and
what is expected), a checkpoint of a model this code does not know, one without its
head, an image that is missing, unreadable, undecodable or over the pixel limit (by
name). Variables that do not fit the model are counted by kind, three keys of each
named (the error's `problems` list every key, a line each).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from noah_jax.train import checkpoint
from noah_jax.data import catalog
from noah_jax.data.preprocess import EVAL_RECORD_FIELDS, Preprocess
from noah_jax.errors import (CheckpointError, CheckpointNotFoundError, ConfigError,
                             ImageFileError, UserError)
from noah_jax.models import create_model, input_preprocessing

# The ImageNet models' size; converted checkpoints record the model's own.
DEFAULT_IMAGE_SIZE = input_preprocessing.REFERENCE_IMAGE_SIZE
MULTILABEL_LOSSES = ("sigmoid_xent", "asl")
# ITU-R BT.601 luma, what Pillow's convert('L') uses; a grey pixel keeps its value.
_LUMA = np.array([0.299, 0.587, 0.114])
_DIGIT_LEVELS = 16  # load_digits' grey levels are 0..16


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A model ready for prediction (see the module docstring).

    model: the flax module; call it with `train=False`. variables: {'params',
    'batch_stats'}, the EMA parameters when `ema` is True. meta: the checkpoint's
    meta. class_names: label k is class_names[k]. config: the run's training config
    (ConfigDict) from config.json, or None. image_size: S, the side of the model's input.
    multilabel: scores are per-class sigmoids (COCO/VOC, sigmoid or asymmetric loss),
    else a softmax. checkpoint, step: what was read. transform: paths -> images, what
    `preprocess` applies. preprocessing: the `Preprocess` it applies (the evaluation's
    mean, std, resize and crop), or None for the demo datasets, which have their own.
    """

    model: Any
    variables: dict
    meta: dict
    class_names: list[str]
    config: Optional[ml_collections.ConfigDict]
    image_size: int
    multilabel: bool
    ema: bool
    checkpoint: str
    step: int
    transform: Callable[[Sequence[str]], np.ndarray] = dataclasses.field(repr=False)
    preprocessing: Optional[Preprocess] = None

    def preprocess(self, paths: Sequence[str]) -> np.ndarray:
        """Image files -> float32 [n, S, S, 3], the evaluation preprocessing of the run.
        Raises ImageFileError naming the first file that cannot be read or decoded."""
        return self.transform(list(paths))

    def scores(self, logits) -> np.ndarray:
        """float32 [n, K]: class probabilities (softmax), or per-class sigmoid scores for
        a multi-label model."""
        logits = jnp.asarray(logits, jnp.float32)
        scores = jax.nn.sigmoid(logits) if self.multilabel else jax.nn.softmax(logits, -1)
        return np.asarray(scores)


# ----------------------------------------------------------------------------------
# Finding images.
# ----------------------------------------------------------------------------------
def image_files(paths: Sequence[str]) -> list[str]:
    """The image files that IMAGES_OR_FOLDERS arguments name, in order: a file as given
    (whatever its extension: decoding decides), a folder's images as folder datasets
    find them (noah_jax/data/folder.py: .jpg .jpeg .png .gif .bmp in any case, anywhere
    below, hidden files and folders skipped), sorted by path. Each file once.

    Raises ImageFileError for a path that does not exist or a folder without images.
    """
    import tensorflow as tf  # noqa: F401 (tf.io.gfile: also gs:// paths, as datasets)
    from noah_jax.data import folder

    found: dict[str, None] = {}  # insertion-ordered set
    for path in paths:
        if tf.io.gfile.isdir(path):
            images = sorted(folder.image_files(path))
            if not images:
                raise ImageFileError(f"folder {path} holds no images (files ending in "
                                     f"{', '.join(folder.IMAGE_EXTENSIONS)}, in any case)")
            found.update(dict.fromkeys(images))
        elif tf.io.gfile.exists(path):
            found[path] = None
        else:
            raise ImageFileError(f"{path}: no such file or folder")
    return list(found)


# ----------------------------------------------------------------------------------
# Preprocessing.
# ----------------------------------------------------------------------------------
def _read(path: str) -> bytes:
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except (OSError, tf.errors.OpError) as e:
        reason = getattr(e, "strerror", None) or getattr(e, "message", None) or str(e)
        raise ImageFileError(f"cannot read image {path}: {reason}") from None


def _not_decodable(path: str) -> ImageFileError:
    return ImageFileError(f"{path} cannot be decoded as an image (JPEG, PNG, GIF or BMP; "
                          "the file may be damaged or of another kind)")


_JPEG_WITHOUT_LENGTH = {0x00, 0x01, *range(0xD0, 0xD8)}  # a stuffed 0, TEM, RST0-7


def _jpeg_ends_before_its_scan(encoded: bytes) -> bool:
    """Whether a JPEG's bytes end inside its markers, before its first scan (a file
    cut short in its header). libjpeg reads those markers first, and on such a file
    it prints 'Improper call to JPEG library in state 201' on stderr, past any
    TensorFlow log level; the file is refused before TensorFlow sees it. Bytes
    between markers are skipped, as libjpeg does."""
    at = 2  # after the start-of-image marker
    while True:
        while at < len(encoded) and encoded[at] != 0xFF:
            at += 1
        while at < len(encoded) and encoded[at] == 0xFF:  # fill bytes
            at += 1
        if at >= len(encoded):
            return True
        marker, at = encoded[at], at + 1
        if marker in _JPEG_WITHOUT_LENGTH:
            continue
        if marker == 0xD9:  # end of image, before any scan
            return True
        if at + 2 > len(encoded):
            return True
        end = at + int.from_bytes(encoded[at:at + 2], "big")
        if marker == 0xDA:  # start of scan: its header must be there
            return end > len(encoded)
        at = end


@functools.cache  # one tf.function per limit, however many models are loaded
def _checked_bytes(max_pixels: int) -> Callable[[str], bytes]:
    """path -> its bytes, once its header shows at most `max_pixels` pixels (0 = no
    limit), as evaluation judges them: a small file can declare gigabytes of pixels, so
    one over the limit is refused without being decoded."""
    import tensorflow as tf

    from noah_jax.data import pipeline

    within_limit = tf.function(lambda encoded: pipeline.within_pixel_limit(encoded, max_pixels),
                               input_signature=[tf.TensorSpec([], tf.string)])

    def read(path: str) -> bytes:
        encoded = _read(path)
        if encoded[:3] == b"\xff\xd8\xff" and _jpeg_ends_before_its_scan(encoded):
            raise _not_decodable(path)
        try:
            within = bool(within_limit(tf.constant(encoded)))
        except tf.errors.OpError:  # a JPEG whose header is cut short or damaged
            raise _not_decodable(path) from None
        if not within:
            raise ImageFileError(f"{path} has more than {max_pixels:,} pixels "
                                 "(dataset.max_image_pixels); it is not decoded")
        return encoded

    return read


@functools.cache
def _decoder() -> Callable[[str, bytes], np.ndarray]:
    """(path, bytes) -> uint8 [H, W, 3] as `pipeline.decode` gives it, or an
    ImageFileError naming the file."""
    import tensorflow as tf

    from noah_jax.data import pipeline

    decode = tf.function(pipeline.decode, input_signature=[tf.TensorSpec([], tf.string)])

    def apply(path: str, encoded: bytes) -> np.ndarray:
        try:
            return decode(tf.constant(encoded)).numpy()
        except tf.errors.OpError:
            raise _not_decodable(path) from None

    return apply


def eval_transform(p: Preprocess) -> Callable[[Sequence[str]], np.ndarray]:
    """paths -> float32 [n, S, S, 3] by `pipeline.eval_dataset` with `p`: the very
    tf.data pipeline evaluation runs (the same ops in a tf.function can differ from it
    in the last bit, as TensorFlow's graph optimiser rewrites them). A file that fails
    is named: each is read and its header checked first, and if decoding fails, the
    files are decoded one by one to find it."""
    import tensorflow as tf

    from noah_jax.data import pipeline

    read, decode = _checked_bytes(p.max_image_pixels), _decoder()

    def parse(encoded):
        return encoded, tf.constant(0, tf.int32)  # no label

    def transform(paths: Sequence[str]) -> np.ndarray:
        if not paths:
            return np.zeros((0, p.image_size, p.image_size, 3), np.float32)
        encoded = [read(path) for path in paths]
        records = tf.data.Dataset.from_tensor_slices(tf.constant(encoded, tf.string))
        ds = pipeline.eval_dataset(records, len(encoded), parse, p, num_batches=1,
                                   local_batch_size=len(encoded), label_shape=(),
                                   label_dtype=tf.int32)
        try:
            (batch,) = ds.as_numpy_iterator()
        except tf.errors.OpError:
            for path, data in zip(paths, encoded):
                decode(path, data)  # raises for the file that does not decode
            raise
        return batch["image"]

    return transform


def digit_levels(rgb: np.ndarray) -> np.ndarray:
    """An image uint8 [H, W, 3] -> the demo's 8x8 grey levels 0..16 (float64): luma,
    area-averaged to 8x8, quantised to round(16 p / 255)."""
    from noah_jax.data import digits

    grey = np.asarray(rgb, np.float64) @ _LUMA
    rows = digits.area_resize_matrix(grey.shape[0], 8)
    cols = digits.area_resize_matrix(grey.shape[1], 8)
    small = rows @ grey @ cols.T
    return np.clip(np.round(small * _DIGIT_LEVELS / 255.0), 0, _DIGIT_LEVELS)


def digits_transform(image_size: int) -> Callable[[Sequence[str]], np.ndarray]:
    """paths -> float32 [n, S, S, 3] as the digits demo's examples (module docstring)."""
    from noah_jax.data.digits import DigitsSource
    from noah_jax.data.preprocess import MAX_IMAGE_PIXELS

    # The transform of the source itself: its mean and std come from its training split.
    source = DigitsSource(seed=0, image_size=image_size, augment=False)
    read, decode = _checked_bytes(MAX_IMAGE_PIXELS), _decoder()

    def transform(paths: Sequence[str]) -> np.ndarray:
        levels = np.zeros((len(paths), 8, 8))
        for i, path in enumerate(paths):
            levels[i] = digit_levels(decode(path, read(path)))
        return source.images_from_levels(levels)

    return transform


def canvas_grey(rgb: np.ndarray, image_size: int) -> np.ndarray:
    """An image uint8 [H, W, 3] -> a grey S x S canvas on [0, 1] (float64): luma, each
    axis area-averaged when it shrinks and bilinearly resized when it grows."""
    from noah_jax.data import digits

    def resize(in_size: int) -> np.ndarray:
        return (digits.area_resize_matrix(in_size, image_size) if in_size >= image_size
                else digits.linear_resize_matrix(in_size, image_size))

    grey = np.asarray(rgb, np.float64) @ _LUMA / 255.0
    return resize(grey.shape[0]) @ grey @ resize(grey.shape[1]).T


def digits_multilabel_transform(image_size: int) -> Callable[[Sequence[str]], np.ndarray]:
    """paths -> float32 [n, S, S, 3] as the multi-label demo's canvases (module docstring)."""
    from noah_jax.data.digits_multilabel import DigitsMultilabelSource
    from noah_jax.data.preprocess import MAX_IMAGE_PIXELS

    source = DigitsMultilabelSource(seed=0, image_size=image_size, augment=False)
    read, decode = _checked_bytes(MAX_IMAGE_PIXELS), _decoder()

    def transform(paths: Sequence[str]) -> np.ndarray:
        grey = np.zeros((len(paths), image_size, image_size))
        for i, path in enumerate(paths):
            grey[i] = canvas_grey(decode(path, read(path)), image_size)
        return source.images_from_grey(grey)

    return transform


# ----------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------
_EXPECTED = ("expected a training workdir (with checkpoints/ inside), its checkpoints/ "
             "folder, or a converted checkpoint (the --output of python -m noah_jax.convert)")


def find_checkpoint(path: str | os.PathLike) -> tuple[str, int, Optional[str]]:
    """(checkpoint directory, its newest step, the run's config.json or None) for a
    workdir, a checkpoints/ folder or a converted checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file or folder; {_EXPECTED}")
    for directory in (os.path.join(path, "checkpoints"), path):
        step = checkpoint.latest_step(directory)
        if step is not None:
            run = os.path.dirname(os.path.abspath(directory))
            config = os.path.join(run, "config.json")
            found_config = config if (os.path.basename(directory.rstrip("/")) == "checkpoints"
                                      and os.path.isfile(config)) else None
            return os.path.abspath(directory), step, found_config
    raise CheckpointNotFoundError(f"no checkpoint in {path}: {_EXPECTED}")


def _read_config(path: str) -> ml_collections.ConfigDict:
    try:
        with open(path, encoding="utf-8") as f:
            return ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the run's config {path}: {e}") from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _as_override(value):
    return tuple(value) if isinstance(value, list) else value  # JSON gives lists


def _class_names(meta: dict, num_classes: int) -> list[str]:
    """The meta's names; for checkpoints written before they were recorded, ImageNet's
    (1000 classes, ImageNet or unknown dataset), the digits', else class_0, class_1, ..."""
    names = meta.get("class_names")
    if names is not None:
        if len(names) != num_classes:
            raise CheckpointError(f"the checkpoint's meta lists {len(names)} class names for "
                                  f"{num_classes} classes")
        return [str(name) for name in names]
    dataset = meta.get("dataset", "imagenet2012")
    if num_classes == 1000 and dataset.split(":")[0] == "imagenet2012":
        return catalog.imagenet_class_names()
    if dataset == "digits":
        return [str(digit) for digit in range(num_classes)]
    return [f"class_{k}" for k in range(num_classes)]


def _is_multilabel(meta: dict, config: Optional[ml_collections.ConfigDict]) -> bool:
    if "multilabel" in meta:
        return bool(meta["multilabel"])
    loss = meta.get("loss") or (config.get("loss") if config is not None else None)
    dataset = meta.get("dataset") or ""
    spec = catalog.DATASETS.get(dataset) or catalog.DATASETS.get(dataset.split("/")[0])
    return loss in MULTILABEL_LOSSES or bool(spec and spec.multilabel)


def eval_preprocess(meta: dict, config: Optional[ml_collections.ConfigDict], model,
                    image_size: int) -> Preprocess:
    """The evaluation preprocessing of a checkpoint (module docstring): its run's
    config.json; else what its meta records; else, written before the meta recorded
    it, the reference's for a converted checkpoint (its meta names a `source`) and the
    base config's for a run's."""
    if config is not None:
        try:
            # A config.json with the family's fields left None (not resolved by training:
            # written by hand) means the family's, as training would have resolved them.
            config = input_preprocessing.resolve(config)
            return Preprocess.from_config(config.dataset, config.augment)
        except (AttributeError, KeyError) as e:
            raise CheckpointError(f"the run's config.json lacks a preprocessing field: "
                                  f"{_first_line(e)}") from None
    if all(name in meta for name in EVAL_RECORD_FIELDS):
        return Preprocess.from_eval_record(meta, image_size=image_size)
    if "source" in meta:  # converted: the reference's weights
        return input_preprocessing.reference_eval(model, image_size)
    return Preprocess(image_size=image_size)


def dataset_transform(dataset: Optional[str], p: Optional[Preprocess], image_size: int
                      ) -> tuple[Callable[[Sequence[str]], np.ndarray], Optional[Preprocess]]:
    """(paths -> images, the Preprocess it applies or None): the demo datasets' own
    transforms, else the evaluation pipeline with `p`."""
    if dataset == "digits":
        return digits_transform(image_size), None
    if dataset == "digits_multilabel":
        return digits_multilabel_transform(image_size), None
    return eval_transform(p), p


def _preprocessing(meta: dict, config: Optional[ml_collections.ConfigDict], model,
                   image_size: int) -> tuple[Callable[[Sequence[str]], np.ndarray],
                                             Optional[Preprocess]]:
    dataset = config.dataset.name if config is not None else meta.get("dataset")
    p = (None if dataset in ("digits", "digits_multilabel")
         else eval_preprocess(meta, config, model, image_size))
    return dataset_transform(dataset, p, image_size)


def load(checkpoint_path: str | os.PathLike, *, ema: bool = True,
         image_size: Optional[int] = None) -> Loaded:
    """The newest checkpoint at `checkpoint_path` as a `Loaded` (module docstring).

    An export folder (`python -m noah_jax.export`, with its StableHLO modules) is
    loaded by `noah_jax.export.load`: the model is the exported forward, the
    preprocessing the evaluation's its manifest records, and `ema` is as exported.

    ema: load the run's EMA parameters when it kept them (False: the raw ones).
    image_size: the input side for a checkpoint without a config (a converted CNN takes
    any; ViT/Mixer/gMLP models only their own); a workdir's is its config's.
    """
    from noah_jax import export

    if export.is_export(os.fspath(checkpoint_path)):
        if image_size is not None:
            raise ConfigError(f"{checkpoint_path} is an export: its image size is the one it "
                              "was exported at (export again with --image-size for another)")
        return export.load(os.fspath(checkpoint_path))
    directory, step, config_path = find_checkpoint(checkpoint_path)
    config = _read_config(config_path) if config_path else None
    try:
        meta = checkpoint.read_meta(directory, step=step)
    except Exception as e:  # noqa: BLE001 (any reader error: the files are damaged)
        raise CheckpointError(f"cannot read the meta of checkpoint {directory} step {step}: "
                              f"{_first_line(e)}") from None
    where = f"checkpoint {directory} (step {step})"
    if "model" not in meta or "num_classes" not in meta:
        raise CheckpointError(f"{where} does not say which model it holds (its meta has no "
                              "'model' or 'num_classes'); was it written by this project?")
    if meta.get("dropped_head"):
        raise CheckpointError(f"{where} holds a backbone without its head (converted with "
                              "--drop-head): it cannot classify until it is fine-tuned")

    overrides = meta.get("overrides")
    if overrides is None and config is not None:
        overrides = {k: v for k, v in config.model.overrides.to_dict().items() if v is not None}
    overrides = {k: _as_override(v) for k, v in (overrides or {}).items()}
    num_classes = int(meta["num_classes"])
    try:
        model = create_model(meta["model"], num_classes=num_classes,
                             head=meta.get("head", "noah"), **overrides)
    except ConfigError as e:
        raise CheckpointError(f"{where} is of a model this code cannot build: {e}") from None

    fixed_size = getattr(model, "img_size", None)  # ViT, Mixer, gMLP: tokens fix the size
    trained_size = (config.dataset.image_size if config is not None
                    else meta.get("image_size") or fixed_size or DEFAULT_IMAGE_SIZE)
    if image_size is not None and image_size != trained_size and (
            config is not None or fixed_size is not None):
        why = "the run's config" if config is not None else f"the model ({meta['model']})"
        raise ConfigError(f"{where} takes {trained_size} px images ({why} says so); "
                          f"image size {image_size} does not fit it")
    size = image_size or trained_size

    target = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, size, size, 3)), train=False))
    target = {"params": target["params"], "batch_stats": target.get("batch_stats", {})}
    try:
        variables, _ = checkpoint.restore_model(directory, target, step=step,
                                                adapt=model.adapt_checkpoint)
        ema_params = (checkpoint.restore_ema_params(directory, target["params"], step=step)
                      if ema else None)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read {where}: {_first_line(e)}") from None
    if ema_params is not None:
        variables = dict(variables, params=ema_params)

    transform, preprocessing = _preprocessing(meta, config, model, size)
    return Loaded(model=model, variables=variables, meta=dict(meta),
                  class_names=_class_names(meta, num_classes), config=config,
                  image_size=size, multilabel=_is_multilabel(meta, config),
                  ema=ema_params is not None, checkpoint=directory, step=step,
                  transform=transform, preprocessing=preprocessing)
