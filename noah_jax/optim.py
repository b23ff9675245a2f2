"""Optimisers and learning-rate schedules from the config (optax), per step."""

from __future__ import annotations

import functools

import jax
import ml_collections
import optax

from noah_jax import durations
from noah_jax.errors import ConfigError


def learning_rate_schedule(config: ml_collections.ConfigDict, *, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up from 0, then step / cosine / linear decay or constant.

    The peak is `base_lr * batch_size / base_batch_size` (the linear scaling rule the
    recipes state their learning rates with). The warm-up (`schedule.warmup_epochs` or
    `warmup_steps`) and the step schedule's boundaries (`schedule.decay_epochs` or
    `decay_steps`) become steps in `noah_jax.durations`.
    """
    s = config.schedule
    peak = s.base_lr * config.batch_size / s.base_batch_size
    in_steps = functools.partial(durations.steps, s, steps_per_epoch=steps_per_epoch,
                                 batch_size=config.batch_size, total_steps=total_steps,
                                 where="config.schedule")
    warmup = in_steps("warmup")
    decay_steps = max(total_steps - warmup, 1)
    if s.name == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=s.end_lr / peak if peak else 0)
    elif s.name == "linear":
        main = optax.linear_schedule(peak, s.end_lr, decay_steps)
    elif s.name == "step":
        # Boundaries count from the start of training, as the reference's MultiStepLR.
        boundaries = {b - warmup: s.decay_factor for b in in_steps("decay")}
        main = optax.piecewise_constant_schedule(peak, boundaries)
    elif s.name == "constant":
        main = optax.constant_schedule(peak)
    else:
        raise ConfigError(f"schedule.name must be step, cosine, linear or constant; got {s.name!r}")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(params):
    """Weight decay on weights with more than one dimension only (no biases, norms)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
    o = config.optimizer
    mask = decay_mask if o.decay_only_matrices else None
    if o.name == "sgd":
        # PyTorch SGD: the (coupled) weight decay is added to the gradient before momentum.
        optimizer = optax.chain(
            optax.add_decayed_weights(o.weight_decay, mask),
            optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
    elif o.name == "adamw":
        optimizer = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                                weight_decay=o.weight_decay, mask=mask)
    else:
        raise ConfigError(f"optimizer.name must be sgd or adamw; got {o.name!r}")
    if config.grad_clip_norm > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
    return optimizer
