"""Orbax checkpoints of models and training runs, one format for both.

A checkpoint directory is an Orbax `CheckpointManager` directory of numbered steps.
Every step holds up to three items:

  'model'  {'params': ..., 'batch_stats': ...}   the model's variables: what
           evaluation and `config.init_from` read, and all a converted checkpoint has
  'train'  {'step', 'opt_state', 'ema_params'}    the rest of a run's state (trainer only)
  'meta'   JSON: model name, head, num_classes, overrides, ...  (describes 'model')

Loading checks the structure against the model it goes into; what does not fit is
refused with a CheckpointMismatchError whose `problems` list every missing key,
unexpected key and shape mismatch by name (nothing is skipped silently), and whose
message, one line for the console, names the model the checkpoint holds, what to do,
and counts the differences with three keys of each kind. A model family's loading
quirks (its `adapt_checkpoint`, e.g. DeiT's position embeddings of another image size)
are the family's; loading runs the hook it is given (`adapt`) and knows no family.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from noah_jax import errors
from noah_jax.errors import (CheckpointError, CheckpointMismatchError,  # noqa: F401
                             CheckpointNotFoundError, CheckpointWriteError)


# A model family's loading quirks (`Classifier.adapt_checkpoint`): (stored variables,
# target) -> variables that fit the target.
Adapt = Callable[[Mapping[str, Any], Any], Mapping[str, Any]]


def manager(directory: str | os.PathLike, *, max_to_keep: Optional[int] = None,
            async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` with this project's items."""
    # cleanup_tmp_directories: a save cut short (kill -9, a full disk) leaves a
    # '<step>.orbax-checkpoint-tmp' folder; a writing manager deletes such leftovers.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, read_only=read_only,
                                           enable_async_checkpointing=async_save,
                                           create=not read_only,
                                           cleanup_tmp_directories=not read_only,
                                           save_interval_steps=0 if read_only else 1)
    handlers = {"model": ocp.PyTreeCheckpointHandler(), "train": ocp.PyTreeCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_handlers=handlers)


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    """'/'-joined key path -> shape of every array in a tree: variables, a train state
    with optax's tuples and named tuples, or Orbax's metadata of either (which stores
    tuples as lists), so that all of them compare key by key."""
    def part(key) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(part(k) for k in path): tuple(np.shape(leaf)) for path, leaf in leaves}


def tree_mismatches(expected: Any, found: Any) -> list[str]:
    """Differences between two variable trees, one line each, by '/'-joined key."""
    return [line for listed in _differences(expected, found).values() for _, line in listed]


def _differences(expected: Any, found: Any) -> dict[str, list[tuple[str, str]]]:
    """The differences of two trees by kind ('missing' in `found`, 'unexpected' there,
    of another 'shape'), each as (its short form for a message, its line)."""
    want, have = _leaf_shapes(expected), _leaf_shapes(found)
    return {
        "missing": [(k, f"missing in checkpoint: {k} {want[k]}")
                    for k in sorted(want.keys() - have.keys())],
        "unexpected": [(k, f"unexpected in checkpoint: {k} {have[k]}")
                       for k in sorted(have.keys() - want.keys())],
        "shape": [(f"{k}: model {want[k]}, checkpoint {have[k]}",
                   f"shape mismatch: {k}: model {want[k]}, checkpoint {have[k]}")
                  for k in sorted(want.keys() & have.keys()) if want[k] != have[k]],
    }


def _mismatch_error(what: str, *differences: Mapping[str, list[tuple[str, str]]],
                    advice: str = "", examples: int = 3) -> Optional[CheckpointMismatchError]:
    """The error for `differences` (of `_differences`, concatenated by kind), or None
    when there are none: '<what>: <advice>; 36 keys missing (e.g. a; b; c), 1 of another
    shape (...)', with every difference in its `problems`."""
    by_kind = {kind: [item for d in differences for item in d.get(kind, ())]
               for kind in ("missing", "unexpected", "shape")}
    counts = errors.count_differences(
        {kind: [short for short, _ in listed] for kind, listed in by_kind.items()}, examples)
    if not counts:
        return None
    return CheckpointMismatchError(
        f"{what}: {advice + '; ' if advice else ''}{counts}",
        [line for listed in by_kind.values() for _, line in listed])


def model_settings(name: str, head: Optional[str] = None, num_classes: Optional[int] = None,
                   overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """A model as a checkpoint's 'meta' names it: what `held_model` compares."""
    return {"model": name, "head": head, "num_classes": num_classes,
            "overrides": dict(overrides or {})}


def held_model(meta: Mapping[str, Any], run: Optional[Mapping[str, Any]] = None,
               most: int = 6) -> str:
    """The model a checkpoint's meta says it holds, in a few words, or '' where it does
    not say: 'deit_tiny_patch16_224 head=noah num_classes=10 depth=1 embed_dim=96 ...'.
    With `run` (this run's `model_settings`) and the same model name, only its head and
    the settings that differ: 'deit_tiny_patch16_224 head=noah depth=1; this run:
    depth=2', which is what a reader has to change."""
    if not meta.get("model"):
        return ""

    def settings(m) -> dict:
        out = {k: m[k] for k in ("head", "num_classes") if m.get(k) is not None}
        return {**out, **dict(sorted((m.get("overrides") or {}).items()))}

    def words(items) -> str:
        items = list(items)
        shown = " ".join(f"{k}={v}" for k, v in items[:most])
        return shown + (" ..." if len(items) > most else "")

    held = settings(meta)
    if run is None or run.get("model") != meta["model"]:
        return f"{meta['model']} {words(held.items())}".rstrip()
    mine = settings(run)
    differ = [k for k in {**held, **mine} if held.get(k) != mine.get(k)]
    text = meta["model"] + (f" head={held['head']}" if "head" in held and "head" not in differ
                            else "")
    if differ:
        text += (f" {words((k, held.get(k, 'unset')) for k in differ)}; this run: "
                 f"{words((k, mine.get(k, 'unset')) for k in differ)}")
    return text


def save_model(directory: str | os.PathLike, variables: Mapping[str, Any],
               meta: Mapping[str, Any], step: int = 0) -> None:
    """Writes a model-only checkpoint (what `convert` produces) and waits for it."""
    variables = {"params": variables["params"],
                 "batch_stats": variables.get("batch_stats", {})}
    with manager(directory, async_save=False) as mngr, _write_errors_reported(mngr):
        mngr.save(step, args=ocp.args.Composite(model=ocp.args.PyTreeSave(variables),
                                                meta=ocp.args.JsonSave(dict(meta))))
        mngr.wait_until_finished()


def latest_step(directory: str | os.PathLike) -> Optional[int]:
    """The newest step in a checkpoint directory, or None if there is none. A run that
    is writing there deletes its oldest step after each save (max_to_keep), which can
    happen between Orbax listing the steps and reading their timestamps: the listing
    is then taken again."""
    for _ in range(4):
        if not os.path.isdir(directory):
            return None
        try:
            with manager(directory, read_only=True) as mngr:
                return mngr.latest_step()
        except FileNotFoundError:
            continue
    with manager(directory, read_only=True) as mngr:  # a last time, its error let through
        return mngr.latest_step()


def read_meta(directory: str | os.PathLike, *, step: int) -> dict:
    """The 'meta' item of a checkpoint step: what it holds (model, head, num_classes,
    overrides, class_names, ...), read without touching the arrays."""
    with manager(directory, read_only=True) as mngr:
        return dict(mngr.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)


def _place(value: np.ndarray, like: Any) -> jax.Array:
    """A host array as a (possibly multi-host) global array shaped and sharded like `like`."""
    sharding = getattr(like, "sharding", None)
    value = np.asarray(value, like.dtype)
    if sharding is None:
        return jax.numpy.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def restore_model(directory: str | os.PathLike, target: Optional[Any] = None, *,
                  step: Optional[int] = None, drop_head: bool = False,
                  adapt: Optional[Adapt] = None):
    """Restores the 'model' item (and 'meta') of a checkpoint.

    target: the model's variables, or their `jax.eval_shape` (optionally carrying
      shardings, which the restored arrays then get). The checkpoint must match it
      exactly, else a CheckpointMismatchError lists every difference. Without a
      target, arrays come back as stored.
    drop_head: restore everything but the 'head' and keep the target's head
      (fine-tuning on another label set); the target then needs concrete head values.
    adapt: the model family's loading quirks, `model.adapt_checkpoint`
      (`Classifier.adapt_checkpoint`): it makes the stored variables fit the target
      where the family knows how (DeiT's and PVT's position embeddings of another
      image size); what it leaves unfit is a mismatch. Checked on shapes first.

    Returns (variables, meta).
    """
    step = _step_to_restore(directory, step)
    with manager(directory, read_only=True) as mngr:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if target is None:  # as stored, as host numpy arrays, whatever wrote it
            return _restore_as_stored(mngr, step), meta
        target = _model_target(target)
        wanted = _without_head(target) if drop_head else target
        adapted = _check_model_fits(mngr, directory, step, meta, wanted, drop_head=drop_head,
                                    adapt=adapt)
        if adapted:
            # Everything as stored (host numpy), adapted, then placed like the target.
            raw = adapt(_nonempty(_restore_as_stored(mngr, step)), wanted)
            restored = jax.tree.map(_place, {col: {k: raw[col][k] for k in tree}
                                             for col, tree in wanted.items()}, wanted)
        else:
            restored = mngr.restore(step, args=ocp.args.Composite(
                model=_restore_into(wanted, partial=drop_head))).model
    restored = {col: dict(tree) for col, tree in restored.items()}
    if drop_head:
        for col, tree in target.items():
            if "head" in tree:
                restored[col]["head"] = tree["head"]
    return restored, meta


def _restore_as_stored(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The 'model' item of `step` as host numpy arrays, whatever wrote it."""
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            dict(mngr.item_metadata(step)["model"]))
    return dict(mngr.restore(step, args=ocp.args.Composite(
        model=ocp.args.PyTreeRestore(restore_args=as_numpy))).model)


def _nonempty(variables: Mapping[str, Any]) -> dict:
    # A model without BatchNorm stores an empty 'batch_stats'; the hooks see none.
    return {col: dict(tree) for col, tree in variables.items() if tree}


def check_model_fits(directory: str | os.PathLike, target: Any, *, drop_head: bool = False,
                     adapt: Optional[Adapt] = None, run: Optional[Mapping[str, Any]] = None
                     ) -> None:
    """Raises what `restore_model(directory, target, ...)` would refuse with (no
    checkpoint there, or variables that do not fit `target`), reading only metadata:
    the trainer checks `config.init_from` so before it writes anything, and its
    message says what to change there. `run`: the run's `model_settings`, to name
    only the settings in which the checkpoint's model differs."""
    step = _step_to_restore(directory, None)
    with manager(directory, read_only=True) as mngr:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        target = _model_target(target)
        advice = ("give config.init_from.path a checkpoint of this run's model, or set "
                  "config.model to the checkpoint's")
        _check_model_fits(mngr, directory, step, meta,
                          _without_head(target) if drop_head else target,
                          drop_head=drop_head, adapt=adapt, run=run, advice=advice)


def _step_to_restore(directory: str | os.PathLike, step: Optional[int]) -> int:
    step = latest_step(directory) if step is None else step
    if step is None:
        inside = os.path.join(directory, "checkpoints")
        if latest_step(inside) is not None:  # a training workdir: its checkpoints are inside
            raise CheckpointNotFoundError(
                f"no checkpoint in {directory}, which looks like a training workdir: use its "
                f"checkpoint directory, {inside}")
        raise CheckpointNotFoundError(
            f"no checkpoint in {directory}: expected an Orbax checkpoint directory written "
            "by training (<workdir>/checkpoints) or by `python -m noah_jax.convert`")
    return step


def _model_target(target: Mapping[str, Any]) -> dict:
    # Models without BatchNorm have no 'batch_stats' in eval_shape(init); the
    # checkpoint stores an empty one.
    return {col: target.get(col, {}) for col in ("params", "batch_stats")}


def _check_model_fits(mngr: ocp.CheckpointManager, directory, step: int, meta, wanted, *,
                      drop_head: bool, adapt: Optional[Adapt] = None,
                      run: Optional[Mapping[str, Any]] = None, advice: str = "") -> bool:
    """Raises CheckpointMismatchError unless the stored 'model' item, after `adapt`
    (run on its shapes), fits `wanted`; returns whether `adapt` changes it."""
    stored = _nonempty(mngr.item_metadata(step)["model"])
    adapted = False
    if adapt is not None:
        stored, adapted = _adapted_shapes(adapt, stored, wanted)
    differences = _differences(wanted, _without_head(stored) if drop_head else stored)
    if advice and not drop_head and all(key.split("/")[1:2] == ["head"] for listed in
                                        differences.values() for key, _ in listed):
        advice += (", or keep all but its head (config.init_from.drop_head=True) to train a "
                   "new one")
    held = held_model(meta, run)
    error = _mismatch_error(f"checkpoint {directory} (step {step}{': ' + held if held else ''}) "
                            "does not fit the model", differences, advice=advice)
    if error:
        raise error
    return adapted


def _adapted_shapes(adapt: Adapt, stored: Mapping[str, Any], wanted: Any) -> tuple[Any, bool]:
    """(the shapes `adapt` makes of the stored variables' metadata, whether it changes
    any leaf): `adapt` runs under `jax.eval_shape`, reading no array."""
    # Stored float64 (numpy-written) is float32 to JAX without x64, as once restored.
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
        leaf.shape, jax.dtypes.canonicalize_dtype(leaf.dtype)), stored)
    changed = []

    def run(variables):
        out = adapt(variables, wanted)
        before = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
        after = dict(jax.tree_util.tree_flatten_with_path(out)[0])
        changed.append(before.keys() != after.keys()
                       or any(after[k] is not before[k] for k in after))
        return out

    shapes = jax.eval_shape(run, abstract)
    return shapes, changed[0]


def restore_ema_params(directory: str | os.PathLike, target: Any, *, step: int) -> Optional[Any]:
    """The EMA parameters of a training run's checkpoint ('train' item, 'ema_params'),
    restored into `target` (the model's params or their eval_shape), or None when the
    run kept no EMA (or the checkpoint is model-only, e.g. converted). Only those
    arrays are read, not the optimiser state beside them."""
    with manager(directory, read_only=True) as mngr:
        stored = mngr.item_metadata(step).get("train")
        if not stored or "ema_params" not in stored:
            return None
        error = _mismatch_error(f"the EMA parameters of checkpoint {directory} step {step} "
                                "do not fit the model",
                                _differences(target, stored["ema_params"]))
        if error:
            raise error
        restored = mngr.restore(step, args=ocp.args.Composite(
            train=_restore_into({"ema_params": target}, partial=True))).train
    return restored["ema_params"]


def _restore_into(target: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restore args that give arrays the target's shapes, dtypes and shardings."""
    return ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial)


def _without_head(variables: Mapping[str, Any]) -> dict:
    return {col: {k: v for k, v in tree.items() if k != "head"}
            for col, tree in variables.items()}


# --- A training run's state: {'step', 'params', 'batch_stats', 'opt_state', ...} ------------

MODEL_KEYS = ("params", "batch_stats")


def save_state(mngr: ocp.CheckpointManager, step: int, state: Mapping[str, Any],
               meta: Mapping[str, Any]) -> None:
    """Saves a train state under `step` (asynchronously if the manager is).

    Raises CheckpointWriteError if this save, or an earlier asynchronous one that
    failed meanwhile, could not be written."""
    model = {k: state[k] for k in MODEL_KEYS}
    train = {k: v for k, v in state.items() if k not in MODEL_KEYS}
    with _write_errors_reported(mngr):
        mngr.check_for_errors()
        mngr.save(step, args=ocp.args.Composite(model=ocp.args.PyTreeSave(model),
                                                train=ocp.args.PyTreeSave(train),
                                                meta=ocp.args.JsonSave(dict(meta))))


def check_saves(mngr: ocp.CheckpointManager, *, wait: bool = False) -> None:
    """Raises CheckpointWriteError if an asynchronous save has failed; with `wait`,
    first waits for the one in progress. The trainer calls it at every log step, so a
    failed write stops the run soon after, not at the next save."""
    with _write_errors_reported(mngr):
        if wait:
            mngr.wait_until_finished()
        else:
            mngr.check_for_errors()


# Signs that a save failed for a reason outside this program (space, permissions, the
# storage service), as the OS, TensorStore and Orbax word them, most specific first.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_IO_FAILURE = re.compile(r"No space left on device|Permission denied|Read-only file system|"
                         r"Disk quota exceeded|RESOURCE_EXHAUSTED|PERMISSION_DENIED|"
                         r"UNAVAILABLE|DEADLINE_EXCEEDED|UNAUTHENTICATED")


def _io_cause(error: BaseException) -> Optional[str]:
    """A short cause if `error` (or what it chains to) is a storage failure, else None."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno)
        code = _OS_ERROR_CODE.search(str(e))
        if code:
            return os.strerror(int(code.group(1)))
    for e in chain:
        match = _IO_FAILURE.search(str(e))
        if match:
            return match.group(0)
    return None


@contextlib.contextmanager
def _write_errors_reported(mngr: ocp.CheckpointManager) -> Iterator[None]:
    """Turns a failed save (storage errors only) into one readable CheckpointWriteError;
    anything else is a bug and propagates unchanged."""
    try:
        yield
    except Exception as error:
        cause = _io_cause(error)
        if cause is None:
            raise
        directory = str(mngr.directory)
        failed = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(error))
        which = f"step {failed.group(1)}" if failed else "a checkpoint"
        good = latest_step(directory)
        kept = (f"The newest complete checkpoint, step {good}, is intact" if good is not None
                else "No complete checkpoint had been written yet")
        raise CheckpointWriteError(
            f"saving {which} in {directory} failed: {cause}. {kept}. Fix the cause (free "
            "space, permissions), then run the same command again (training resumes).") from error


def move_aside(directory: str | os.PathLike, step: int, destination: str | os.PathLike) -> str:
    """Moves step `step` out of a checkpoint directory, into `destination`, and returns
    its new path: a damaged checkpoint is kept for inspection, never deleted."""
    os.makedirs(destination, exist_ok=True)
    target = os.path.join(destination, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(os.path.join(directory, str(step)), target)
    return target


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are missing or unreadable (a crash or a disk fault)."""


def restore_state(mngr: ocp.CheckpointManager, step: int, target: Mapping[str, Any]) -> dict:
    """Restores a train state into `target` (ShapeDtypeStructs with shardings).

    Raises CheckpointMismatchError listing every difference when the checkpoint was
    written for another model or another optimiser (`check_state_fits`, before any
    array is read). Any other error means the checkpoint's files are damaged:
    DamagedCheckpointError, or the reader's own error.
    """
    check_state_fits(mngr, step, target)
    model_target = {k: target[k] for k in MODEL_KEYS}
    train_target = {k: v for k, v in target.items() if k not in MODEL_KEYS}
    restored = mngr.restore(step, args=ocp.args.Composite(
        model=_restore_into(model_target), train=_restore_into(train_target)))
    return {**restored.model, **restored.train}


def check_state_fits(mngr: ocp.CheckpointManager, step: int, target: Mapping[str, Any], *,
                     run: Optional[Mapping[str, Any]] = None) -> None:
    """Raises CheckpointMismatchError when the train state at `step` is of another
    model or optimiser than `target` (its shapes), or holds no training state;
    DamagedCheckpointError when its metadata cannot be read. Reads metadata only.
    `run`: the run's `model_settings`, to name only the settings in which the
    checkpoint's model differs."""
    model_target = {k: target[k] for k in MODEL_KEYS}
    train_target = {k: v for k, v in target.items() if k not in MODEL_KEYS}
    step_dir = os.path.join(str(mngr.directory), str(step))
    if not os.path.isdir(os.path.join(step_dir, "train")) and os.path.isdir(
            os.path.join(step_dir, "model")):
        raise CheckpointMismatchError(
            f"the checkpoint at {mngr.directory} step {step} has no training state (a "
            "model-only checkpoint: use it through config.init_from, not as a workdir)")
    stored = mngr.item_metadata(step)
    if stored.get("model") is None or stored.get("train") is None:
        missing = [item for item in ("model", "train") if stored.get(item) is None]
        raise DamagedCheckpointError(f"{step_dir}: the metadata of {' and '.join(missing)} "
                                     "cannot be read")
    error = _mismatch_error(
        f"the checkpoint at {mngr.directory} step {step}{_holding(mngr, step, run)} does not "
        "fit this run's model or optimiser",
        _differences(model_target, {k: v for k, v in stored["model"].items() if v}),
        _differences(train_target, dict(stored["train"])),
        advice="use another --workdir, or resume with the config that wrote it")
    if error:
        raise error


def _holding(mngr: ocp.CheckpointManager, step: int, run: Optional[Mapping[str, Any]]) -> str:
    """' (deit_tiny_patch16_224 head=noah depth=1; this run: depth=2)', the model the
    step's meta names, or '' where it names none or cannot be read."""
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception:  # noqa: BLE001 (the arrays' metadata alone decide the refusal)
        return ""
    held = held_model(dict(meta or {}), run)
    return f" ({held})" if held else ""
