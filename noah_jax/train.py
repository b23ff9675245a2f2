"""The trainer: one linear function, `train_and_evaluate(config, workdir)`.

Sections, in order: logging, mesh, input, model and optimiser, sharding, update step,
checkpoint restore, evaluation, loop. Data flows one way: config -> source -> global
batch -> model -> loss/metrics -> optimiser -> checkpoint/logs.
"""

from __future__ import annotations

import functools
import logging as logging_lib
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from noah_jax import checkpoint, data, losses, metrics, optim, sharding
from noah_jax.models import create_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LOSSES = ("softmax_xent", "sigmoid_xent", "asl")


def _hide_accelerators_from_tensorflow():
    """TensorFlow (input pipelines, TensorBoard) must never take accelerator memory."""
    try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
    except ImportError:
        return
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")


class _DropLibraryNotices(logging_lib.Filter):
    """Keeps the console and the run log to what the user needs to read.

    Dropped: Orbax's several INFO lines per checkpoint and its warning each time a
    checkpoint is opened read-only on purpose; JAX's INFO notice that a platform it
    probes is absent ("Unable to initialize backend 'tpu'" on every CPU/GPU machine;
    the devices actually used are logged instead). Warnings and errors stay."""

    def filter(self, record):
        if "/orbax/" in record.pathname:
            return record.levelno >= logging_lib.WARNING and "read only" not in record.getMessage()
        if record.pathname.endswith("xla_bridge.py") and record.levelno < logging_lib.WARNING:
            return "Unable to initialize backend" not in record.getMessage()
        return True


def _quiet_library_notices():
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DropLibraryNotices) for f in handler.filters):
        handler.addFilter(_DropLibraryNotices())


RUN_LOG = "log.txt"
_run_log_handler: logging_lib.Handler | None = None


def _attach_run_log(workdir: str) -> None:
    """Copies the log lines (INFO and up) of process 0 into workdir/log.txt, appending
    across restarts. A handler left by an earlier run in this process is replaced."""
    global _run_log_handler
    _detach_run_log()
    if jax.process_index() > 0:
        return
    handler = logging_lib.FileHandler(os.path.join(workdir, RUN_LOG))
    handler.setLevel(logging_lib.INFO)
    handler.setFormatter(logging_lib.Formatter("%(asctime)s %(levelname)s %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_DropLibraryNotices())
    logging_lib.getLogger().addHandler(handler)
    _run_log_handler = handler


def _detach_run_log() -> None:
    global _run_log_handler
    if _run_log_handler is not None:
        logging_lib.getLogger().removeHandler(_run_log_handler)
        _run_log_handler.close()
        _run_log_handler = None


def append_to_run_log(workdir: str, line: str) -> None:
    """Adds `line` to workdir/log.txt if the run got as far as creating it (main.py
    records the error that ended a run there, and prints it once on the console)."""
    path = os.path.join(workdir, RUN_LOG)
    if jax.process_index() == 0 and os.path.exists(path):
        with open(path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR {line}\n")


def _metric_writer(workdir: str):
    """TensorBoard event files on process 0; the readable lines are logged separately."""
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    if jax.process_index() > 0:
        return metric_writers.MultiWriter([])
    return metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)])


def _format_metrics(results: dict[str, float]) -> str:
    return ", ".join(f"{k} {int(v)}" if k.endswith("count") else f"{k} {v:.4f}"
                     for k, v in results.items())


def _format_duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes >= 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    return f"{minutes}m{int(seconds % 60):02d}s"


def duration_in_steps(config: ml_collections.ConfigDict, num_train_examples: int
                      ) -> tuple[int, int]:
    """(total_steps, steps_per_epoch): the one place durations become steps."""
    steps_per_epoch = max(num_train_examples // config.batch_size, 1)
    if (config.total_steps > 0) == (config.num_epochs > 0):
        raise ValueError("set exactly one of config.total_steps and config.num_epochs (> 0); "
                         f"got total_steps={config.total_steps}, num_epochs={config.num_epochs}")
    if config.total_steps > 0:
        return config.total_steps, steps_per_epoch
    return int(round(config.num_epochs * steps_per_epoch)), steps_per_epoch


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


def per_example_loss(config: ml_collections.ConfigDict, logits: jax.Array,
                     labels: jax.Array) -> jax.Array:
    """config.loss on a batch, [B]. Labels: int ids [B], soft targets or multi-hot [B, K]."""
    if config.loss == "softmax_xent":
        # Soft targets (mixup/cutmix) arrive already smoothed by the input pipeline.
        smoothing = config.label_smoothing if labels.ndim == 1 else 0.0
        return losses.softmax_cross_entropy(logits, labels, smoothing)
    if labels.ndim == 1:
        labels = jax.nn.one_hot(labels, logits.shape[-1])
    if config.loss == "sigmoid_xent":
        return losses.sigmoid_binary_cross_entropy(logits, labels)
    if config.loss == "asl":
        return losses.asymmetric_loss(logits, labels, config.asl.gamma_neg,
                                      config.asl.gamma_pos, config.asl.clip)
    raise ValueError(f"config.loss must be one of {LOSSES}, got {config.loss!r}")


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
    batch_axis = sharding.batch_sharding(mesh).spec

    def loss_fn(params, batch_stats, images, labels, rng):
        logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                       train=True, rngs={"dropout": rng},
                                       mutable=["batch_stats"])
        loss = per_example_loss(config, logits, labels).mean()
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
        grad_norm = optax.global_norm(grads)
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


def make_eval_step(model, kind: str = "single"):
    """(params, batch_stats, batch) -> metric sums. kind: 'single' (top-1/top-5),
    'real' (ImageNet-ReaL top-1) or 'multilabel', which also returns the float32
    logits, labels and mask for the host-side mAP."""
    def eval_step(params, batch_stats, batch):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                             train=False)
        if kind == "single":
            return metrics.classification_sums(logits, batch["label"], batch["mask"])
        if kind == "real":
            return metrics.real_accuracy_sums(logits, batch["label"], batch["mask"])
        sums = metrics.multilabel_sums(logits, batch["label"], batch["mask"])
        return sums, (logits.astype(jnp.float32), batch["label"], batch["mask"])
    return eval_step


def multilabel_results(total: dict, rows: list) -> dict[str, float]:
    """Finalised loss plus mAP and CP/CR/CF1/OP/OR/OF1 (sigmoid >= 0.5) over all rows."""
    logits, labels, mask = (np.concatenate([np.asarray(r[i]) for r in rows]) for i in range(3))
    results = metrics.finalize(total)
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    results["mAP"] = metrics.mean_average_precision(logits, labels, mask)
    results.update(metrics.multilabel_f1(scores, labels, mask))
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates; resumes from the newest checkpoint in `workdir`.

    Returns the final evaluation metrics (and `train_step_compilations`).
    """
    # ----------------------------------------------------------------- Logging
    # Nothing is written to the workdir until the config, the dataset and the model
    # have been checked (section "Workdir" below).
    _hide_accelerators_from_tensorflow()
    _quiet_library_notices()

    # ----------------------------------------------------------------- Mesh
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.model)
    data_sharding = sharding.batch_sharding(mesh)

    # ----------------------------------------------------------------- Input
    source = data.get_source(config.dataset, seed=config.seed, augment=config.augment,
                             label_smoothing=config.label_smoothing)
    multilabel = source.multilabel
    if config.loss not in LOSSES:
        raise ValueError(f"config.loss must be one of {LOSSES}, got {config.loss!r}")
    if multilabel and config.loss == "softmax_xent":
        raise ValueError(f"dataset {config.dataset.name!r} is multi-label: set config.loss "
                         "to 'sigmoid_xent' or 'asl'")
    for name, size in (("batch_size", config.batch_size), ("eval_batch_size",
                                                           config.eval_batch_size)):
        if size % jax.device_count() or size % jax.process_count():
            raise ValueError(f"config.{name}={size} must be divisible by the "
                             f"{jax.device_count()} devices")
    if config.batch_size % config.grad_accum_steps or (
            config.batch_size // config.grad_accum_steps) % jax.device_count():
        raise ValueError(f"batch_size={config.batch_size} must split into grad_accum_steps="
                         f"{config.grad_accum_steps} micro-batches divisible by the "
                         f"{jax.device_count()} devices")
    local_batch = config.batch_size // jax.process_count()
    local_eval_batch = config.eval_batch_size // jax.process_count()
    total_steps, steps_per_epoch = duration_in_steps(config, source.num_train_examples)
    eval_every = config.eval_every_steps or steps_per_epoch

    # ----------------------------------------------------------------- Model and optimiser
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    model = create_model(config.model.name, num_classes=source.num_classes,
                         head=config.model.head, dtype=DTYPES[config.dtype],
                         **config.model.overrides.to_dict())
    schedule = optim.learning_rate_schedule(config, total_steps=total_steps,
                                            steps_per_epoch=steps_per_epoch)
    tx = optim.make_optimizer(config, schedule)

    init_state = functools.partial(init_train_state, model, tx, source.image_shape,
                                   ema=config.ema_decay > 0)

    # ----------------------------------------------------------------- Sharding
    init_rng = jax.random.key(config.seed)
    abstract_state = jax.eval_shape(init_state, init_rng)
    state_sharding = sharding.state_shardings(abstract_state, mesh, fsdp=config.fsdp,
                                              fsdp_min_size=config.fsdp_min_size)
    overrides = {k: v for k, v in config.model.overrides.to_dict().items() if v is not None}
    meta = {"model": config.model.name, "head": config.model.head,
            "num_classes": source.num_classes, "overrides": overrides,
            "dataset": config.dataset.name}

    # ----------------------------------------------------------------- Workdir
    # The config, the dataset and the model are valid: from here on the run writes.
    os.makedirs(workdir, exist_ok=True)
    _attach_run_log(workdir)
    writer = _metric_writer(workdir)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    logging.info("%d device(s) of %s (%s) in %d process(es); mesh %s", jax.device_count(),
                 jax.devices()[0].platform, jax.devices()[0].device_kind, jax.process_count(),
                 dict(mesh.shape))
    num_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
    logging.info("model %s (head %s%s), %s parameters, %s compute; config in %s",
                 config.model.name, config.model.head,
                 f", overrides {overrides}" if overrides else "", f"{num_params:,}",
                 config.dtype, os.path.join(workdir, "config.json"))
    logging.info("data %s: %s training and %s evaluation images, %d classes, batch %d",
                 config.dataset.name, f"{source.num_train_examples:,}",
                 f"{source.num_eval_examples:,}", source.num_classes, config.batch_size)

    # ----------------------------------------------------------------- Update step
    train_step = jax.jit(make_train_step(model, tx, config, schedule, mesh,
                                         multilabel=multilabel),
                         in_shardings=(state_sharding, data_sharding),
                         out_shardings=(state_sharding, None), donate_argnums=0)
    # Multi-label steps return their rows replicated, so every process holds the whole
    # evaluation set's scores for the exact mAP.
    eval_steps = {kind: jax.jit(make_eval_step(model, kind),
                                out_shardings=(None, sharding.replicated(mesh))
                                if kind == "multilabel" else None)
                  for kind in ("single", "real", "multilabel")}

    # ----------------------------------------------------------------- Checkpoint restore
    ckpt_dir = os.path.join(workdir, "checkpoints")
    mngr = checkpoint.manager(ckpt_dir, max_to_keep=config.keep_checkpoints)
    latest = mngr.latest_step()
    if latest is not None:
        logging.info("resuming from %s step %d", ckpt_dir, latest)
        state = checkpoint.restore_state(
            mngr, latest, sharding.with_shardings(abstract_state, state_sharding))
    else:
        state = jax.jit(init_state, out_shardings=state_sharding)(init_rng)
        if config.init_from.path:
            logging.info("initialising from %s (drop_head=%s)", config.init_from.path,
                         config.init_from.drop_head)
            target = {"params": state["params"], "batch_stats": state["batch_stats"]}
            variables, _ = checkpoint.restore_model(config.init_from.path, target,
                                                    drop_head=config.init_from.drop_head,
                                                    resize_pos_embed=True)
            state = jax.jit(functools.partial(_with_variables, ema=config.ema_decay > 0),
                            out_shardings=state_sharding, donate_argnums=0)(state, variables)
    start_step = int(state["step"])

    # ----------------------------------------------------------------- Evaluation
    # (name, kind, batches) of the dataset's own evaluation set, and of the extra ones
    # (ImageNet-V2 / ReaL), which run only at the end of training and with eval_only.
    main_set = ("", "multilabel" if multilabel else "single", source.eval_batches)
    extra_sets = [(f"{name}/", extra.kind, extra.batches)
                  for name, extra in source.extra_evals.items()]

    def evaluate_set(params, kind: str, batches) -> dict[str, float]:
        total, rows = None, []
        for batch in batches(local_batch_size=local_eval_batch,
                             process_index=jax.process_index(),
                             process_count=jax.process_count()):
            batch = sharding.global_batch(batch, data_sharding)
            out = eval_steps[kind](params, state["batch_stats"], batch)
            if kind == "multilabel":
                out, row = out
                rows.append(jax.device_get(row))
            total = metrics.add(total, out)
        return multilabel_results(total, rows) if kind == "multilabel" else metrics.finalize(
            total)

    def evaluate(step: int, final: bool = True) -> dict[str, float]:
        results = {}
        weights = {"eval": state["params"]}
        if "ema_params" in state:
            weights["eval_ema"] = state["ema_params"]
        for prefix, params in weights.items():
            for name, kind, batches in [main_set, *(extra_sets if final else [])]:
                for k, v in evaluate_set(params, kind, batches).items():
                    results[f"{prefix}/{name}{k}"] = v
        writer.write_scalars(step, {k: v for k, v in results.items() if not k.endswith("count")})
        logging.info("step %d: %s", step, _format_metrics(results))
        return results

    def check_finite():
        bad = int(state["nonfinite_step"])
        if bad >= 0:
            mngr.wait_until_finished()
            last = mngr.latest_step()
            kept = (f"the last good checkpoint, step {last}, is intact" if last is not None
                    else "no checkpoint had been written yet")
            raise FloatingPointError(
                f"non-finite loss, gradient or parameters at step {bad}: training stopped "
                f"before writing anything after it ({kept}). Lower the learning rate, enable "
                "grad_clip_norm or compute in float32.")

    if config.eval_only:
        if latest is None and not config.init_from.path:
            raise ValueError("config.eval_only needs a checkpoint: a workdir with one, or "
                             "config.init_from.path (e.g. the output of noah_jax.convert)")
        results = evaluate(start_step)
        mngr.close()
        writer.flush()
        _detach_run_log()
        return results

    # ----------------------------------------------------------------- Loop
    logging.info("training for %d steps (%d per epoch) from step %d, evaluating every %d",
                 total_steps, steps_per_epoch, start_step, eval_every)
    batches = source.train_batches(start_step=start_step, local_batch_size=local_batch,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
    # Throughput counts training time only; the ETA counts everything (eval included).
    pending, results = [], {}
    loop_start = chrono = time.time()
    eval_seconds = interval_eval_seconds = 0.0
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch = sharding.global_batch(next(batches), data_sharding)
            state, step_metrics = train_step(state, batch)
            pending.append(step_metrics)
            if step % config.log_every_steps == 0 or step == total_steps:
                check_finite()
                pending = jax.device_get(pending)
                summary = {f"train/{k}": float(np.mean([m[k] for m in pending]))
                           for k in pending[0]}
                seconds = max(time.time() - chrono - interval_eval_seconds, 1e-9)
                summary["train/steps_per_sec"] = len(pending) / seconds
                summary["train/images_per_sec"] = len(pending) * config.batch_size / seconds
                writer.write_scalars(step, summary)
                elapsed = time.time() - loop_start
                logging.info(
                    "step %d/%d (epoch %.1f): loss %.4f, accuracy %.4f, lr %.3g, grad_norm %.3g;"
                    " %.1f images/s, ETA %s (%.0f%% of the time in evaluation)", step,
                    total_steps, step / steps_per_epoch, summary["train/loss"],
                    summary["train/accuracy"], summary["train/learning_rate"],
                    summary["train/grad_norm"], summary["train/images_per_sec"],
                    _format_duration(elapsed / (step - start_step) * (total_steps - step)),
                    100 * eval_seconds / max(elapsed, 1e-9))
                pending, chrono, interval_eval_seconds = [], time.time(), 0.0
            if step % eval_every == 0 or step == total_steps:
                jax.block_until_ready(state["step"])  # the queued steps count as training
                eval_start = time.time()
                results = evaluate(step, final=step == total_steps)
                interval_eval_seconds += time.time() - eval_start
                eval_seconds += time.time() - eval_start
            if step % config.checkpoint_every_steps == 0 or step == total_steps:
                check_finite()
                checkpoint.save_state(mngr, step, state, meta)
        if start_step >= total_steps:  # already finished: just report
            results = evaluate(start_step)
    finally:
        # Also on errors (the NaN guard): the last good checkpoint finishes writing.
        mngr.wait_until_finished()
        mngr.close()
        writer.flush()
        _detach_run_log()
    results["train_step_compilations"] = train_step._cache_size()  # pylint: disable=protected-access
    return results


def _with_variables(state, variables, ema: bool):
    state = dict(state, params=variables["params"], batch_stats=variables["batch_stats"])
    if ema:
        state["ema_params"] = variables["params"]
    return state
