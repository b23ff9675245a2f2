"""Orbax checkpoints of models and training runs, one format for both.

A checkpoint directory is an Orbax `CheckpointManager` directory of numbered steps.
Every step holds up to three items:

  'model'  {'params': ..., 'batch_stats': ...}   the model's variables: what
           evaluation and `config.init_from` read, and all a converted checkpoint has
  'train'  {'step', 'opt_state', 'ema_params'}    the rest of a run's state (trainer only)
  'meta'   JSON: model name, head, num_classes, overrides, ...  (describes 'model')

Loading checks the structure against the model it goes into and lists every missing
key, unexpected key and shape mismatch by name: nothing is skipped silently.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict

class CheckpointMismatchError(ValueError):
    """A checkpoint's variables do not fit the model they are loaded into."""


def manager(directory: str | os.PathLike, *, max_to_keep: Optional[int] = None,
            async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` with this project's items."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, read_only=read_only,
                                           enable_async_checkpointing=async_save,
                                           create=not read_only,
                                           save_interval_steps=0 if read_only else 1)
    handlers = {"model": ocp.PyTreeCheckpointHandler(), "train": ocp.PyTreeCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_handlers=handlers)


def tree_mismatches(expected: Any, found: Any) -> list[str]:
    """Differences between two variable trees, one line each, by '/'-joined key."""
    want = flatten_dict(dict(expected), sep="/")
    have = flatten_dict(dict(found), sep="/")
    lines = [f"missing in checkpoint: {k} {tuple(np.shape(want[k]))}"
             for k in sorted(want.keys() - have.keys())]
    lines += [f"unexpected in checkpoint: {k} {tuple(np.shape(have[k]))}"
              for k in sorted(have.keys() - want.keys())]
    lines += [f"shape mismatch: {k}: model {tuple(np.shape(want[k]))}, "
              f"checkpoint {tuple(np.shape(have[k]))}"
              for k in sorted(want.keys() & have.keys())
              if tuple(np.shape(want[k])) != tuple(np.shape(have[k]))]
    return lines


def save_model(directory: str | os.PathLike, variables: Mapping[str, Any],
               meta: Mapping[str, Any], step: int = 0) -> None:
    """Writes a model-only checkpoint (what `convert` produces) and waits for it."""
    variables = {"params": variables["params"],
                 "batch_stats": variables.get("batch_stats", {})}
    with manager(directory, async_save=False) as mngr:
        mngr.save(step, args=ocp.args.Composite(model=ocp.args.PyTreeSave(variables),
                                                meta=ocp.args.JsonSave(dict(meta))))
        mngr.wait_until_finished()


def latest_step(directory: str | os.PathLike) -> Optional[int]:
    """The newest step in a checkpoint directory, or None if there is none."""
    if not os.path.isdir(directory):
        return None
    with manager(directory, read_only=True) as mngr:
        return mngr.latest_step()


def resize_position_embedding(pos_embed: np.ndarray, num_tokens: int) -> np.ndarray:
    """ViT position embeddings [1, P + g*g, D] -> [1, P + G*G, D] for G*G = num_tokens - P.

    The P prefix tokens (the class token) are kept; the g x g grid is resized
    bicubically to G x G, as when fine-tuning at another resolution (ImageNet 224 px
    -> COCO 448 px). P is what the square grids leave over.
    """
    stored = pos_embed.shape[1]
    g = math.isqrt(stored)
    prefix = stored - g * g
    new_g = math.isqrt(num_tokens - prefix)
    if num_tokens <= prefix or new_g * new_g != num_tokens - prefix:
        raise ValueError(f"cannot resize position embeddings of {stored} tokens to {num_tokens}")
    grid = pos_embed[0, prefix:].reshape(g, g, -1).astype(np.float32)
    grid = np.asarray(jax.image.resize(grid, (new_g, new_g, grid.shape[-1]), "bicubic"))
    out = np.concatenate([pos_embed[0, :prefix].astype(np.float32),
                          grid.reshape(new_g * new_g, -1)], axis=0)
    return out[None].astype(pos_embed.dtype)


def _place(value: np.ndarray, like: Any) -> jax.Array:
    """A host array as a (possibly multi-host) global array shaped and sharded like `like`."""
    sharding = getattr(like, "sharding", None)
    value = np.asarray(value, like.dtype)
    if sharding is None:
        return jax.numpy.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def restore_model(directory: str | os.PathLike, target: Optional[Any] = None, *,
                  step: Optional[int] = None, drop_head: bool = False,
                  resize_pos_embed: bool = False):
    """Restores the 'model' item (and 'meta') of a checkpoint.

    target: the model's variables, or their `jax.eval_shape` (optionally carrying
      shardings, which the restored arrays then get). The checkpoint must match it
      exactly, else a CheckpointMismatchError lists every difference. Without a
      target, arrays come back as stored.
    drop_head: restore everything but the 'head' and keep the target's head
      (fine-tuning on another label set); the target then needs concrete head values.
    resize_pos_embed: a stored ViT 'pos_embed' of another token count (another image
      size) is resized to the target's (`resize_position_embedding`) instead of being
      a mismatch.

    Returns (variables, meta).
    """
    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}: expected an Orbax checkpoint "
                                "directory written by training or by `python -m noah_jax.convert`")
    with manager(directory, read_only=True) as mngr:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if target is None:  # as stored, as host numpy arrays, whatever wrote it
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                    dict(mngr.item_metadata(step)["model"]))
            restored = mngr.restore(step, args=ocp.args.Composite(
                model=ocp.args.PyTreeRestore(restore_args=as_numpy)))
            return dict(restored.model), meta
        # Models without BatchNorm have no 'batch_stats' in eval_shape(init); the
        # checkpoint stores an empty one.
        target = {col: target.get(col, {}) for col in ("params", "batch_stats")}
        wanted = _without_head(target) if drop_head else target
        stored = mngr.item_metadata(step)["model"]
        stored = {col: tree for col, tree in stored.items() if tree}
        resize = (resize_pos_embed and "pos_embed" in wanted["params"]
                  and "pos_embed" in stored.get("params", {})
                  and tuple(stored["params"]["pos_embed"].shape)
                  != tuple(wanted["params"]["pos_embed"].shape))
        if resize:
            stored = dict(stored, params=dict(stored["params"]))
            stored["params"]["pos_embed"] = wanted["params"]["pos_embed"]
        problems = tree_mismatches(wanted, _without_head(stored) if drop_head else stored)
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {directory} (step {step}: {meta.get('model', '?')}, "
                f"head={meta.get('head', '?')}) does not fit the model:\n  "
                + "\n  ".join(problems))
        if resize:
            # Everything as stored (host numpy), then resized and placed like the target.
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                    dict(mngr.item_metadata(step)["model"]))
            raw = dict(mngr.restore(step, args=ocp.args.Composite(
                model=ocp.args.PyTreeRestore(restore_args=as_numpy))).model)
            raw = {col: dict(raw.get(col) or {}) for col in wanted}
            raw["params"]["pos_embed"] = resize_position_embedding(
                raw["params"]["pos_embed"], wanted["params"]["pos_embed"].shape[1])
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
    """Saves a train state under `step` (asynchronously if the manager is)."""
    model = {k: state[k] for k in MODEL_KEYS}
    train = {k: v for k, v in state.items() if k not in MODEL_KEYS}
    mngr.save(step, args=ocp.args.Composite(model=ocp.args.PyTreeSave(model),
                                            train=ocp.args.PyTreeSave(train),
                                            meta=ocp.args.JsonSave(dict(meta))))


def restore_state(mngr: ocp.CheckpointManager, step: int, target: Mapping[str, Any]) -> dict:
    """Restores a train state into `target` (ShapeDtypeStructs with shardings).

    Raises CheckpointMismatchError listing every difference when the checkpoint was
    written for another model or another optimiser.
    """
    model_target = {k: target[k] for k in MODEL_KEYS}
    train_target = {k: v for k, v in target.items() if k not in MODEL_KEYS}
    stored = mngr.item_metadata(step)
    problems = tree_mismatches(model_target, {k: v for k, v in stored["model"].items() if v})
    if stored.get("train") is None:
        problems.append("the checkpoint has no training state (a model-only checkpoint: "
                        "use it through config.init_from, not as a workdir)")
    if problems:
        raise CheckpointMismatchError(
            f"the checkpoint at {mngr.directory} step {step} does not fit this run's model or "
            "optimiser:\n  " + "\n  ".join(problems)
            + "\nUse a fresh --workdir for a different model, or the same config to resume.")

    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            model=_restore_into(model_target), train=_restore_into(train_target)))
    except (ValueError, KeyError, TypeError) as e:  # the optimiser state differs
        raise CheckpointMismatchError(
            f"the training state at {mngr.directory} step {step} does not fit this run's "
            f"optimiser ({e}). Use a fresh --workdir, or the config the run started with.") from e
    return {**restored.model, **restored.train}
