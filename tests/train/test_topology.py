"""Checkpoints across topologies: a run resumed on other processes, devices and shardings.

A real 2-process cluster (gloo collectives, 2 fake CPU devices per process) trains
through main.py with FSDP-sharded parameters and writes checkpoints. From its step 2,
1 process on 1 device (main.py in a subprocess) and, at the same time, this test
process on its 8 devices without FSDP resume; the 8-device run writes an unsharded
step 3, from which an FSDP run on the same 8 devices resumes. Each resumed run takes
the trainer's own restore path (main.py or `train_and_evaluate` on a workdir holding
the checkpoint), with `checkpoint.restore_state` wrapped to record what it returned,
and:

  - the restored train state (params, batch_stats, opt_state, ema_params, step) is the
    checkpoint as stored, read back as numpy without a target, bit for bit;
  - it has the resuming run's shardings, not the writer's;
  - the step trained after the restore gives the state that the writer's own next step
    gave (to rounding: another device count sums in another order).

The model is a one-block ResNet (BatchNorm statistics included, 84k parameters) on
16 px synthetic images, trained by SGD with momentum at a constant learning rate. With
AdamW, parameters whose gradient is exactly zero (the NOAH query bias) would move by
the learning rate times the sign of reduction-order noise (see test_train's two-process
test) and could not be compared after a step; with SGD they move by that noise only.
"""

import contextlib
import importlib
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P

from helpers import free_port, leaves_by_name, set_fields, shardings_by_name
from noah_jax.train import checkpoint, trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs" / "resnet18_noah.py")
TIMEOUT_S = 300

# The ResNet-18 recipe, shrunk. '__' separates the parts of a field's name.
TINY = {
    "model__overrides__stage_sizes": (1,),
    "dataset__name": "synthetic", "dataset__image_size": 16, "dataset__num_classes": 10,
    "dataset__num_train_examples": 64, "dataset__num_eval_examples": 16,
    "batch_size": 16, "eval_batch_size": 16, "num_epochs": 0.0, "total_steps": 3,
    "schedule__name": "constant", "schedule__base_lr": 0.4,
    "schedule__base_batch_size": 64, "ema_decay": 0.5,
    "log_every_steps": 1, "eval_every_steps": 3, "checkpoint_every_steps": 2,
    "keep_checkpoints": 3,
    # Arrays of 64 values or more are sharded: the kernels, the BatchNorm parameters
    # and statistics (64 channels); the head's biases (40 values) stay replicated.
    "fsdp_min_size": 64,
}
KERNEL = "params/layer1_0/conv2/kernel"     # [3, 3, 64, 64]: FSDP splits axis 2
STATS = "batch_stats/layer1_0/bn2/mean"     # [64]
BIAS = "params/head/query/bias"             # [40]: below fsdp_min_size


def tiny_config(**changes):
    config = importlib.import_module("configs.resnet18_noah").get_config()
    return set_fields(config, **{**TINY, **changes})


def main_command(workdir, **changes) -> list[str]:
    """main.py's arguments for the config of `tiny_config(**changes)`."""
    return [str(ROOT / "main.py"), f"--config={RECIPE}", f"--workdir={workdir}",
            *(f"--config.{key.replace('__', '.')}={value}"
              for key, value in {**TINY, **changes}.items())]


def stored_state(directory, step: int) -> tuple[dict[str, np.ndarray], dict]:
    """A training checkpoint as stored: every array of its 'model' item
    (`checkpoint.restore_model` without a target) and of its 'train' item as numpy,
    whatever topology wrote them; and every array's stored metadata (its writer's
    sharding), by name."""
    variables, _ = checkpoint.restore_model(directory, step=step)
    with checkpoint.manager(directory, read_only=True) as mngr:
        metadata = mngr.item_metadata(step)
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                dict(metadata["train"]))
        rest = mngr.restore(step, args=ocp.args.Composite(
            train=ocp.args.PyTreeRestore(restore_args=as_numpy))).train
    arrays = leaves_by_name({**variables, **rest})
    return arrays, leaves_by_name({**dict(metadata["model"]), **dict(metadata["train"])},
                                  lambda array_metadata: array_metadata)


# ----------------------------------------------------------------------------------
# Resumed runs, with checkpoint.restore_state recording what the trainer restored.
# ----------------------------------------------------------------------------------
def workdir_at_step(source_workdir, workdir, step: int) -> pathlib.Path:
    """A new workdir holding `source_workdir`'s checkpoints up to `step`: a run there
    resumes from `step`."""
    shutil.copytree(source_workdir / "checkpoints", workdir / "checkpoints")
    for path in (workdir / "checkpoints").iterdir():
        if path.name.isdigit() and int(path.name) > step:
            shutil.rmtree(path)
    return workdir


def record(state) -> dict:
    """What a resuming run restored: its arrays and their shardings, by name."""
    return {"state": leaves_by_name(state), "specs": shardings_by_name(state),
            "device_count": jax.device_count()}


# A subprocess that runs main.py as users do, with restore_state recording what it
# returned into the pickle file named by its first argument.
RECORDING_MAIN = f"""if True:
    import pickle, runpy, sys
    sys.path[:0] = [{str(ROOT / 'tests' / 'train')!r}, {str(ROOT / 'tests')!r}]
    import test_topology
    from noah_jax.train import checkpoint

    record_path = sys.argv.pop(1)
    restore_state = checkpoint.restore_state

    def recording_restore_state(*args, **kwargs):
        state = restore_state(*args, **kwargs)
        with open(record_path, "wb") as f:
            pickle.dump(test_topology.record(state), f)
        return state

    checkpoint.restore_state = recording_restore_state
    sys.argv = sys.argv[1:]  # main.py and its flags
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def record_restore_state(monkeypatch) -> list[dict]:
    """Wraps checkpoint.restore_state in this process; returns the list of records
    (`record`) it appends to, one per call."""
    records = []
    restore_state = checkpoint.restore_state

    def recording_restore_state(*args, **kwargs):
        state = restore_state(*args, **kwargs)
        records.append(record(state))
        return state

    monkeypatch.setattr(checkpoint, "restore_state", recording_restore_state)
    return records


def env_with_devices(count: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+",
                              f"--xla_force_host_platform_device_count={count}",
                              env["XLA_FLAGS"])
    return env


@contextlib.contextmanager
def subprocesses(log_dir: pathlib.Path):
    """Yields `start(name, args, devices)`, which starts a Python subprocess with that
    many fake CPU devices, its output going to log_dir/name.log. Any still running when
    the block ends (a failed assertion, a timeout) is killed, so none outlives the test."""
    started = []

    def start(name, args, devices):
        with open(log_dir / f"{name}.log", "w") as log:
            process = subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True,
                                       env=env_with_devices(devices), stdout=log,
                                       stderr=subprocess.STDOUT)
        process.log = log_dir / f"{name}.log"
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait()


def finish(*processes) -> list[str]:
    """Waits for the processes and returns their output. Fails as soon as one fails (a
    cluster's other process would wait for it until a timeout) or after TIMEOUT_S,
    showing the end of the output of each that did not exit cleanly."""
    deadline = time.monotonic() + TIMEOUT_S
    while (any(process.poll() is None for process in processes)
           and not any(process.poll() for process in processes)
           and time.monotonic() < deadline):
        time.sleep(0.1)
    outs = [process.log.read_text() for process in processes]
    unfinished = [f"{process.log} ("
                  + ("still running: timed out or waiting for a failed peer"
                     if process.poll() is None else f"exit code {process.poll()}")
                  + f"):\n{out[-3000:]}"
                  for process, out in zip(processes, outs) if process.poll() != 0]
    assert not unfinished, "\n\n".join(unfinished)
    return outs


# ----------------------------------------------------------------------------------
# Checks.
# ----------------------------------------------------------------------------------
def assert_restored_as_stored(recorded: dict, stored: dict[str, np.ndarray], step: int,
                              devices: int) -> None:
    """The trainer restored the checkpoint as stored, bit for bit, every part of a
    train state included, on this many devices."""
    assert recorded["device_count"] == devices
    parts = {name.split("/")[0] for name in stored}
    assert parts == {"params", "batch_stats", "opt_state", "ema_params", "step",
                     "nonfinite_step"}
    assert any("/trace/" in name for name in stored)  # SGD's momentum
    assert int(stored["step"]) == step
    chex.assert_trees_all_equal(recorded["state"], stored)


def assert_next_step_matches(resumed_workdir, writer_workdir, step: int) -> None:
    """The step after `step`, trained by the resumed run, gives what the writer's own
    next step gave."""
    resumed, _ = stored_state(resumed_workdir / "checkpoints", step + 1)
    expected, _ = stored_state(writer_workdir / "checkpoints", step + 1)
    before, _ = stored_state(writer_workdir / "checkpoints", step)
    assert int(resumed["step"]) == step + 1
    chex.assert_trees_all_equal_shapes_and_dtypes(resumed, expected)
    for name in expected:
        np.testing.assert_allclose(resumed[name], expected[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    # The step moved weights and statistics well beyond that tolerance.
    for name in (KERNEL, STATS):
        assert np.abs(expected[name] - before[name]).max() > 1e-3, name


def assert_stored_shardings(metadata: dict, mesh_shape: list[int], specs: dict) -> None:
    """The shardings the writer's arrays had, as the checkpoint records them."""
    for name, spec in specs.items():
        sharding = metadata[name].sharding
        assert (list(sharding.shape), tuple(sharding.partition_spec)) == (mesh_shape, spec), name


# ----------------------------------------------------------------------------------
# The test: one cluster run, three resumed runs (two of them at once).
# ----------------------------------------------------------------------------------
def test_checkpoints_resume_across_processes_devices_and_fsdp(tmp_path, monkeypatch):
    assert jax.device_count() == 8 and jax.process_count() == 1
    cluster, one, eight, fsdp = (tmp_path / name for name in ("2x2", "1x1", "1x8", "1x8_fsdp"))
    port = free_port()
    with subprocesses(tmp_path) as start:
        # 2 processes x 2 devices, FSDP over all 4: steps 1-3, checkpoints at 2 and 3.
        outs = finish(*(start(f"2x2_process_{i}", [
            *main_command(cluster, fsdp=True), f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={i}"], devices=2) for i in range(2)))
        assert "4 device(s) of cpu (cpu) in 2 process(es)" in outs[0]

        # Resumed from the cluster's step 2, 1 process x 1 device (through main.py)
        # trains step 3, while this process, on 8 devices without FSDP, trains steps 3
        # and 4 and saves both; then, from that unsharded step 3, trains step 4 again
        # with FSDP.
        workdir_at_step(cluster, one, 2)
        one_record = tmp_path / "restored_1x1.pkl"
        single = start("1x1", ["-c", RECORDING_MAIN, str(one_record),
                               *main_command(one, fsdp=False)], devices=1)
        workdir_at_step(cluster, eight, 2)
        records = record_restore_state(monkeypatch)
        four_steps = {"total_steps": 4, "checkpoint_every_steps": 1, "eval_every_steps": 4}
        trainer.train_and_evaluate(tiny_config(fsdp=False, **four_steps), str(eight))
        workdir_at_step(eight, fsdp, 3)
        trainer.train_and_evaluate(tiny_config(fsdp=True, **four_steps), str(fsdp))
        out, = finish(single)
    assert len(records) == 2, "each resumed run restores once"
    eight_record, fsdp_record = records
    assert "1 device(s) of cpu (cpu) in 1 process(es)" in out and "resuming from" in out
    assert one_record.exists(), "the 1-device run resumed without checkpoint.restore_state"
    with open(one_record, "rb") as f:
        one_record = pickle.load(f)

    # 2 x 2 devices, FSDP -> 1 x 1 device and 1 x 8 devices, unsharded. The cluster
    # wrote FSDP shards over its 4 devices (a small bias replicated); the resumed runs
    # restored every array replicated over their devices.
    stored, metadata = stored_state(cluster / "checkpoints", 2)
    assert_stored_shardings(metadata, [4, 1], {
        KERNEL: (None, None, "data", None), STATS: ("data",), BIAS: ()})
    for recorded, devices in ((one_record, 1), (eight_record, 8)):
        assert_restored_as_stored(recorded, stored, 2, devices)
        replicated = ({"data": devices, "model": 1}, P())
        assert [name for name, spec in recorded["specs"].items() if spec != replicated] == []
    assert_next_step_matches(one, cluster, 2)
    assert_next_step_matches(eight, cluster, 2)

    # 1 x 8 devices, unsharded -> the same devices, FSDP.
    stored, metadata = stored_state(eight / "checkpoints", 3)
    assert_stored_shardings(metadata, [8, 1], {KERNEL: (), STATS: (), BIAS: ()})
    assert_restored_as_stored(fsdp_record, stored, 3, 8)
    mesh, kernel = {"data": 8, "model": 1}, P(None, None, "data", None)
    assert fsdp_record["specs"][KERNEL] == (mesh, kernel)
    assert fsdp_record["specs"]["opt_state/1/0/trace/layer1_0/conv2/kernel"] == (mesh, kernel)
    assert fsdp_record["specs"]["ema_params/layer1_0/conv2/kernel"] == (mesh, kernel)
    assert fsdp_record["specs"][STATS] == (mesh, P("data"))
    assert fsdp_record["specs"][BIAS] == (mesh, P())
    assert_next_step_matches(fsdp, eight, 3)
