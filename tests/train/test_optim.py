"""Schedules and optimisers against closed forms and hand-computed PyTorch updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from noah_jax.train import optim


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


def test_cosine_schedule_with_warmup_over_the_absolute_step():
    """timm's CosineLRScheduler with warmup_prefix=False: a linear warm-up from
    warmup_start_lr, and the cosine over the whole run, the warm-up included."""
    c = config(**{"schedule.name": "cosine", "schedule.base_lr": 5e-4,
                  "schedule.base_batch_size": 512, "schedule.warmup_epochs": 2.0,
                  "schedule.warmup_start_lr": 1e-6, "schedule.end_lr": 1e-5,
                  "schedule.per_epoch": False})
    lr = optim.learning_rate_schedule(c, total_steps=120, steps_per_epoch=10)
    cosine = lambda t: 1e-5 + (5e-4 - 1e-5) * 0.5 * (1 + np.cos(np.pi * t / 120))  # noqa: E731
    np.testing.assert_allclose(lr(0), 1e-6, rtol=1e-6)
    np.testing.assert_allclose(lr(10), 1e-6 + (5e-4 - 1e-6) / 2, rtol=1e-6)  # half-way
    np.testing.assert_allclose([lr(20), lr(70), lr(119)], [cosine(20), cosine(70), cosine(119)],
                               rtol=1e-5)


def test_per_epoch_schedules_hold_each_epochs_value_and_lag():
    c = config(**{"schedule.name": "cosine", "schedule.base_lr": 5e-4,
                  "schedule.base_batch_size": 512, "schedule.warmup_epochs": 2.0,
                  "schedule.warmup_start_lr": 1e-6})
    assert c.schedule.per_epoch  # the base config's: as the reference
    lr = optim.learning_rate_schedule(c, total_steps=120, steps_per_epoch=10)
    per_step = optim.learning_rate_schedule(
        config(**{"schedule.name": "cosine", "schedule.base_lr": 5e-4,
                  "schedule.base_batch_size": 512, "schedule.warmup_epochs": 2.0,
                  "schedule.warmup_start_lr": 1e-6, "schedule.per_epoch": False}),
        total_steps=120, steps_per_epoch=10)
    for epoch in range(12):
        values = [float(lr(epoch * 10 + i)) for i in range(10)]
        np.testing.assert_allclose(values, float(per_step(epoch * 10)), rtol=1e-6)
    c.schedule.epoch_lag = 1  # DeiT's loop: epoch e >= 1 at the value for e - 1
    lagged = optim.learning_rate_schedule(c, total_steps=120, steps_per_epoch=10)
    np.testing.assert_allclose([lagged(0), lagged(15), lagged(35)],
                               [lr(0), lr(0), lr(25)], rtol=1e-6)
    c.schedule.epoch_lag = -1
    with pytest.raises(ValueError, match="epoch_lag must be >= 0"):
        optim.learning_rate_schedule(c, total_steps=120, steps_per_epoch=10)


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
                  "optimizer.weight_decay": 0.01, "schedule.base_batch_size": 512,
                  "optimizer.decay_rule": "nowd_bn"})
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
                  "optimizer.eps": 1e-6, "grad_clip_norm": 0.1,
                  "optimizer.decay_rule": "timm"})
    out = run(optim.make_optimizer(c, lambda step: 0.01), steps=1)
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(GRADS)))
    for name, decay in (("kernel", 0.5), ("bias", 0.0)):
        g = np.asarray(GRADS[name], np.float64) * 0.1 / norm  # clipped
        m, v = 0.1 * g / (1 - 0.9), 0.001 * g**2 / (1 - 0.999)  # bias-corrected, step 1
        p = np.asarray(PARAMS[name], np.float64)
        expected = p - 0.01 * (m / (np.sqrt(v) + 1e-6) + decay * p)
        np.testing.assert_allclose(out[name], expected, rtol=1e-5)


def test_decay_rules_on_the_reference_names():
    """The rules read the reference's names: 'all' decays everything (main.py without
    --nowd-bn), 'nowd_bn' only '...weight' of ndim > 1 without 'attention'
    (utils/misc.py get_parameters), 'timm' all but vectors, '.bias' and the model's
    no_weight_decay() (here DeiT's pos_embed, a [1, L, D] tensor)."""
    from noah_jax.models import create_model

    model = create_model("deit_tiny_patch16_224", num_classes=10, depth=1, img_size=32,
                         patch_size=16)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    everything = optim.decayed_names("all", params, model)
    assert everything[1] == [] and "pos_embed" in everything[0]
    decayed, kept = optim.decayed_names("timm", params, model)
    assert "pos_embed" in kept and "blocks.0.attn.qkv.bias" in kept
    assert "blocks.0.norm1.weight" in kept and "head.query.weight" in decayed
    assert "patch_embed.proj.weight" in decayed
    decayed, kept = optim.decayed_names("nowd_bn", params, model)
    assert "pos_embed" in kept and "head.query.weight" in decayed
    tree = {"attention": {"kernel": jnp.zeros((2, 2))}, "fc": {"kernel": jnp.zeros((2, 2))}}
    assert optim.decay_mask("nowd_bn")(tree) == {"attention": {"kernel": False},
                                                 "fc": {"kernel": True}}
    with pytest.raises(ValueError, match="decay_rule must be one of"):
        optim.decay_mask("matrices")
