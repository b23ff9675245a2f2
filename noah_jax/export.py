"""Export a trained or converted model for serving: StableHLO, a TF SavedModel, ONNX.

    python -m noah_jax.export CHECKPOINT --out DIR [--format stablehlo,savedmodel,onnx]
        [--no-ema] [--image-size S] [--platforms cpu,cuda,tpu]

CHECKPOINT is what `noah_jax.predict` takes: a training workdir, its checkpoints/ folder
or a converted checkpoint, loaded by `noah_jax.inference.load` (the EMA parameters of a
run that kept them, unless --no-ema), in float32. DIR, a new folder, gets

  noah_export.json   the manifest (`MANIFEST`): model, head, class count and names, input
                     side S, single- or multi-label, the evaluation preprocessing the
                     model was scored with, how uint8 pixels become its input, the
                     checkpoint and step, and each format's files.
  stablehlo/         `jax.export` modules, serialised; the batch is symbolic (any b):
      logits.jaxexport         (variables, float32 [b, S, S, 3] preprocessed images) ->
                               float32 [b, K] logits
      probabilities.jaxexport  (variables, uint8 [b, S, S, 3] RGB images) -> float32
                               [b, K] softmax probabilities, or per-class sigmoid scores
                               for a multi-label model; the pixels' normalisation inside
      variables.msgpack        the variables both take ({'params', 'batch_stats'};
                               `flax.serialization.msgpack_restore` reads it)
  savedmodel/1/      a TF SavedModel (1 is the version folder TF Serving reads) running
                     the same modules by TensorFlow's XlaCallModule op, as jax2tf does
                     (`TF_STABLEHLO_VERSION` says why not through jax2tf), the weights
                     as its variables, with two signatures:
                     serving_default  images: uint8 [b, S, S, 3] -> probabilities, logits
                     logits           images: float32 [b, S, S, 3] -> logits
  model.onnx         ONNX (jax2onnx), the weights inside: images float32 [b, S, S, 3]
                     (channels last) -> logits.

Every format is checked before it is written: its logits on a batch of random images
against the Flax model's, the largest difference relative to the largest logit recorded
in the manifest (`checked`); more than `TOLERANCE` stops the export.

The uint8 entry (probabilities, serving_default) takes images the client has already
brought to S x S: it normalises the pixels as evaluation did (p / 255, minus the mean,
over the std: the family's, e.g. ImageNet's; the demo datasets: grey by ITU-R 601 luma,
their training split's mean and std) but does not resize or crop them. The manifest's
`preprocessing` says how evaluation resized and cropped (e.g. the shorter side to
S / 0.875, bilinear, then the centre S x S); a client that resizes in uint8 rounds where
evaluation resized in float, which moves the logits slightly. The float entries take
exactly what `inference.Loaded.preprocess` gives, so `noah_jax.predict` on an export
directory (it reads the manifest and the StableHLO modules) scores as on the checkpoint.

StableHLO and the SavedModel are lowered for each of --platforms; what the model leaves
to the backend then computes each platform's fast way (`for_platform`: a MobileNet's or
ShuffleNet's depthwise convolutions as shifted multiply-adds on CPU, grouped
convolutions elsewhere; the NOAH head's blocks by its CPU path or the einsum one). ONNX
has no platforms and gets the accelerators' way.

ONNX comes from jax2onnx, which converts every family here (ResNet, MobileNetV2/V3,
ShuffleNetV2, DeiT/ViT, PVT, Mixer, gMLP, either head). It is installed without its
declared dependencies (README, "Export for serving"): it pins an older orbax-checkpoint
than this project's and pulls in libraries only its other plugins use. Two of its
0.17 faults are worked around: it cannot convert a nested `jax.jit` under JAX 0.12
(MobileNetV3's hard-swish is one), so it traces with jit disabled; and it replaces
nn.max_pool with a version that takes no explicit padding, so the stems pool with
`layers.max_pool_3x3_s2` (a -inf pad, then 'VALID').

Mistakes end in one line and exit status 1 (2 for the command line): no checkpoint, an
--out folder that already holds something, a format or platform this does not know,
jax2onnx missing for --format onnx; Ctrl-C, one line and status 130. Nothing is left
half-written: the export is built in a hidden folder beside DIR and renamed to DIR when
every format is written and checked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from noah_jax import cli

PROG = "python -m noah_jax.export"
FORMATS = ("stablehlo", "savedmodel", "onnx")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
MANIFEST = cli.EXPORT_MANIFEST
FORMAT_VERSION = 1
STABLEHLO_FILES = {"logits": "stablehlo/logits.jaxexport",
                   "probabilities": "stablehlo/probabilities.jaxexport",
                   "variables": "stablehlo/variables.msgpack"}
SAVEDMODEL_DIR = "savedmodel/1"
ONNX_FILE = "model.onnx"
# The largest |export - Flax| allowed at export time, relative to the largest |logit|.
TOLERANCE = 1e-4
ONNX_INSTALL = "pip install --no-deps jax2onnx==0.17.1"  # as README.md sets up
# ITU-R BT.601 luma, as inference makes the demo's images grey.
LUMA = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------------
# What the exported functions compute.
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Pixels:
    """How uint8 pixels p [..., 3] become the model's input: x = p / 255, made grey
    (luma, copied to 3 channels) when `colour` is 'luma', then (x - mean) / std."""

    colour: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def normalise(self, pixels):
        import jax.numpy as jnp

        x = pixels.astype(jnp.float32) / 255.0
        if self.colour == "luma":
            grey = x @ jnp.asarray(LUMA, jnp.float32)
            x = jnp.broadcast_to(grey[..., None], x.shape)
        return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

    def record(self) -> dict:
        return {"colour": self.colour, "mean": list(self.mean), "std": list(self.std)}


def pixels_of(loaded) -> Pixels:
    """The uint8 normalisation of an `inference.Loaded`: its evaluation's mean and std on
    RGB, or for the demo datasets grey with their training split's."""
    if loaded.preprocessing is not None:
        p = loaded.preprocessing
        return Pixels("rgb", tuple(map(float, p.mean)), tuple(map(float, p.std)))
    dataset = loaded.meta.get("dataset") or (loaded.config.dataset.name if loaded.config
                                            else None)
    if dataset == "digits":
        from noah_jax.data.digits import DigitsSource as Source
    else:
        from noah_jax.data.digits_multilabel import DigitsMultilabelSource as Source
    source = Source(seed=0, image_size=loaded.image_size, augment=False)
    return Pixels("luma", (source.mean,) * 3, (source.std,) * 3)


def for_platform(model, cpu: bool):
    """`model` with the settings it leaves to the backend ('auto') fixed for CPU (`cpu`)
    or for the accelerators: a MobileNet's or ShuffleNet's depthwise convolutions
    (shifted multiply-adds, or grouped convolutions; `layers.DepthwiseConv`) and the NOAH
    head's blocks (`heads.NOAHHead.implementation`: 'cpu' or 'readable'). Each changes
    how the model computes, never what."""
    changes = {}
    if getattr(model, "depthwise", None) == "auto":
        changes["depthwise"] = "shifted" if cpu else "grouped"
    settings = dict(model.head_settings)
    if model.head_config().get("implementation") == "auto":
        settings["implementation"] = "cpu" if cpu else "readable"
        changes["head_settings"] = tuple(sorted(settings.items()))
    return model.clone(**changes) if changes else model


def forward(model, platforms: Sequence[str]) -> Callable:
    """(variables, float32 images) -> logits, the eval forward, computed each platform's
    way (`for_platform`), chosen when the module is compiled for one of `platforms`
    (`jax.lax.platform_dependent`); 'onnx' means the accelerators' way."""
    import jax

    def apply(m):
        return lambda variables, images: m.apply(variables, images, train=False)

    on_cpu, elsewhere = apply(for_platform(model, True)), apply(for_platform(model, False))
    if set(platforms) == {"cpu"}:
        return on_cpu
    if "cpu" not in platforms:
        return elsewhere
    return lambda variables, images: jax.lax.platform_dependent(
        variables, images, cpu=on_cpu, default=elsewhere)


def scores(logits, multilabel: bool):
    import jax
    import jax.numpy as jnp

    logits = logits.astype(jnp.float32)
    return jax.nn.sigmoid(logits) if multilabel else jax.nn.softmax(logits, axis=-1)


# ----------------------------------------------------------------------------------
# Writing the formats.
# ----------------------------------------------------------------------------------
class ExportError(Exception):
    """An export that cannot be made; the message is one line."""


def _plain(tree):
    """Variables as nested dicts of numpy arrays (no FrozenDicts): the tree the
    exported modules are traced with and `msgpack_restore` gives back."""
    if hasattr(tree, "items"):
        return {str(k): _plain(v) for k, v in tree.items()}
    return np.asarray(tree)


def _relative_error(got, want) -> float:
    want = np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max()), 1e-30)
    return float(np.abs(np.asarray(got, np.float64) - want).max()) / scale


def _check(name: str, got, want) -> float:
    error = _relative_error(got, want)
    if not error <= TOLERANCE:
        raise ExportError(f"the {name} export differs from the model by {error:.3g} of "
                          f"its largest output (more than {TOLERANCE:g}); nothing was "
                          "written")
    return error


def _examples(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [3, S, S, 3], float32 [2, S, S, 3]) random images to check exports with;
    the batch sizes differ from each other so that a module fixed to one would fail."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    images = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    return pixels, images


def export_stablehlo(loaded, pixels: Pixels, out: str, platforms: Sequence[str],
                     variables: dict, check: bool = True) -> dict:
    """Writes the StableHLO modules and the variables under `out`; returns the checked
    relative errors."""
    import jax
    import jax.numpy as jnp
    from flax import serialization

    size, logits_fn = loaded.image_size, forward(loaded.model, platforms)

    def probabilities_fn(variables, images):
        return scores(logits_fn(variables, pixels.normalise(images)), loaded.multilabel)

    modules = {
        "logits": _exported(logits_fn, _input_specs(variables, size, jnp.float32), platforms),
        "probabilities": _exported(probabilities_fn, _input_specs(variables, size, jnp.uint8),
                                   platforms)}
    os.makedirs(os.path.join(out, "stablehlo"))
    for name, module in modules.items():
        with open(os.path.join(out, STABLEHLO_FILES[name]), "wb") as f:
            f.write(module.serialize())
    with open(os.path.join(out, STABLEHLO_FILES["variables"]), "wb") as f:
        f.write(serialization.msgpack_serialize(variables))

    u8, images = _examples(size)
    reference = _reference(loaded, variables)
    checked = {"logits": None, "probabilities": None}
    if check and jax.default_backend() in platforms:  # a module runs on its platforms only
        read = {name: jax.export.deserialize(bytearray(module.serialize()))
                for name, module in modules.items()}  # as a reader gets them
        checked["logits"] = _check("StableHLO", read["logits"].call(variables, images),
                                   reference(images))
        want = scores(jnp.asarray(reference(pixels.normalise(jnp.asarray(u8)))),
                      loaded.multilabel)
        checked["probabilities"] = _check("StableHLO (uint8)", read["probabilities"].call(
            variables, u8), want)
    return checked


def _reference(loaded, variables) -> Callable:
    import jax

    apply = jax.jit(lambda v, x: loaded.model.apply(v, x, train=False))
    return lambda images: np.asarray(apply(variables, images))


# The StableHLO version the SavedModel's modules are written in. JAX writes a version
# of about a month before its own (1.18 for JAX 0.12), which TensorFlow's XlaCallModule
# op cannot read when TensorFlow is older than that (2.21 reads up to 1.13): a jax2tf
# SavedModel made with this project's pins fails to load ("unregistered operation
# 'vhlo.custom_call_v2'"). StableHLO writes any older version a module's ops exist in,
# so the SavedModel's modules are written as 1.0 (2024), older than any TensorFlow whose
# XlaCallModule runs JAX 0.12's calling convention (10, since May 2025: TensorFlow 2.20);
# otherwise this is what jax2tf.convert does. Those TensorFlows
# also cannot fit a batch size to a `stablehlo.composite` op's decomposition (JAX
# writes exact GELU's erf as one), so each is replaced by a call of its decomposition,
# as StableHLO's stablehlo-legalize-composite-to-call pass (not in jaxlib) does.
TF_STABLEHLO_VERSION = "1.0.0"


def _exported(fn: Callable, args: Sequence, platforms: Sequence[str]):
    import jax

    return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args)


def _input_specs(variables: dict, size: int, dtype):
    import jax

    (b,) = jax.export.symbolic_shape("b")
    return (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables),
            jax.ShapeDtypeStruct((b, size, size, 3), dtype))


def _for_tensorflow(module) -> bytes:
    """The StableHLO of a `jax.export.Exported`, its composite ops replaced by calls of
    their decompositions, written as `TF_STABLEHLO_VERSION`."""
    # jax.export's own MLIR bindings and StableHLO writer (no public name).
    from jax._src.interpreters import mlir
    from jax._src.lib import _jax
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import func

    with mlir.make_ir_context():
        parsed = ir.Module.parse(module.mlir_module())
        composites = []

        def visit(op):
            if op.operation.name == "stablehlo.composite":
                composites.append(op.operation)
            return ir.WalkResult.ADVANCE

        parsed.operation.walk(visit)
        for op in composites:
            callee = ir.FlatSymbolRefAttr(op.attributes["decomposition"]).value
            with ir.InsertionPoint(op), op.location:
                call = func.CallOp([r.type for r in op.results],
                                   ir.FlatSymbolRefAttr.get(callee), list(op.operands))
            for result, replacement in zip(op.results, call.results):
                result.replace_all_uses_with(replacement)
            op.erase()
        return _jax.mlir.serialize_portable_artifact(str(parsed), TF_STABLEHLO_VERSION, False)


def _tf_call(module) -> Callable:
    """A `jax.export.Exported` as a TF function of its flat arguments (tf tensors or
    variables), run by TensorFlow's XlaCallModule op, its StableHLO written as
    `TF_STABLEHLO_VERSION`."""
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla as tfxla

    if module.calling_convention_version > tfxla.call_module_maximum_supported_version():
        raise ExportError(f"this TensorFlow's XlaCallModule op runs modules up to calling "
                          f"convention {tfxla.call_module_maximum_supported_version()}, "
                          f"JAX wrote {module.calling_convention_version}: install the "
                          "TensorFlow of requirements.txt")
    serialized = _for_tensorflow(module)
    kept = sorted(module.module_kept_var_idx)
    shapes = [tuple(d if isinstance(d, int) else None for d in aval.shape)
              for aval in module.out_avals]
    types = [tf.as_dtype(aval.dtype) for aval in module.out_avals]

    def call(*flat):
        return tfxla.call_module([flat[i] for i in kept], version=module.calling_convention_version,
                                 module=serialized, Tout=types, Sout=shapes,
                                 platforms=[p.upper() for p in module.platforms],
                                 disabled_checks=(), use_shardy_partitioner=False)
    return call


def export_savedmodel(loaded, pixels: Pixels, out: str, platforms: Sequence[str],
                      variables: dict, check: bool = True) -> dict:
    """Writes the SavedModel under `out`; returns the checked relative errors."""
    import jax
    import jax.numpy as jnp
    import tensorflow as tf

    size, logits_fn = loaded.image_size, forward(loaded.model, platforms)

    def serving_fn(variables, images):
        logits = logits_fn(variables, pixels.normalise(images))
        return scores(logits, loaded.multilabel), logits

    logits_tf = _tf_call(_exported(logits_fn, _input_specs(variables, size, jnp.float32),
                                   platforms))
    serving_tf = _tf_call(_exported(serving_fn, _input_specs(variables, size, jnp.uint8),
                                    platforms))
    module = tf.Module()
    # The weights as variables, in the order the modules take them (jax's flattening).
    module.weights = [tf.Variable(a, trainable=False) for a in jax.tree.leaves(variables)]

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.uint8, name="images")])
    def serving_default(images):
        probabilities, logits = serving_tf(*module.weights, images)
        return {"probabilities": probabilities, "logits": logits}

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
    def logits(images):
        (result,) = logits_tf(*module.weights, images)
        return {"logits": result}

    module.serving_default, module.logits = serving_default, logits
    path = os.path.join(out, SAVEDMODEL_DIR)
    tf.saved_model.save(module, path, signatures={"serving_default": serving_default,
                                                  "logits": logits})

    checked = {"logits": None, "serving_default": None}
    if check and _tf_platform() in platforms:
        saved = tf.saved_model.load(path)
        u8, images = _examples(size)
        reference = _reference(loaded, variables)
        checked["logits"] = _check("SavedModel", saved.signatures["logits"](
            images=tf.constant(images))["logits"].numpy(), reference(images))
        got = saved.signatures["serving_default"](images=tf.constant(u8))
        checked["serving_default"] = _check(
            "SavedModel (uint8)", got["logits"].numpy(),
            reference(pixels.normalise(jnp.asarray(u8))))
        want = scores(jnp.asarray(got["logits"].numpy()), loaded.multilabel)
        _check("SavedModel (probabilities)", got["probabilities"].numpy(), want)
    return checked


def _tf_platform() -> str:
    import tensorflow as tf

    return "cuda" if tf.config.list_logical_devices("GPU") else "cpu"


def onnx_converter():
    """jax2onnx's `to_onnx`, quiet about its plugins for other libraries (Equinox, its
    examples) that fail to load without the dependencies it is installed without; an
    ExportError saying how to install it where it is not."""
    logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
    logging.getLogger("jax2onnx").setLevel(logging.ERROR)
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # types of shape constants
    try:
        import jax2onnx
        import onnxruntime  # noqa: F401 (the export is checked with it)
    except ImportError as e:
        raise ExportError(f"--format onnx needs jax2onnx and onnxruntime ({e.name} is not "
                          f"installed): {ONNX_INSTALL} (README, 'Export for serving')") from None
    return jax2onnx.to_onnx


def export_onnx(loaded, out: str, variables: dict, check: bool = True) -> dict:
    """Writes model.onnx under `out`; returns the checked relative errors."""
    import jax
    import onnxruntime

    to_onnx = onnx_converter()
    size = loaded.image_size
    logits_fn = forward(loaded.model, ("onnx",))  # grouped depthwise convolutions
    # jax2onnx 0.17 cannot convert a nested jit under JAX 0.12 (its jit plugin uses a
    # removed jax._src.core name): tracing with jit disabled inlines them.
    weights = jax.tree.map(jax.numpy.asarray, variables)  # jax2onnx wants jax arrays
    with jax.disable_jit():
        proto = to_onnx(lambda images: logits_fn(weights, images), [("b", size, size, 3)],
                        model_name=loaded.meta.get("model", "noah"), return_mode="proto",
                        input_names=["images"], output_names=["logits"])
    path = os.path.join(out, ONNX_FILE)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    if not check:
        return {"logits": None}
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    _, images = _examples(size)
    reference = _reference(loaded, variables)
    worst = max(_check("ONNX", session.run(["logits"], {"images": batch})[0], reference(batch))
                for batch in (images, images[:1]))
    return {"logits": worst}


# ----------------------------------------------------------------------------------
# The manifest, and the whole export.
# ----------------------------------------------------------------------------------
def manifest(loaded, pixels: Pixels, formats: dict, platforms: Sequence[str],
             checked: dict) -> dict:
    import jax

    meta = loaded.meta
    dataset = meta.get("dataset") or (loaded.config.dataset.name if loaded.config else None)
    preprocessing = None
    if loaded.preprocessing is not None:
        p = loaded.preprocessing
        preprocessing = {**p.eval_record(), "max_image_pixels": p.max_image_pixels}
    return {
        "format_version": FORMAT_VERSION,
        "written_by": PROG,
        "model": meta["model"], "head": meta.get("head", "noah"),
        "num_classes": len(loaded.class_names), "class_names": list(loaded.class_names),
        "overrides": meta.get("overrides") or {},
        "image_size": loaded.image_size, "multilabel": bool(loaded.multilabel),
        "dataset": dataset, "preprocessing": preprocessing, "pixels": pixels.record(),
        "checkpoint": loaded.checkpoint, "step": int(loaded.step), "ema": bool(loaded.ema),
        "platforms": list(platforms), "jax": jax.__version__,
        "formats": formats, "checked": checked,
    }


def _new_folder_error(out: str) -> Optional[str]:
    why = cli.output_folder_error(out, "--out")
    if why:
        return why
    if os.path.isdir(out) and os.listdir(out):
        kind = "an export" if os.path.exists(os.path.join(out, MANIFEST)) else "files"
        return f"--out {out} already holds {kind}: give a new folder (or an empty one)"
    return None


def write_export(loaded, out: str, formats: Sequence[str],
                 platforms: Sequence[str] = DEFAULT_PLATFORMS, check: bool = True) -> dict:
    """Exports `loaded` (an `inference.Loaded` of a checkpoint) in `formats` to the new
    folder `out`; returns the manifest written there. Built in a hidden folder beside
    `out`, renamed to `out` once every format is written and (with `check`, on this
    machine's platform) checked against the model."""
    why = _new_folder_error(out)
    if why:
        raise ExportError(why)
    if "onnx" in formats:
        onnx_converter()  # missing: said before any work
    pixels = pixels_of(loaded)
    variables = _plain(loaded.variables)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.partial-",
                            dir=parent)
    try:
        files, checked = {}, {}
        if "stablehlo" in formats:
            checked["stablehlo"] = export_stablehlo(loaded, pixels, work, platforms, variables,
                                                    check)
            files["stablehlo"] = dict(STABLEHLO_FILES)
        if "savedmodel" in formats:
            checked["savedmodel"] = export_savedmodel(loaded, pixels, work, platforms,
                                                      variables, check)
            files["savedmodel"] = {"path": SAVEDMODEL_DIR,
                                   "signatures": ["serving_default", "logits"]}
        if "onnx" in formats:
            checked["onnx"] = export_onnx(loaded, work, variables, check)
            files["onnx"] = {"path": ONNX_FILE, "input": "images", "output": "logits"}
        record = manifest(loaded, pixels, files, platforms, checked)
        with open(os.path.join(work, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(work, 0o777 & ~umask)  # mkdtemp's folder is the owner's only (0700)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return record


# ----------------------------------------------------------------------------------
# Reading an export back (`noah_jax.inference.load` of an export folder).
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """The StableHLO logits module of an export, standing in for the flax module of an
    `inference.Loaded`: `apply(variables, images, train=False)` -> logits."""

    module: Any  # jax.export.Exported
    path: str

    def apply(self, variables, images, *, train: bool = False, **kwargs):
        from noah_jax.errors import UserError

        if train or kwargs:
            raise UserError(f"{self.path} is an export: it computes the evaluation logits "
                            "only (no training, attention maps or other intermediates: "
                            "load the checkpoint it was exported from for those)")
        return self.module.call(variables, images)


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict:
    """The manifest of the export folder `path`, checked; CheckpointError (one line)
    for a missing, unreadable or foreign one."""
    from noah_jax.errors import CheckpointError

    file = os.path.join(path, MANIFEST)
    try:
        with open(file, encoding="utf-8") as f:
            record = json.load(f)
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from None
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); export again with "
                              f"{PROG}") from None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        version = record.get("format_version") if isinstance(record, dict) else None
        raise CheckpointError(f"{file} is not an export manifest of format version "
                              f"{FORMAT_VERSION} (it has {version!r}); export again with "
                              f"{PROG}")
    needed = ("model", "num_classes", "class_names", "image_size", "multilabel", "pixels",
              "formats")
    missing = [key for key in needed if key not in record]
    if missing:
        raise CheckpointError(f"{file} lacks {', '.join(missing)}; export again with {PROG}")
    if len(record["class_names"]) != record["num_classes"]:
        raise CheckpointError(f"{file} lists {len(record['class_names'])} class names for "
                              f"{record['num_classes']} classes")
    return record


def _read_file(path: str, what: str) -> bytes:
    from noah_jax.errors import CheckpointError

    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}; export again "
                              f"with {PROG}") from None


def _tree_mismatch(module, variables) -> Optional[str]:
    """Why `variables` do not fit the module's first argument (keys missing, unexpected
    or of another shape: counted, three of each named), or None."""
    import jax

    def by_name(tree):
        leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
        return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
                for path, leaf in leaves}

    (args, _), = [jax.tree_util.tree_unflatten(module.in_tree, module.in_avals)]
    wanted, have = by_name(args[0]), by_name(variables)
    problems = []
    for kind, keys in (("missing", sorted(set(wanted) - set(have))),
                       ("unexpected", sorted(set(have) - set(wanted)))):
        if keys:
            problems.append(f"{len(keys)} {kind} ({', '.join(keys[:3])})")
    shapes = sorted(k for k in set(wanted) & set(have)
                    if tuple(np.shape(have[k])) != tuple(wanted[k].shape))
    if shapes:
        problems.append(f"{len(shapes)} of another shape ({', '.join(shapes[:3])})")
    return "; ".join(problems) or None


def load(path: str):
    """The StableHLO export in folder `path` as an `inference.Loaded`: its `model` is an
    `ExportedModel`, its variables the export's, its preprocessing the evaluation's
    the manifest records. CheckpointError (one line) for an export that is malformed,
    incomplete or does not fit together."""
    import jax
    from flax import serialization

    from noah_jax import inference
    from noah_jax.data.preprocess import Preprocess
    from noah_jax.errors import CheckpointError

    record = read_manifest(path)
    where = f"export {path}"
    files = record["formats"].get("stablehlo")
    if not files:
        held = ", ".join(record["formats"]) or "none"
        raise CheckpointError(f"{where} holds no StableHLO modules (its formats: {held}); "
                              f"export with --format stablehlo to predict with it")
    try:
        module = jax.export.deserialize(bytearray(_read_file(
            os.path.join(path, files["logits"]), "the StableHLO module")))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (any reader error: the file is damaged)
        raise CheckpointError(f"{path}/{files['logits']} is not a serialised jax.export "
                              f"module ({inference._first_line(e)}); export again with "
                              f"{PROG}") from None
    try:
        variables = serialization.msgpack_restore(_read_file(
            os.path.join(path, files["variables"]), "the variables"))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}/{files['variables']} is not a msgpack file of "
                              f"variables ({inference._first_line(e)})") from None
    mismatch = _tree_mismatch(module, variables)
    if mismatch:
        raise CheckpointError(f"the variables of {where} do not fit its module: {mismatch}")
    size, classes = record["image_size"], record["num_classes"]
    images, logits = module.in_avals[-1], module.out_avals[0]
    if tuple(images.shape[1:]) != (size, size, 3) or logits.shape[-1] != classes:
        raise CheckpointError(f"the module of {where} takes {images.str_short()} and gives "
                              f"{logits.str_short()}, but its manifest says {size} px images "
                              f"and {classes} classes: the files come from different exports")
    dataset = record.get("dataset")
    p = (Preprocess.from_eval_record(record["preprocessing"],
                                     max_image_pixels=record["preprocessing"].get(
                                         "max_image_pixels"))
         if record.get("preprocessing") else None)
    transform, preprocessing = inference.dataset_transform(dataset, p, size)
    return inference.Loaded(
        model=ExportedModel(module, path), variables=variables, meta=record,
        class_names=[str(c) for c in record["class_names"]], config=None, image_size=size,
        multilabel=bool(record["multilabel"]), ema=bool(record.get("ema")),
        checkpoint=os.path.abspath(path), step=int(record.get("step", 0)),
        transform=transform, preprocessing=preprocessing)


# ----------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------
def _choices(known: Sequence[str], what: str):
    """An argparse type: comma-separated names of `known`, each once."""
    import argparse

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; choose from "
                f"{', '.join(known)} (comma-separated)")
        return names
    return parse


def parser():
    p = cli.ArgumentParser(prog=PROG, description="Export a trained or converted NOAH model "
                           "for serving: StableHLO, a TF SavedModel, ONNX.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a training workdir, its checkpoints/ folder, or a converted checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the export")
    p.add_argument("--format", type=_choices(FORMATS, "format"), default=FORMATS,
                   help=f"formats to write (default {','.join(FORMATS)})")
    p.add_argument("--platforms", type=_choices(PLATFORMS, "platform"),
                   default=DEFAULT_PLATFORMS,
                   help="platforms the StableHLO modules and the SavedModel run on "
                        f"(default {','.join(DEFAULT_PLATFORMS)})")
    p.add_argument("--no-ema", action="store_true",
                   help="export the raw parameters of a run that kept an EMA of them")
    p.add_argument("--image-size", type=cli.int_at_least(1), default=None,
                   help="input size for a converted checkpoint of a CNN (default 224)")
    return p


def _refuse(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.exit(1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    mistake = (cli.checkpoint_path_error(args.checkpoint) or _new_folder_error(args.out))
    if mistake:
        _refuse(mistake)
    try:
        return _export(args)
    except KeyboardInterrupt:  # the hidden folder is removed on the way out
        sys.stderr.write(f"{PROG}: interrupted; {args.out} was not written\n")
        return 130


def _export(args) -> int:
    from noah_jax.predict import quiet_tensorflow

    quiet_tensorflow()  # TensorFlow's start-up notices, before it is imported
    from noah_jax import inference
    from noah_jax.errors import UserError
    from noah_jax.train import run_log

    run_log.quiet_library_notices()
    start = time.time()
    try:
        if "onnx" in args.format:
            onnx_converter()
        loaded = inference.load(args.checkpoint, ema=not args.no_ema,
                                image_size=args.image_size)
        record = write_export(loaded, args.out, args.format, args.platforms)
    except (UserError, ExportError) as e:
        _refuse(cli.one_line(str(e)))
    checks = []
    for name, errors in record["checked"].items():
        measured = [v for v in errors.values() if v is not None]
        checks.append(f"{name} {max(measured):.1e}" if measured else f"{name} (not run here)")
    print(f"{args.checkpoint} (step {record['step']}{', EMA' if record['ema'] else ''}) -> "
          f"{args.out}: {record['model']} head={record['head']}, {record['num_classes']} "
          f"classes, {record['image_size']} px, {', '.join(record['formats'])} for "
          f"{','.join(record['platforms'])}; largest difference from the model, relative to "
          f"its largest logit: {'; '.join(checks)} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
