"""noah_jax.train.trainer.make_train_step jitted as the trainer jits it: traced once, then reused.

A retrace per step (a Python value in the state, a changing pytree) would compile the
model again every step; chex.assert_max_traces counts the traces directly.
"""

import functools
import importlib

import chex
import jax
import numpy as np
import pytest

from noah_jax.train import optim, sharding, trainer
from noah_jax.models import create_model

BATCH = 16  # two examples on each of the 8 fake devices


def tiny_config():
    """The README demo (a NOAH ViT on 32 px digits) cut to one narrow block."""
    config = importlib.import_module("configs.vit_noah").get_config("demo")
    config.model.overrides.update(dict(depth=1, embed_dim=32, attn_heads=2))
    config.num_epochs, config.total_steps = 0.0, 10
    return config


def random_batch(rng, size, data_sharding):
    local = {"image": rng.standard_normal((size, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 10, size).astype(np.int32)}
    return sharding.global_batch(local, data_sharding)


def test_train_step_is_traced_once_for_batches_of_one_shape():
    chex.clear_trace_counter()
    config = tiny_config()
    mesh = sharding.create_mesh()
    model = create_model(config.model.name, num_classes=10, head=config.model.head,
                         **config.model.overrides.to_dict())
    schedule = optim.learning_rate_schedule(config, total_steps=10, steps_per_epoch=5)
    tx = optim.make_optimizer(config, schedule)
    init = functools.partial(trainer.init_train_state, model, tx, (32, 32, 3), ema=False)
    state_sharding = sharding.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
    data_sharding = sharding.batch_sharding(mesh)
    state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(0))
    initial_params = jax.device_get(state["params"])

    counted_step = chex.assert_max_traces(
        trainer.make_train_step(model, tx, config, schedule, mesh), n=1)
    step = jax.jit(counted_step, in_shardings=(state_sharding, data_sharding),
                   out_shardings=(state_sharding, None), donate_argnums=0)
    rng = np.random.default_rng(0)
    for expected_step in (1, 2, 3):
        state, metrics = step(state, random_batch(rng, BATCH, data_sharding))
        assert int(state["step"]) == expected_step
        assert np.isfinite(float(metrics["loss"]))
    assert int(state["nonfinite_step"]) == -1
    updated = jax.device_get(state["params"])
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(updated),
                                                        jax.tree.leaves(initial_params))
               if a.ndim > 1)

    # The check bites: a batch of another shape is a second trace.
    with pytest.raises(AssertionError, match="traced > 1 times"):
        step(state, random_batch(rng, BATCH // 2, data_sharding))
