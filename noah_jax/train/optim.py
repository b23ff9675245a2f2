"""Optimisers, weight-decay groups and learning-rate schedules from the config (optax).

Everything here follows the reference's training code, so that a recipe trains as the
reference did (tests/train/test_recipe_parity.py checks each against the reference's own
optimiser steps and schedules in ../shared/parity/recipes/):

- Weight-decay groups (`config.optimizer.decay_rule`), stated on the reference's
  parameter names (`noah_jax.models.conversion.torch_parameter_keys`), as its code states them:
    'all'      every parameter: main.py:142 passes `model.parameters()` to SGD when the
               command has no `--nowd-bn` (the ResNet and MobileNetV2 recipes).
    'nowd_bn'  utils/misc.py:51 `get_parameters` (`--nowd-bn`: MobileNetV3,
               ShuffleNetV2): only names containing 'weight' with more than one
               dimension and without 'attention'.
    'timm'     timm's optimiser factory (`add_weight_decay` / `param_groups_weight_decay`:
               DeiT, PVT, Mixer, gMLP): none on one-dimensional parameters, names ending
               '.bias' and the model's `no_weight_decay()` (DeiT: pos_embed).
- SGD is PyTorch's (coupled decay added to the gradient before momentum); AdamW is
  PyTorch's (decoupled decay, lr x wd x p). Gradient clipping by global norm comes first.
- The learning rate is set once per epoch (`schedule.per_epoch`), as main.py's
  `adjust_learning_rate(optimizer, epoch, 0, n)` and timm's epoch schedulers do, from a
  curve over the absolute epoch: a linear warm-up from `warmup_start_lr` (timm's
  warmup_lr_init), then step / cosine / linear decay or constant, all measured from the
  start of training (timm's warmup_prefix=False: the cosine spans the warm-up too).
  `schedule.epoch_lag` = 1 is DeiT's and PVT's loop, which calls `scheduler.step(epoch)`
  after epoch e, so epoch e >= 1 trains at the curve's value for e - 1 (and epoch 0 at
  the warm-up start); Mixer/gMLP (timm train.py, `step(epoch + 1)`) and the CNNs use the
  value of their own epoch. `per_epoch=False` follows the same curve step by step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax.numpy as jnp
import ml_collections
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from noah_jax.train import durations
from noah_jax.errors import ConfigError

SCHEDULES = ("step", "cosine", "linear", "constant")


def learning_rate_schedule(config: ml_collections.ConfigDict, *, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
    """The learning rate of each step (module docstring).

    The peak is `base_lr * batch_size / base_batch_size` (the linear scaling rule the
    recipes state their learning rates with). The warm-up (`schedule.warmup_epochs` or
    `warmup_steps`) and the step schedule's boundaries (`schedule.decay_epochs` or
    `decay_steps`) become steps in `noah_jax.train.durations`.
    """
    s = config.schedule
    if s.name not in SCHEDULES:
        raise ConfigError(f"schedule.name must be step, cosine, linear or constant; got "
                          f"{s.name!r}")
    if s.epoch_lag < 0:
        raise ConfigError(f"schedule.epoch_lag must be >= 0, got {s.epoch_lag}")
    peak = s.base_lr * config.batch_size / s.base_batch_size
    in_steps = functools.partial(durations.steps, s, steps_per_epoch=steps_per_epoch,
                                 batch_size=config.batch_size, total_steps=total_steps,
                                 where="config.schedule")
    warmup = in_steps("warmup")
    boundaries = jnp.asarray(in_steps("decay") if s.name == "step" else (), jnp.float32)
    total = float(max(total_steps, 1))
    # Read once: the schedule does not change if the config does afterwards.
    name, per_epoch, lag = s.name, s.per_epoch, s.epoch_lag * steps_per_epoch
    start, end, factor = s.warmup_start_lr, s.end_lr, s.decay_factor

    def schedule(count):
        t = jnp.maximum(jnp.asarray(count, jnp.float32) - lag, 0.0)
        if per_epoch:  # the value at the start of the epoch, held through it
            t = jnp.floor(t / steps_per_epoch) * steps_per_epoch
        if name == "cosine":
            # (1 + cos(pi t / T)) / 2 as sin^2(pi (T - t) / 2T): the same curve, without
            # float32's cancellation near the end (1e-7 relative there, not 1e-4).
            lr = end + (peak - end) * jnp.square(jnp.sin(0.5 * jnp.pi * (total - t) / total))
        elif name == "linear":
            lr = end + (peak - end) * ((total - t) / total)  # (T - t): exact in float32
        elif name == "step":  # x factor at each boundary reached (MultiStepLR)
            lr = peak * factor ** jnp.sum(t[..., None] >= boundaries, axis=-1)
        else:
            lr = jnp.full_like(t, peak)
        if warmup:
            lr = jnp.where(t < warmup, start + (peak - start) * t / warmup, lr)
        return lr

    return schedule


# ----------------------------------------------------------------------------------
# Weight-decay groups.
# ----------------------------------------------------------------------------------
def _decay_all(name: str, shape: tuple[int, ...], skip: frozenset[str]) -> bool:
    return True


def _decay_nowd_bn(name: str, shape: tuple[int, ...], skip: frozenset[str]) -> bool:
    return "weight" in name and len(shape) > 1 and "attention" not in name


def _decay_timm(name: str, shape: tuple[int, ...], skip: frozenset[str]) -> bool:
    return not (len(shape) <= 1 or name.endswith(".bias") or name in skip)


# (reference key, torch shape, the model's no_weight_decay()) -> decayed?
DECAY_RULES: dict[str, Callable[[str, tuple[int, ...], frozenset[str]], bool]] = {
    "all": _decay_all, "nowd_bn": _decay_nowd_bn, "timm": _decay_timm}


def decay_mask(rule: str, model: Optional[Any] = None) -> Callable[[Any], Any]:
    """params -> a tree of bools like params: which parameters `rule` decays.

    `model` (a zoo model) names the parameters as the reference does and gives its
    `no_weight_decay()`; without it, the generic names (`kernel` -> `weight`, module
    paths joined by '.') and no exceptions."""
    if rule not in DECAY_RULES:
        raise ConfigError(f"optimizer.decay_rule must be one of {sorted(DECAY_RULES)}, "
                          f"got {rule!r}")
    from noah_jax.models.conversion import torch_parameter_keys

    decides = DECAY_RULES[rule]
    skip = frozenset(model.no_weight_decay()) if model is not None else frozenset()

    def mask(params):
        keys = torch_parameter_keys(params, model)
        flat = flatten_dict(dict(params))
        return unflatten_dict({path: decides(*keys[path], skip) for path in flat})

    return mask


def decayed_names(rule: str, params, model: Optional[Any] = None) -> tuple[list, list]:
    """(decayed, not decayed): the reference's keys of `params` under `rule`, in the
    order of the parameters; for reading and for tests against the reference's groups."""
    from noah_jax.models.conversion import torch_parameter_keys

    keys = torch_parameter_keys(params, model)
    flags = flatten_dict(decay_mask(rule, model)(params))
    decayed = [keys[p][0] for p, d in flags.items() if d]
    return decayed, [keys[p][0] for p, d in flags.items() if not d]


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   model: Optional[Any] = None) -> optax.GradientTransformation:
    """config.optimizer as an optax chain; `model` names the parameters for the weight-
    decay rule (`decay_mask`). The mask is always applied (every parameter, for 'all'),
    so the optimiser state has one layout whatever the rule."""
    o = config.optimizer
    mask = decay_mask(o.decay_rule, model)
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
