"""Schedules and optimisers against closed forms and hand-computed PyTorch updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from noah_jax import optim


def config(**changes):
    c = common.base_config()
    c.batch_size = 512
    for key, value in changes.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return c


def test_step_schedule_scales_with_batch_and_decays_at_epoch_boundaries():
    c = config(**{"schedule.name": "step", "schedule.base_lr": 0.1,
                  "schedule.base_batch_size": 256, "schedule.decay_epochs": (3.0, 6.0)})
    lr = optim.learning_rate_schedule(c, total_steps=100, steps_per_epoch=10)
    peak = 0.1 * 512 / 256
    np.testing.assert_allclose([lr(0), lr(29), lr(30), lr(59), lr(60), lr(99)],
                               [peak, peak, peak / 10, peak / 10, peak / 100, peak / 100],
                               rtol=1e-6)


def test_cosine_schedule_with_warmup_ends_at_end_lr():
    c = config(**{"schedule.name": "cosine", "schedule.base_lr": 5e-4,
                  "schedule.base_batch_size": 512, "schedule.warmup_epochs": 2.0,
                  "schedule.end_lr": 1e-5})
    lr = optim.learning_rate_schedule(c, total_steps=120, steps_per_epoch=10)
    np.testing.assert_allclose(lr(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(lr(10), 2.5e-4, rtol=1e-6)    # half-way through warm-up
    np.testing.assert_allclose(lr(20), 5e-4, rtol=1e-6)      # peak
    mid = 1e-5 + (5e-4 - 1e-5) * 0.5 * (1 + np.cos(np.pi * 50 / 100))
    np.testing.assert_allclose(lr(70), mid, rtol=1e-5)
    np.testing.assert_allclose(lr(120), 1e-5, rtol=1e-5)


def test_linear_and_constant_schedules():
    c = config(**{"schedule.name": "linear", "schedule.base_lr": 1.0,
                  "schedule.base_batch_size": 512, "schedule.end_lr": 0.0})
    lr = optim.learning_rate_schedule(c, total_steps=10, steps_per_epoch=5)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [1.0, 0.5, 0.0], atol=1e-7)
    c.schedule.name = "constant"
    np.testing.assert_allclose(optim.learning_rate_schedule(c, total_steps=10,
                                                            steps_per_epoch=5)(7), 1.0)
    c.schedule.name = "exp"
    with pytest.raises(ValueError, match="step, cosine, linear or constant"):
        optim.learning_rate_schedule(c, total_steps=10, steps_per_epoch=5)


PARAMS = {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([0.5, -1.0])}
GRADS = {"kernel": jnp.array([[0.1, 0.2], [-0.3, 0.4]]), "bias": jnp.array([1.0, 2.0])}


def run(tx, steps=2):
    params, state = PARAMS, tx.init(PARAMS)
    for _ in range(steps):
        updates, state = tx.update(GRADS, state, params)
        params = jax.tree.map(jnp.add, params, updates)
    return params


def test_sgd_matches_pytorch_with_masked_coupled_weight_decay():
    c = config(**{"optimizer.name": "sgd", "optimizer.momentum": 0.9,
                  "optimizer.weight_decay": 0.01, "schedule.base_batch_size": 512})
    out = run(optim.make_optimizer(c, lambda step: 0.1))
    # torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01 on the kernel only), by hand.
    for name, decay in (("kernel", 0.01), ("bias", 0.0)):
        p, buf = np.asarray(PARAMS[name], np.float64), None
        for _ in range(2):
            g = np.asarray(GRADS[name], np.float64) + decay * p
            buf = g if buf is None else 0.9 * buf + g
            p = p - 0.1 * buf
        np.testing.assert_allclose(out[name], p, rtol=1e-6)


def test_adamw_decays_matrices_only_and_clips_by_global_norm():
    c = config(**{"optimizer.name": "adamw", "optimizer.weight_decay": 0.5,
                  "optimizer.eps": 1e-6, "grad_clip_norm": 0.1})
    out = run(optim.make_optimizer(c, lambda step: 0.01), steps=1)
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(GRADS)))
    for name, decay in (("kernel", 0.5), ("bias", 0.0)):
        g = np.asarray(GRADS[name], np.float64) * 0.1 / norm  # clipped
        m, v = 0.1 * g / (1 - 0.9), 0.001 * g**2 / (1 - 0.999)  # bias-corrected, step 1
        p = np.asarray(PARAMS[name], np.float64)
        expected = p - 0.01 * (m / (np.sqrt(v) + 1e-6) + decay * p)
        np.testing.assert_allclose(out[name], expected, rtol=1e-5)
