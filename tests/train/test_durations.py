"""Durations in steps, epochs, examples or percent, converted in one place."""

import ml_collections
import numpy as np
import pytest

from configs import common
from noah_jax.train import durations, optim


def schedule_node(**fields):
    return ml_collections.ConfigDict({"warmup_steps": 0, "warmup_epochs": 0.0,
                                      "warmup_examples": 0, "warmup_percent": 0.0,
                                      "decay_steps": (), "decay_epochs": (), **fields})


@pytest.mark.parametrize("fields,expected", [
    ({"warmup_steps": 120}, 120),
    ({"warmup_epochs": 2.5}, 250),                # 100 steps per epoch
    ({"warmup_examples": 64_000}, 250),           # batch 256
    ({"warmup_percent": 5.0}, 50),                # of 1,000 steps
    ({}, 0),                                      # nothing set: no warm-up
])
def test_each_unit_becomes_steps(fields, expected):
    got = durations.steps(schedule_node(**fields), "warmup", steps_per_epoch=100,
                          batch_size=256, total_steps=1000)
    assert got == expected and isinstance(got, int)


def test_tuples_convert_element_by_element():
    node = schedule_node(decay_epochs=(30.0, 60.0, 90.0))
    assert durations.steps(node, "decay", steps_per_epoch=5004, batch_size=256) == (
        150_120, 300_240, 450_360)
    assert durations.steps(schedule_node(), "decay", steps_per_epoch=10, batch_size=1) == ()


def test_two_units_at_once_are_refused_with_the_fix():
    node = schedule_node(warmup_epochs=5.0, warmup_steps=500)
    with pytest.raises(ValueError, match=r"config.schedule.warmup_steps=500.*"
                                         r"config.schedule.warmup_epochs=5.0.*set only one"):
        durations.steps(node, "warmup", steps_per_epoch=10, batch_size=8,
                        where="config.schedule")


def test_the_run_length_is_total_steps_or_num_epochs():
    c = common.base_config()
    c.batch_size = 100
    c.num_epochs, c.total_steps = 2.5, 0
    assert durations.total_and_epoch_steps(c, 1050) == (25, 10)
    c.num_epochs, c.total_steps = 0.0, 7
    assert durations.total_and_epoch_steps(c, 1050) == (7, 10)
    c.num_epochs = 1.0
    with pytest.raises(ValueError, match="exactly one of config.total_steps and config.num_epochs"):
        durations.total_and_epoch_steps(c, 1050)


def test_warmup_and_decay_in_steps_give_the_schedule_epochs_give():
    epochs = common.base_config()
    epochs.schedule.update(name="step", warmup_epochs=1.0, decay_epochs=(3.0, 6.0),
                           per_epoch=False)
    steps = common.base_config()
    steps.schedule.update(name="step", warmup_epochs=0.0, warmup_steps=10,
                          decay_epochs=(), decay_steps=(30, 60), per_epoch=False)
    a = optim.learning_rate_schedule(epochs, total_steps=100, steps_per_epoch=10)
    b = optim.learning_rate_schedule(steps, total_steps=100, steps_per_epoch=10)
    grid = np.arange(101)
    np.testing.assert_array_equal(np.asarray(a(grid)), np.asarray(b(grid)))
    assert float(b(5)) == pytest.approx(0.05) and float(b(65)) == pytest.approx(0.001)
