"""The trainer: `train_and_evaluate(config, workdir)`, one loop read top to bottom.

It calls module-level pieces that take what they use and return what they make:
`check_config` and `check_workdir` (every check that can fail before anything is
written), `setup` (the mesh, model, optimiser, abstract state, its shardings and the
jitted step, built from the config), `init_train_state` / `restore_or_init` (resume
first: the workdir's newest checkpoint, else `config.init_from`, else a fresh start),
`make_train_step` (the pure update), `evaluate` (the evaluations of config.evals that
are due, each by its evaluator in `noah_jax.train.evaluators`), `check_finite` (the NaN
guard) and `stop_and_save` (a signal or preemption notice, `noah_jax.train.preemption`).
Data flows one way: config -> source -> global batch -> model -> loss/metrics ->
optimiser -> checkpoint/logs; the state passes explicitly from piece to piece.

While it writes, a run holds its workdir (`noah_jax.train.workdir_lock`); a damaged newest
checkpoint falls back to the one before it (`restore_or_init`), and a failed write
stops the run (`checkpoint.check_saves`). It draws no figures: main.py asks for
WORKDIR/attention.png once it returns (`noah_jax.visualize.run_attention_figure`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from noah_jax.train import (checkpoint, durations, evaluators, losses, optim, preemption,
                            run_log, sharding, workdir_lock)
from noah_jax import data
from noah_jax.errors import (CheckpointError, CheckpointMismatchError, ConfigError,
                             NonFiniteError, Stopped, UserError)
from noah_jax.data.preprocess import Preprocess
from noah_jax.models import create_model, input_preprocessing

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LOSSES = ("softmax_xent", "sigmoid_xent", "asl")


# ----------------------------------------------------------------------------------
# Checks that run before anything is written.
# ----------------------------------------------------------------------------------
def loss_function(config: ml_collections.ConfigDict
                  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """config.loss as (logits, labels) -> per-example loss [B]; labels are int ids [B],
    soft targets or multi-hot [B, K]. The one place that knows the loss names."""
    if config.loss == "softmax_xent":
        def softmax_xent(logits, labels):
            # Soft targets (mixup/cutmix) arrive already smoothed by the input pipeline.
            smoothing = config.label_smoothing if labels.ndim == 1 else 0.0
            return losses.softmax_cross_entropy(logits, labels, smoothing)
        return softmax_xent

    def multi_hot(logits, labels):
        return jax.nn.one_hot(labels, logits.shape[-1]) if labels.ndim == 1 else labels

    if config.loss == "sigmoid_xent":
        return lambda logits, labels: losses.sigmoid_binary_cross_entropy(
            logits, multi_hot(logits, labels))
    if config.loss == "asl":
        return lambda logits, labels: losses.asymmetric_loss(
            logits, multi_hot(logits, labels), config.asl.gamma_neg, config.asl.gamma_pos,
            config.asl.clip)
    raise ConfigError(f"config.loss must be one of {LOSSES}, got {config.loss!r}")




def check_workdir(config: ml_collections.ConfigDict, workdir: str, abstract_state,
                  num_classes: Optional[int] = None, *,
                  adapt_checkpoint: Optional[checkpoint.Adapt] = None) -> None:
    """Refuses, from checkpoint metadata alone, a workdir this run cannot continue (its
    newest readable checkpoint is of another model or optimiser, or a model-only one)
    or, with nothing to resume, a `config.init_from` that does not fit the model: a
    refused run writes nothing. Damaged checkpoints are left to `restore_or_init`.
    The refusal names the settings in which the checkpoint's model differs from this
    run's (config.model, and `num_classes`, the dataset's). `adapt_checkpoint`: the
    model's loading quirks (`Classifier.adapt_checkpoint`), which `config.init_from`
    goes through."""
    run = checkpoint.model_settings(config.model.name, config.model.head, num_classes,
                                    set_overrides(config))
    directory = os.path.join(workdir, "checkpoints")
    if checkpoint.latest_step(directory) is not None:
        with checkpoint.manager(directory, read_only=True) as mngr:
            for step in sorted(mngr.all_steps(), reverse=True):
                try:
                    checkpoint.check_state_fits(mngr, step, abstract_state, run=run)
                except CheckpointMismatchError:
                    raise
                except Exception:  # noqa: BLE001 (damaged: restore_or_init reports it)
                    continue
                return
        return
    if config.init_from.path:
        checkpoint.check_model_fits(config.init_from.path,
                                    {k: abstract_state[k] for k in checkpoint.MODEL_KEYS},
                                    drop_head=config.init_from.drop_head,
                                    adapt=adapt_checkpoint, run=run)


def check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses settings that cannot run here, before the dataset is opened."""
    workdir_lock.check_workdir_path(workdir)
    if config.dtype not in DTYPES:
        raise ConfigError(f"config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    loss_function(config)
    evaluators.check_config(config.evals)
    devices, processes = jax.device_count(), jax.process_count()
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % devices or config[name] % processes:
            raise ConfigError(f"config.{name}={config[name]} must be divisible by the "
                              f"{devices} devices")
    micro_batch, rest = divmod(config.batch_size, config.grad_accum_steps)
    if rest or micro_batch % devices:
        raise ConfigError(f"batch_size={config.batch_size} must split into grad_accum_steps="
                          f"{config.grad_accum_steps} micro-batches divisible by the "
                          f"{devices} devices")
    group = config.model.overrides.get("bn_group_size") or 0
    if 0 < group < micro_batch and micro_batch % group:
        raise ConfigError(f"model.overrides.bn_group_size={group} must divide the batch each "
                          f"BatchNorm sees, {micro_batch} (batch_size / grad_accum_steps), "
                          f"or be at least it; 0 normalises over the whole batch")
    first, count = config.profile_steps
    if count < 0 or (count and first < 1):
        raise ConfigError(f"config.profile_steps=(first step, count) needs first >= 1 and "
                          f"count >= 0 (0 = no trace), got {tuple(config.profile_steps)}")
    if (config.eval_only and not config.init_from.path
            and checkpoint.latest_step(os.path.join(workdir, "checkpoints")) is None):
        raise ConfigError("config.eval_only needs a checkpoint: a workdir with one, or "
                          "config.init_from.path (e.g. the output of noah_jax.convert)")
    sharding.create_mesh(config.mesh.data, config.mesh.model)  # covers the devices


def check_source(config: ml_collections.ConfigDict, source: data.Source) -> None:
    if source.multilabel and config.loss == "softmax_xent":
        raise ConfigError(f"dataset {config.dataset.name!r} is multi-label: set config.loss "
                          "to 'sigmoid_xent' or 'asl'")


# ----------------------------------------------------------------------------------
# The model, the optimiser, the train state and the update step.
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setup:
    """What `setup` builds from a config: the trainer trains it, noah_jax.benchmark times
    its `train_step`.

    mesh: the (data, model) device mesh. model: the linen module. overrides: the
    config.model.overrides that are set (None dropped), as checkpoints' meta records
    them. schedule, tx: the learning-rate schedule and the optimiser. init_state:
    rng -> a fresh train state (`init_train_state`). abstract_state: its
    `jax.eval_shape`. state_sharding: where each of its leaves lives on the mesh.
    train_step: `jit_train_step`, (state, global batch) -> (state, metrics), donating
    the state.
    """

    mesh: jax.sharding.Mesh
    model: Any
    overrides: dict
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    init_state: Callable[[jax.Array], dict]
    abstract_state: dict
    state_sharding: dict
    train_step: Callable


def set_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """config.model.overrides without those left None (the model's own value)."""
    return {k: v for k, v in config.model.overrides.to_dict().items() if v is not None}


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """config.model (name, head, overrides) in config.dtype, for `num_classes` classes."""
    return create_model(config.model.name, num_classes=num_classes, head=config.model.head,
                        dtype=DTYPES[config.dtype], **set_overrides(config))


def setup(config: ml_collections.ConfigDict, *, num_classes: int, image_shape,
          total_steps: int, steps_per_epoch: int, multilabel: bool = False,
          devices=None) -> Setup:
    """The mesh (config.mesh over `devices`, all by default), the model, the schedule
    and optimiser, the abstract train state, its shardings and the jitted train step
    of a run on images of `image_shape` (H, W, C) with `num_classes` classes. Nothing
    is allocated on the devices (the state is abstract)."""
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.model, devices=devices)
    model = build_model(config, num_classes)
    schedule = optim.learning_rate_schedule(config, total_steps=total_steps,
                                            steps_per_epoch=steps_per_epoch)
    tx = optim.make_optimizer(config, schedule, model)
    init_state = functools.partial(init_train_state, model, tx, tuple(image_shape),
                                   ema=config.ema_decay > 0)
    abstract_state = jax.eval_shape(init_state, jax.random.key(config.seed))
    state_sharding = sharding.state_shardings(abstract_state, mesh, fsdp=config.fsdp,
                                              fsdp_min_size=config.fsdp_min_size)
    train_step = jit_train_step(model, tx, config, schedule, mesh, state_sharding,
                                multilabel=multilabel)
    return Setup(mesh=mesh, model=model, overrides=set_overrides(config), schedule=schedule,
                 tx=tx, init_state=init_state, abstract_state=abstract_state,
                 state_sharding=state_sharding, train_step=train_step)


def init_train_state(model, tx: optax.GradientTransformation, image_shape, rng, *,
                     ema: bool) -> dict[str, Any]:
    """The train state at step 0: a dict, as checkpoints store it."""
    images = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init({"params": rng, "dropout": rng}, images, train=False)
    params = variables["params"]
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "batch_stats": variables.get("batch_stats", {}),
             "opt_state": tx.init(params), "nonfinite_step": -jnp.ones((), jnp.int32)}
    if ema:
        state["ema_params"] = params
    return state


def restore_or_init(config: ml_collections.ConfigDict, mngr, init_state, abstract_state,
                    state_sharding, *, workdir: str,
                    adapt_checkpoint: Optional[checkpoint.Adapt] = None
                    ) -> tuple[dict[str, Any], int | None]:
    """(state, restored step or None): the newest checkpoint in the workdir that
    restores, else a fresh state, initialised from `config.init_from.path` when given.

    A newer checkpoint that cannot be read (a crash mid-write, a disk fault) is
    reported, moved into `<workdir>/damaged_checkpoints/` once an older one has
    restored, and skipped; if none restores, the run stops and lists why for each,
    moving nothing. A checkpoint of another model or optimiser is not damage: that
    stops the run at once (CheckpointMismatchError). `config.init_from` goes through
    `adapt_checkpoint`, the model's loading quirks (e.g. DeiT's position embeddings
    of another image size).
    """
    target = sharding.with_shardings(abstract_state, state_sharding)
    damaged = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            state, problem = checkpoint.restore_state(mngr, step, target), None
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 (any reader error: the files are damaged)
            state, problem = None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        if not _on_every_process(problem is None):
            problem = problem or "another process could not read it"
            logging.warning("checkpoint step %d in %s cannot be restored (%s); trying the "
                            "one before it", step, mngr.directory, problem)
            damaged.append((step, problem))
            continue
        if damaged:
            if jax.process_index() == 0:
                for bad, _ in damaged:
                    moved = checkpoint.move_aside(mngr.directory, bad,
                                                  os.path.join(workdir, "damaged_checkpoints"))
                    logging.warning("moved the damaged checkpoint of step %d to %s", bad, moved)
            if jax.process_count() > 1:  # the others wait for the moves, then list again
                multihost_utils.sync_global_devices("damaged checkpoints moved aside")
            mngr.reload()
        logging.info("resuming from %s step %d", mngr.directory, step)
        return state, step
    if damaged:
        raise CheckpointError(
            f"no checkpoint in {mngr.directory} can be restored: "
            + "; ".join(f"step {step}: {problem}" for step, problem in damaged)
            + ". Nothing was moved or deleted. To start afresh, move these checkpoints "
            "away (or use another --workdir).")
    state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.key(config.seed))
    if config.init_from.path:
        logging.info("initialising from %s (drop_head=%s)", config.init_from.path,
                     config.init_from.drop_head)
        target = {"params": state["params"], "batch_stats": state["batch_stats"]}
        variables, _ = checkpoint.restore_model(config.init_from.path, target,
                                                drop_head=config.init_from.drop_head,
                                                adapt=adapt_checkpoint)
        state = jax.jit(functools.partial(_with_variables, ema="ema_params" in state),
                        out_shardings=state_sharding, donate_argnums=0)(state, variables)
    return state, None


def _on_every_process(ok: bool) -> bool:
    """Whether `ok` holds on every process (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.int32(ok)).min())


def _with_variables(state, variables, ema: bool):
    state = dict(state, params=variables["params"], batch_stats=variables["batch_stats"])
    if ema:
        state["ema_params"] = variables["params"]
    return state


def top1_hits(logits: jax.Array, labels: jax.Array, multilabel: bool) -> jax.Array:
    """Per example: is the top class right? (multi-label: one of the positives)."""
    predicted = jnp.argmax(logits, -1)
    if labels.ndim == 1:
        return predicted == labels
    if multilabel:
        return jnp.take_along_axis(labels, predicted[:, None], axis=-1)[:, 0] > 0
    return predicted == jnp.argmax(labels, -1)


def make_train_step(model, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    schedule: optax.Schedule, mesh, *, multilabel: bool = False):
    """The pure update step: (state, batch) -> (state, metrics)."""
    accum = config.grad_accum_steps
    per_example_loss = loss_function(config)
    batch_axis = sharding.batch_sharding(mesh).spec

    def loss_fn(params, batch_stats, images, labels, rng):
        logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                       train=True, rngs={"dropout": rng},
                                       mutable=["batch_stats"])
        loss = per_example_loss(logits, labels).mean()
        top1 = jnp.mean(top1_hits(logits, labels, multilabel))
        return loss, (new_vars.get("batch_stats", batch_stats), top1)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch):
        # Per-step randomness from (seed, step): a resumed run draws the same numbers.
        rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])
        params = state["params"]
        if accum == 1:
            (loss, (batch_stats, top1)), grads = grad_fn(
                params, state["batch_stats"], batch["image"], batch["label"], rng)
        else:
            # Micro-batch i takes every accum-th example, so each device keeps its slice.
            def split(x):
                x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(
                    x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                        None, *batch_axis)))

            def micro_step(carry, micro):
                grads, batch_stats, loss, top1 = carry
                i, images, labels = micro
                (l, (batch_stats, t)), g = grad_fn(params, batch_stats, images, labels,
                                                   jax.random.fold_in(rng, i))
                return (jax.tree.map(jnp.add, grads, g), batch_stats, loss + l, top1 + t), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, batch_stats, loss, top1), _ = jax.lax.scan(
                micro_step, (zeros, state["batch_stats"], 0.0, 0.0),
                (jnp.arange(accum), split(batch["image"]), split(batch["label"])))
            grads, loss, top1 = (jax.tree.map(lambda g: g / accum, grads), loss / accum,
                                 top1 / accum)

        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = dict(state, params=optax.apply_updates(params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)
        if "ema_params" in state:
            new_state["ema_params"] = optax.incremental_update(
                new_state["params"], state["ema_params"], 1.0 - config.ema_decay)

        # NaN guard: a non-finite step leaves the state untouched and records its number;
        # the host stops the run before anything non-finite reaches a checkpoint.
        grad_norm = optax.tree.norm(grads)
        params_finite = jax.tree.reduce(
            jnp.logical_and, jax.tree.map(lambda p: jnp.isfinite(p).all(), new_state["params"]))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        new_state["step"] = state["step"] + 1
        new_state["nonfinite_step"] = jnp.where(
            finite | (state["nonfinite_step"] >= 0), state["nonfinite_step"], state["step"])
        step_metrics = {"loss": loss, "accuracy": top1, "grad_norm": grad_norm,
                        "learning_rate": schedule(state["step"])}
        return new_state, step_metrics

    return train_step


def jit_train_step(model, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                   schedule: optax.Schedule, mesh: jax.sharding.Mesh, state_sharding, *,
                   multilabel: bool) -> Callable:
    """`make_train_step` compiled as the trainer runs it (and noah_jax.benchmark times
    it): the state sharded and donated, the batch split over the mesh's data axis."""
    return jax.jit(make_train_step(model, tx, config, schedule, mesh, multilabel=multilabel),
                   in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, None), donate_argnums=0)


# ----------------------------------------------------------------------------------
# Evaluation and the NaN guard.
# ----------------------------------------------------------------------------------
def evaluate(state: dict[str, Any], evaluations: list[evaluators.Evaluation], *, step: int,
             final: bool, local_batch_size: int, data_sharding) -> dict[str, float]:
    """Metrics of the raw (`eval/...`) and, with EMA, the averaged (`eval_ema/...`)
    parameters on every evaluation due at `step` (`final`: all of them)."""
    weights = {"eval": state["params"]}
    if "ema_params" in state:
        weights["eval_ema"] = state["ema_params"]
    results, source_of = {}, {}
    for prefix, params in weights.items():
        for evaluation in evaluations:
            if not evaluation.due(step, final):
                continue
            scores = evaluation.run(params, state["batch_stats"],
                                    local_batch_size=local_batch_size,
                                    data_sharding=data_sharding)
            for k, v in scores.items():
                key = "/".join(filter(None, (prefix, evaluation.prefix, k)))
                if key in source_of:
                    raise ConfigError(f"config.evals.{source_of[key]} and config.evals."
                                      f"{evaluation.name} both write {key}: give them "
                                      "different prefixes")
                results[key], source_of[key] = v, evaluation.name
    return results


def check_finite(state: dict[str, Any], mngr) -> None:
    """Stops the run if a step was non-finite; that step was not applied, and the last
    good checkpoint is left intact (its pending write finishes first)."""
    bad = int(state["nonfinite_step"])
    if bad < 0:
        return
    mngr.wait_until_finished()
    last = mngr.latest_step()
    kept = (f"the last good checkpoint, step {last}, is intact" if last is not None
            else "no checkpoint had been written yet")
    raise NonFiniteError(
        f"non-finite loss, gradient or parameters at step {bad}: training stopped before "
        f"writing anything after it ({kept}). Lower the learning rate, enable "
        "grad_clip_norm or compute in float32.")


# ----------------------------------------------------------------------------------
# The trainer.
# ----------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates; resumes from the newest checkpoint in `workdir`.

    Returns the last evaluation's metrics.
    """
    # ----------------------------------------------------------------- Logging
    # Nothing is written to the workdir until the config, the dataset and the model
    # have been checked (section "Workdir" below).
    data.keep_tensorflow_off_accelerators()
    run_log.quiet_library_notices()

    check_config(config, workdir)

    # ----------------------------------------------------------------- Input
    # The model family's mean/std and evaluation resize wherever the config leaves them
    # None; config.json and every checkpoint's meta record what was resolved.
    config = input_preprocessing.resolve(config)
    source = data.get_source(config.dataset, seed=config.seed, augment=config.augment,
                             label_smoothing=config.label_smoothing)
    check_source(config, source)
    local_batch = config.batch_size // jax.process_count()
    local_eval_batch = config.eval_batch_size // jax.process_count()
    total_steps, steps_per_epoch = durations.total_and_epoch_steps(
        config, source.num_train_examples)

    # ----------------------------------------------------------------- Model and sharding
    # The mesh, the model, the optimiser, the abstract train state, its shardings and
    # the jitted update step (`setup`, which noah_jax.benchmark times the same way).
    built = setup(config, num_classes=source.num_classes, image_shape=source.image_shape,
                  total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                  multilabel=source.multilabel)
    mesh, model, overrides = built.mesh, built.model, built.overrides
    abstract_state, state_sharding = built.abstract_state, built.state_sharding
    data_sharding = sharding.batch_sharding(mesh)
    # Opened here, so that an evaluation dataset that is missing (and not skipped)
    # refuses the run before anything is written.
    evaluations = evaluators.from_config(config, source, model, mesh,
                                         steps_per_epoch=steps_per_epoch)

    # ----------------------------------------------------------------- Workdir
    # The config, the dataset, the model and what the workdir holds are valid: from
    # here on the run writes, holding the workdir against a second run (workdir_lock)
    # until it returns.
    check_workdir(config, workdir, abstract_state, source.num_classes,
                  adapt_checkpoint=model.adapt_checkpoint)
    os.makedirs(workdir, exist_ok=True)
    with contextlib.ExitStack() as on_exit:  # run in reverse order, also on errors
        lock = on_exit.enter_context(workdir_lock.WorkdirLock(workdir))
        # From here a signal stops the run at the next step (with a save), rather than
        # killing it while it holds the lock.
        stop = on_exit.enter_context(preemption.StopRequests())
        run_log.attach(workdir)
        on_exit.callback(run_log.detach)
        on_exit.push(functools.partial(_record_error, workdir))
        if lock.took_over:
            logging.warning("took over the workdir's lock %s: %s", lock.path, lock.took_over)
        writer = run_log.metric_writer(workdir)
        on_exit.callback(writer.close)  # flushes, and closes metrics.jsonl
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        _log_run_description(config, workdir, mesh, source, abstract_state, overrides)
        # What describes the model to whoever loads the checkpoint without the config
        # (noah_jax.inference): the classes by name, how its scores are read, its inputs
        # (image_size, eval_crop, eval_crop_ratio, eval_interpolation, mean, std).
        meta = {"model": config.model.name, "head": config.model.head,
                "num_classes": source.num_classes, "overrides": overrides,
                "dataset": config.dataset.name, "class_names": list(source.class_names),
                "multilabel": source.multilabel, "loss": config.loss,
                **Preprocess.from_config(config.dataset, config.augment).eval_record()}

        # ------------------------------------------------------------- Update step
        train_step = built.train_step

        best = BestScores()

        def run_evaluation(state, step: int, final: bool) -> dict[str, float]:
            results = evaluate(state, evaluations, step=step, final=final,
                               local_batch_size=local_eval_batch, data_sharding=data_sharding)
            results.update(best.update(step, results))
            writer.write_scalars(step, {k: v for k, v in results.items()
                                        if not k.endswith("count")})
            logging.info("step %d: %s", step, run_log.format_metrics(results))
            return results

        # ------------------------------------------------------------- Checkpoint restore
        mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"),
                                  max_to_keep=config.keep_checkpoints)
        on_exit.callback(mngr.close)
        # Also on errors (the NaN guard, a stop): the last save finishes writing.
        on_exit.push(functools.partial(_finish_saves, mngr))
        state, _ = restore_or_init(config, mngr, built.init_state, abstract_state,
                                   state_sharding, workdir=workdir,
                                   adapt_checkpoint=model.adapt_checkpoint)
        start_step = int(state["step"])
        best.resume(run_log.read_metrics(workdir) if jax.process_index() == 0 else {},
                    start_step)
        if config.eval_only or start_step >= total_steps:  # nothing (left) to train
            stop.uninstall()  # nothing to save: a signal ends the evaluation as usual
            return run_evaluation(state, start_step, final=True)

        # ------------------------------------------------------------- Loop
        logging.info("training for %d steps (%d per epoch) from step %d; evaluations: %s",
                     total_steps, steps_per_epoch, start_step,
                     "; ".join(e.describe() for e in evaluations) or "none")
        batches = source.train_batches(start_step=start_step, local_batch_size=local_batch,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
        progress = _Progress(total_steps, steps_per_epoch, start_step, config.batch_size)
        profile = run_log.StepTrace(workdir, *config.profile_steps)
        on_exit.callback(profile.stop)
        pending, results = [], {}
        for step in range(start_step + 1, total_steps + 1):
            profile.before(step)
            state, step_metrics = train_step(state, sharding.global_batch(next(batches),
                                                                           data_sharding))
            profile.after(step, state)
            pending.append(step_metrics)
            if step % config.log_every_steps == 0 or step == total_steps:
                check_finite(state, mngr)
                checkpoint.check_saves(mngr)  # a failed write stops the run here
                summary = progress.summary(step, jax.device_get(pending))
                writer.write_scalars(step, summary)
                pending = []
            if any(e.due(step, final=step == total_steps) for e in evaluations):
                jax.block_until_ready(state["step"])  # the queued steps count as training
                with progress.evaluating():
                    results = run_evaluation(state, step, final=step == total_steps)
            saved = step % config.checkpoint_every_steps == 0 or step == total_steps
            if saved:
                check_finite(state, mngr)
                checkpoint.save_state(mngr, step, state, meta)
            if stop.should_stop(step) and step < total_steps:  # (the last step finishes)
                raise stop_and_save(state, step, mngr, meta, stop, saved=saved)
        best.log_summary(results, steps_per_epoch)
        return results


class BestScores:
    """The best score of each evaluation so far, reported beside the last one, as the
    reference reports its best epoch (main.py `best_acc`, vit/deit/main.py
    `max_accuracy`): `eval/top1_best` (and its `_step`) for `eval/top1`, the same for
    the EMA's and for mAP. A resumed run takes the best so far from metrics.jsonl."""

    TRACKED = ("top1", "mAP")

    def __init__(self):
        self.best: dict[str, tuple[float, int]] = {}  # key -> (value, step)

    @classmethod
    def tracked(cls, key: str) -> bool:
        prefix, _, name = key.partition("/")
        return prefix in ("eval", "eval_ema") and name in cls.TRACKED

    def resume(self, history: dict[str, list[tuple[int, float]]], start_step: int) -> None:
        for key, values in history.items():
            for step, value in values:
                if self.tracked(key) and step <= start_step:
                    self._offer(key, value, step)

    def _offer(self, key: str, value: float, step: int) -> None:
        if key not in self.best or value > self.best[key][0]:
            self.best[key] = (value, step)

    def update(self, step: int, results: dict[str, float]) -> dict[str, float]:
        """Takes this evaluation's scores; returns the best of each so far."""
        for key, value in results.items():
            if self.tracked(key):
                self._offer(key, float(value), step)
        out = {}
        for key, (value, at) in self.best.items():
            out[f"{key}_best"], out[f"{key}_best_step"] = value, at
        return out

    def log_summary(self, results: dict[str, float], steps_per_epoch: int) -> None:
        for key, (value, at) in sorted(self.best.items()):
            if key in results:
                logging.info("%s: best %.4f at step %d (epoch %.1f), last %.4f", key, value,
                             at, at / steps_per_epoch, results[key])


def _log_run_description(config, workdir, mesh, source, abstract_state, overrides) -> None:
    num_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
    logging.info("%d device(s) of %s (%s) in %d process(es); mesh %s", jax.device_count(),
                 jax.devices()[0].platform, jax.devices()[0].device_kind, jax.process_count(),
                 dict(mesh.shape))
    logging.info("model %s (head %s%s), %s parameters, %s compute; config in %s",
                 config.model.name, config.model.head,
                 f", overrides {overrides}" if overrides else "", f"{num_params:,}",
                 config.dtype, os.path.join(workdir, "config.json"))
    logging.info("data %s: %s training and %s evaluation images, %d classes, batch %d",
                 config.dataset.name, f"{source.num_train_examples:,}",
                 f"{source.num_eval_examples:,}", source.num_classes, config.batch_size)


def stop_and_save(state, step: int, mngr, meta, stop: preemption.StopRequests, *,
                  saved: bool) -> Stopped:
    """Saves `step` (unless just saved), waits for the write, and returns the Stopped
    to raise: every process calls it at the same step (StopRequests.should_stop)."""
    check_finite(state, mngr)
    if not saved:
        checkpoint.save_state(mngr, step, state, meta)
    checkpoint.check_saves(mngr, wait=True)
    return Stopped(f"stopped by {stop.reason()} at step {step}: its checkpoint is saved in "
                   f"{mngr.directory}; run the same command to resume from it",
                   stop.signum or signal.SIGTERM)


def _record_error(workdir: str, kind, error, traceback) -> bool:
    """What ended a run that had started writing, kept in its log.txt (main.py prints
    it); a run refused before that leaves the workdir as it was."""
    if isinstance(error, UserError):
        run_log.append(workdir, f"{type(error).__name__}: {error}")
    return False


def _finish_saves(mngr, kind, error, traceback) -> bool:
    """On leaving the trainer: waits for the save in progress. Its failure is raised
    if nothing else went wrong, and logged if something did (not to hide that)."""
    try:
        checkpoint.check_saves(mngr, wait=True)
    except Exception as e:  # noqa: BLE001
        if error is None:
            raise
        logging.error("also, the last checkpoint could not be written: %s", e)
    return False


class _Progress:
    """Throughput (training time only) and ETA (everything) between log lines."""

    def __init__(self, total_steps: int, steps_per_epoch: int, start_step: int,
                 batch_size: int):
        self.total, self.per_epoch, self.start = total_steps, steps_per_epoch, start_step
        self.batch_size = batch_size
        self.loop_start = self.chrono = time.time()
        self.eval_seconds = self.interval_eval_seconds = 0.0

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        start = time.time()
        yield
        self.eval_seconds += time.time() - start
        self.interval_eval_seconds += time.time() - start

    def summary(self, step: int, pending: list[dict]) -> dict[str, float]:
        """Means of the steps since the last line, logged; returns them for TensorBoard."""
        summary = {f"train/{k}": float(np.mean([m[k] for m in pending])) for k in pending[0]}
        seconds = max(time.time() - self.chrono - self.interval_eval_seconds, 1e-9)
        summary["train/steps_per_sec"] = len(pending) / seconds
        summary["train/images_per_sec"] = len(pending) * self.batch_size / seconds
        summary["train/epoch"] = step / self.per_epoch  # the x axis of study curves
        elapsed = time.time() - self.loop_start
        logging.info(
            "step %d/%d (epoch %.1f): loss %.4f, accuracy %.4f, lr %.3g, grad_norm %.3g;"
            " %.1f images/s, ETA %s (%.0f%% of the time in evaluation)", step, self.total,
            step / self.per_epoch, summary["train/loss"], summary["train/accuracy"],
            summary["train/learning_rate"], summary["train/grad_norm"],
            summary["train/images_per_sec"],
            run_log.format_duration(elapsed / (step - self.start) * (self.total - step)),
            100 * self.eval_seconds / max(elapsed, 1e-9))
        self.chrono, self.interval_eval_seconds = time.time(), 0.0
        return summary
