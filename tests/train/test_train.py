"""The trainer end to end on the embedded digits, on 8 fake CPU devices (see conftest)."""

import importlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import common
from helpers import (assert_equal_to_rounding, assert_optimizer_state_fits, demo_config,
                     free_port, one_ulp_off, set_fields)
from noah_jax.train import checkpoint, durations, optim, sharding, trainer
from noah_jax import data, errors, visualize
from noah_jax.models import create_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
PARITY = ROOT.parent / "shared" / "parity"


def direct_eval(config, variables):
    """Top-1 and loss over every eval image, computed without the trainer's machinery."""
    source = data.get_source(config.dataset, seed=config.seed)
    model = create_model(config.model.name, num_classes=source.num_classes,
                         head=config.model.head, **config.model.overrides.to_dict())
    images, labels = [], []
    for batch in source.eval_batches(local_batch_size=1000, process_index=0, process_count=1):
        keep = batch["mask"] > 0
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
    images, labels = np.concatenate(images), np.concatenate(labels)
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images),
                        np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits.max(-1, keepdims=True)
    return (len(labels), np.mean(np.argmax(logits, -1) == labels),
            -np.mean(log_probs[np.arange(len(labels)), labels]))


def test_demo_run_trains_checkpoints_logs_and_evaluates_every_example_once(tmp_path):
    config = demo_config(attention_figure_images=3)
    results = trainer.train_and_evaluate(config, str(tmp_path))
    visualize.run_attention_figure(config, str(tmp_path))  # as main.py draws it after a run
    assert jax.device_count() == 8
    # Exact evaluation: 360 digits in padded batches of 48 over 8 devices, each once.
    variables, meta = checkpoint.restore_model(tmp_path / "checkpoints")
    count, top1, loss = direct_eval(config, variables)
    assert results["eval/count"] == count == 360
    assert results["eval/top1"] == pytest.approx(top1, abs=1e-9)
    assert results["eval/loss"] == pytest.approx(loss, rel=1e-5)
    assert meta["model"] == "deit_tiny_patch16_224" and meta["num_classes"] == 10
    # What a loader needs without the config (noah_jax.inference).
    assert meta["class_names"] == list("0123456789")
    assert (meta["multilabel"], meta["loss"], meta["image_size"]) == (False, "softmax_xent", 32)
    assert checkpoint.latest_step(tmp_path / "checkpoints") == 6
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 6
    # The demo's figure: a row per eval image, its picture then each of the 4 heads' maps.
    from PIL import Image
    from noah_jax import figures
    with Image.open(tmp_path / "attention.png") as png:
        assert png.size == figures.figure_size(3, 1 + 4)


def step_once(config, devices, images, labels):
    """One jitted train step on a mesh over `devices`; returns (metrics, new params)."""
    mesh = sharding.create_mesh(len(devices), 1, devices=devices)
    model = create_model(config.model.name, num_classes=10, head=config.model.head,
                         **config.model.overrides.to_dict())
    schedule = optim.learning_rate_schedule(config, total_steps=10, steps_per_epoch=5)
    tx = optim.make_optimizer(config, schedule, model)
    state = trainer.init_train_state(model, tx, images.shape[1:], jax.random.key(0), ema=False)
    shardings = sharding.state_shardings(jax.eval_shape(lambda: state), mesh,
                                         fsdp=config.fsdp, fsdp_min_size=config.fsdp_min_size)
    state = jax.device_put(state, shardings)
    batch = sharding.global_batch({"image": images, "label": labels},
                                  sharding.batch_sharding(mesh))
    step = jax.jit(trainer.make_train_step(model, tx, config, schedule, mesh),
                   out_shardings=(shardings, None))
    new_state, metrics = step(state, batch)
    return jax.device_get(metrics), jax.device_get(new_state), shardings


@pytest.mark.parametrize("model_changes", [
    {},  # ViT with dropout in the head (per-example random bits must not depend on devices)
    {"model__name": "resnet18", "model__overrides": {"stage_sizes": (1, 1, 1, 1)}},  # BN
    # BatchNorm over groups of 4 (two devices' shares each on 8 devices).
    {"model__name": "resnet18", "model__overrides": {"stage_sizes": (1, 1, 1, 1),
                                                     "bn_group_size": 4}},
])
def test_same_global_batch_gives_the_same_step_on_1_and_8_devices(model_changes):
    config = demo_config(**model_changes)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    m1, s1, _ = step_once(config, jax.devices()[:1], images, labels)
    m8, s8, _ = step_once(config, jax.devices(), images, labels)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    # 8 devices sum in another order, which BatchNorm over 16 examples of tiny maps
    # amplifies: the ResNet's Adam moments differ by up to 1% of their largest on an
    # AVX2 CPU at the suite's XLA settings (6e-6 at XLA's default ones). A reordered
    # sum of n float32 terms is off by ~sqrt(n) ulps where inputs one ulp off move it by
    # ~1: n = 16x16x16 values per channel at the stem gives 64 (measured: 20 times the
    # one-ulp rerun's distance at worst). A per-device BatchNorm moves them by ~3600
    # times their largest, dropout that depends on the device count by O(1).
    _, s1_ulp, _ = step_once(config, jax.devices()[:1], one_ulp_off(images), labels)
    assert_equal_to_rounding(s8, s1, s1_ulp, rtol=1e-4, factor=64)


def test_gradient_accumulation_equals_the_full_batch():
    config = demo_config()
    config.model.overrides.dropout = 0.0
    rng = np.random.default_rng(1)
    images = rng.standard_normal((16, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    m1, s1, _ = step_once(config, jax.devices(), images, labels)
    config.grad_accum_steps = 2
    m2, s2, _ = step_once(config, jax.devices(), images, labels)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 s1["params"], s2["params"])


def test_fsdp_shards_parameters_over_data_and_computes_the_same_step():
    config = demo_config(fsdp=True, fsdp_min_size=1024)
    rng = np.random.default_rng(2)
    images = rng.standard_normal((16, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    m_fsdp, s_fsdp, shardings = step_once(config, jax.devices(), images, labels)
    specs = jax.tree.leaves(jax.tree.map(lambda s: s.spec, shardings["params"]),
                            is_leaf=lambda x: isinstance(x, P))
    assert P("data", None) in specs or P(None, "data") in specs
    fc1 = shardings["params"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # [96, 384]
    assert fc1.spec == P(None, "data")
    config.fsdp = False
    m_rep, s_rep, _ = step_once(config, jax.devices(), images, labels)
    np.testing.assert_allclose(m_fsdp["loss"], m_rep["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 s_fsdp["params"], s_rep["params"])


def test_nan_guard_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # An absurd learning rate blows the parameters up within a few steps.
    config = demo_config(total_steps=12, checkpoint_every_steps=1, log_every_steps=1,
                         grad_clip_norm=0.0, schedule__base_lr=1e30,
                         schedule__warmup_epochs=0.0, optimizer__name="sgd")
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step (\d+)") as info:
        trainer.train_and_evaluate(config, str(tmp_path))
    bad_step = int(re.search(r"step (\d+)", str(info.value)).group(1))
    last = checkpoint.latest_step(tmp_path / "checkpoints")
    assert last is not None and last <= bad_step
    variables, _ = checkpoint.restore_model(tmp_path / "checkpoints")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_profile_steps_write_a_trace_that_tensorboard_reads(tmp_path):
    trainer.train_and_evaluate(demo_config(total_steps=4, profile_steps=(2, 2)), str(tmp_path))
    traces = list((tmp_path / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def snapshot(folder):
    """{relative path: (bytes, mtime in ns)} of every file under `folder`."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(pathlib.Path(folder).rglob("*")) if p.is_file()}


def test_a_refused_run_writes_nothing_to_the_workdir(tmp_path):
    """Refusals before training (a checkpoint of another model in the workdir, a
    model-only checkpoint as the workdir) leave every file as it was: config.json is
    not overwritten, log.txt gets no line; main.py says why in one short line: the
    model the checkpoint holds, what to do, the keys counted with three named."""
    work = tmp_path / "work"
    trainer.train_and_evaluate(demo_config(total_steps=3), str(work))
    before = snapshot(work)
    assert {"config.json", "log.txt", "metrics.jsonl"} <= set(before)
    other = demo_config(total_steps=6)
    other.model.overrides.depth = 2
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        trainer.train_and_evaluate(other, str(work))
    assert "missing in checkpoint: params/blocks_1/attn/proj/bias (96,)" in error.value.problems
    assert snapshot(work) == before
    # A second block: every array the first one has in the stored run (its parameters,
    # and those of the optimiser's state), by Orbax's own metadata.
    with checkpoint.manager(work / "checkpoints", read_only=True) as mngr:
        stored = mngr.item_metadata(3)
    in_block = [path for path, _ in jax.tree_util.tree_flatten_with_path(
        {"model": dict(stored["model"]), "train": dict(stored["train"])})[0]
        if jax.tree_util.DictKey("blocks_0") in path]
    assert len(in_block) > 12  # the parameters' 12 and the optimiser's

    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config",
         str(ROOT / "configs" / "vit_noah.py") + ":demo", f"--workdir={work}",
         "--config.model.overrides.depth=2", "--config.model.overrides.embed_dim=96",
         "--config.model.overrides.attn_heads=3", "--config.batch_size=16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr == (
        f"error: the checkpoint at {work / 'checkpoints'} step 3 (deit_tiny_patch16_224 "
        "head=noah depth=1; this run: depth=2) does not fit this run's model or optimiser: "
        f"use another --workdir, or resume with the config that wrote it; {len(in_block)} "
        "keys missing (e.g. params/blocks_1/attn/proj/bias; params/blocks_1/attn/proj/kernel; "
        "params/blocks_1/attn/qkv/bias)\n"), proc.stderr[-3000:]
    assert len(proc.stderr) - len(str(work)) < 400
    assert snapshot(work) == before

    converted = tmp_path / "converted"  # what noah_jax.convert writes: no training state
    checkpoint.save_model(converted / "checkpoints", {"params": {"w": np.zeros(2)}},
                          {"model": "x"})
    before = snapshot(converted)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"has no training state"):
        trainer.train_and_evaluate(demo_config(), str(converted))
    assert snapshot(converted) == before


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_orphan_runs():
    """Kills the main.py processes a test started and left running (it failed midway)."""
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.communicate()


def run_main(workdir, *flags, **popen):
    command = [sys.executable, str(ROOT / "main.py"), "--config",
               str(ROOT / "configs" / "vit_noah.py") + ":demo", f"--workdir={workdir}",
               "--config.model.overrides.depth=1", "--config.num_epochs=0",
               "--config.total_steps=40", "--config.batch_size=16",
               "--config.checkpoint_every_steps=4", "--config.log_every_steps=4",
               "--config.eval_every_steps=40", "--config.attention_figure_images=0", *flags]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, **popen)
    _STARTED.append(process)
    return process


def wait_for(condition, process, what, timeout=300):
    """Polls `condition()` while `process` runs; fails with its output if it ends first."""
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"ended before {what}:\n" + process.communicate()[0][-3000:]
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def logged(workdir, text):
    """A condition: `text` appears in workdir/log.txt more often than it does now (the
    log is appended to across restarts)."""
    path = pathlib.Path(workdir) / "log.txt"
    count = lambda: path.read_text().count(text) if path.exists() else 0  # noqa: E731
    before = count()
    return lambda: count() > before


# A signal sent once step 12 is logged lands mid-run: 28 steps remain.
LONG = ["--config.total_steps=40", "--config.eval_every_steps=40",
        "--config.checkpoint_every_steps=10", "--config.keep_checkpoints=2"]


def test_stopped_killed_damaged_and_contended_runs_end_with_the_same_parameters(tmp_path):
    """One workdir through what pods do to runs; each restart resumes, and the end
    result equals an uninterrupted run's bit for bit:
      1. SIGTERM mid-run: the current step is saved and the run exits 143;
      2. kill -9 mid-run (maybe mid-save): its stale lock is taken over on restart;
      3. a second run on the live workdir refuses; the first finishes unharmed;
      4. the newest checkpoint truncated: moved aside, the one before it resumes."""
    straight = run_main(tmp_path / "straight", *LONG)
    work = tmp_path / "work"
    ckpts = work / "checkpoints"

    stopped = run_main(work, *LONG)  # 1
    wait_for(logged(work, "step 12/40"), stopped, "step 12")
    stopped.send_signal(signal.SIGTERM)
    out, _ = stopped.communicate(timeout=300)
    assert stopped.returncode == 128 + signal.SIGTERM, out[-3000:]
    at = int(re.search(r"stopped by SIGTERM at step (\d+): its checkpoint is saved", out)[1])
    assert 12 <= at < 40 and checkpoint.latest_step(ckpts) == at
    assert "Traceback" not in out, out[out.find("Traceback") - 300:][:3000]
    assert not (work / "run.lock").exists()

    killed = run_main(work, *LONG)  # 2
    wait_for(lambda: (checkpoint.latest_step(ckpts) or 0) > at, killed, "a checkpoint")
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert (work / "run.lock").exists()  # left behind by the killed run

    finishing = run_main(work, *LONG)  # 3
    wait_for(logged(work, f"resuming from {ckpts}"), finishing, "the resumption")
    finishing.send_signal(signal.SIGSTOP)  # held still while a second run tries the workdir
    try:
        second = run_main(work, *LONG)
        second_out, _ = second.communicate(timeout=300)
    finally:
        finishing.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    assert re.search(rf"^error: workdir {work} is in use by another run \(pid "
                     rf"{finishing.pid} on ", second_out, re.M), second_out[-3000:]
    out, _ = finishing.communicate(timeout=300)
    assert finishing.returncode == 0, out[-3000:]
    assert re.search(r"took over the workdir's lock .*: its process \(pid \d+ on .*\) is no "
                     r"longer running", out)

    straight_out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_out[-3000:]
    final, _ = checkpoint.restore_model(tmp_path / "straight" / "checkpoints")
    resumed, _ = checkpoint.restore_model(ckpts)
    assert checkpoint.latest_step(ckpts) == 40
    chex.assert_trees_all_equal(final, resumed)

    # 4: damage step 40 (a data file cut short); the run falls back to step 30 and
    # trains the last 10 steps again, to the same parameters.
    data_file = max((ckpts / "40" / "model" / "d").iterdir(), key=lambda f: f.stat().st_size)
    data_file.write_bytes(data_file.read_bytes()[:100])
    again = run_main(work, *LONG)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert re.search(r"checkpoint step 40 in .* cannot be restored \(", out)
    assert f"resuming from {ckpts} step 30" in out
    assert "Traceback" not in out, out[out.find("Traceback") - 300:][:3000]
    [moved] = (work / "damaged_checkpoints").iterdir()
    assert moved.name.startswith("40-") and (moved / "model" / "d" / data_file.name).exists()
    chex.assert_trees_all_equal(final, checkpoint.restore_model(ckpts)[0])


RECIPES = [
    ("resnet18_noah", "", "resnet18", 0.1), ("resnet18_noah", "head=linear,depth=34",
                                             "resnet34", 0.1),
    ("resnet50_noah", "depth=152", "resnet152", 0.1),
    ("mobilenetv2_noah", "width=035", "mobilenetv2_035", 0.05),
    ("vit_noah", "variant=small", "deit_small_patch16_224", 1e-3),
    ("mixer_noah", "variant=b16", "mixer_b16_224", 7e-4),
    ("gmlp_noah", "variant=ti16_050,head=linear", "gmlp_ti16_050_224", 7e-4),
]


@pytest.mark.parametrize("name,arg,model_name,peak_lr", RECIPES)
def test_recipe_configs_build_their_model_and_optimiser(name, arg, model_name, peak_lr):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    assert config.model.name == model_name
    model = create_model(config.model.name, num_classes=config.dataset.num_classes,
                         head=config.model.head, **config.model.overrides.to_dict())
    size = config.dataset.image_size
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    steps_per_epoch = 1_281_167 // config.batch_size
    total, _ = durations.total_and_epoch_steps(config, 1_281_167)
    schedule = optim.learning_rate_schedule(config, total_steps=total,
                                            steps_per_epoch=steps_per_epoch)
    tx = optim.make_optimizer(config, schedule, model)
    opt_state = jax.eval_shape(tx.init, variables["params"])
    # The papers' recipes: SGD with momentum for the CNNs, AdamW for the others.
    cnn = model_name.startswith(("resnet", "mobilenet"))
    assert config.optimizer.name == ("sgd" if cnn else "adamw")
    assert_optimizer_state_fits(opt_state, variables["params"], config.optimizer.name)
    # The first epoch after the warm-up (and DeiT's one-epoch lag) is at the curve's value
    # there: the peak, or for timm's cosine over the absolute epoch a little below it.
    warmup = int(round(config.schedule.warmup_epochs * steps_per_epoch))
    lag = config.schedule.epoch_lag * steps_per_epoch
    end = config.schedule.end_lr
    expected = (end + (peak_lr - end) * 0.5 * (1 + np.cos(np.pi * warmup / total))
                if config.schedule.name == "cosine" else peak_lr)
    assert float(schedule(warmup + lag)) == pytest.approx(expected, rel=1e-5)
    assert float(schedule(total + lag)) == pytest.approx(end if config.schedule.name == "cosine"
                                                         else peak_lr * 1e-3,
                                                         rel=1e-4, abs=1e-12)


MISTAKES = {
    "batch_size": (dict(batch_size=12), r"config.batch_size=12 must be divisible by the 8 "),
    "model": (dict(model__name="deit_tiny_patch16_244"),
              r"unknown model 'deit_tiny_patch16_244'\. Did you mean.*deit_tiny_patch16_224"),
    "dataset": (dict(dataset__name="imagenet2021"), r"unknown dataset 'imagenet2021'; available"),
    "eval_only": (dict(eval_only=True), r"config.eval_only needs a checkpoint"),
    "init_from_workdir": (dict(init_from__path="OLD"), r"no checkpoint in .*/old, which looks "
                          r"like a training workdir: use its checkpoint directory, .*/old/"
                          r"checkpoints$"),
    "init_from_other_model": (dict(init_from__path="OLD/checkpoints"),
                              r"^checkpoint .*/old/checkpoints \(step 0: x\) does not fit the "
                              r"model: give config\.init_from\.path a checkpoint of this run's "
                              r"model, or set config\.model to the checkpoint's; \d+ keys "
                              r"missing \(e\.g\. params/blocks_0/[^;]*; params/blocks_0/[^;]*; "
                              r"params/blocks_0/[^;]*\), 1 unexpected key \(params/w\)$"),
    "workdir_is_a_file": (dict(), r"workdir .*/work is a file, not a folder: give a folder"),
    "profile_steps": (dict(profile_steps=(0, 2)), r"profile_steps=\(first step, count\) needs "
                      r"first >= 1"),
    "bn_group_size": (dict(model__name="resnet18", model__overrides={"bn_group_size": 6}),
                      r"bn_group_size=6 must divide the batch each BatchNorm sees, 16"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_user_mistakes_are_user_errors_that_say_what_to_do(tmp_path, mistake):
    """main.py prints a UserError as one line, without a traceback (test_cli.py checks
    that); each of these used to end in a raw traceback."""
    changes, message = MISTAKES[mistake]
    if str(changes.get("init_from__path")).startswith("OLD"):  # another model's checkpoint
        checkpoint.save_model(tmp_path / "old" / "checkpoints",
                              {"params": {"w": np.zeros(2)}}, {"model": "x"})
        changes = dict(init_from__path=changes["init_from__path"].replace(
            "OLD", str(tmp_path / "old")))
    if mistake == "workdir_is_a_file":
        (tmp_path / "work").write_text("notes\n")
    with pytest.raises(errors.UserError, match=message):
        trainer.train_and_evaluate(demo_config(**changes), str(tmp_path / "work"))
    if mistake == "workdir_is_a_file":
        assert (tmp_path / "work").read_text() == "notes\n"
    else:  # refused before anything was written
        assert not (tmp_path / "work").exists()


def small_filesystem(path, megabytes):
    """Mounts a tmpfs of that size at `path` (root only); False where it cannot."""
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs",
                               str(path)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_full_disk_stops_the_run_with_one_line_and_the_last_checkpoint_intact(tmp_path):
    """On an 8 MB filesystem the first checkpoint (about 5 MB) fits and the second does
    not. Where no filesystem can be mounted (not root), every file is capped at 1 MB
    instead (RLIMIT_FSIZE): a real EFBIG from the OS at the first save."""
    disk = tmp_path / "disk"
    mounted = small_filesystem(disk, 8)
    limit = None
    if not mounted:
        import resource

        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    try:
        run = run_main(disk / "w", "--config.total_steps=16", "--config.eval_every_steps=16",
                       preexec_fn=limit)
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 1, out[-3000:]
        assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
        ckpts = disk / "w" / "checkpoints"
        [line] = [line for line in out.splitlines() if line.startswith("error:")]
        if mounted:
            assert line == (f"error: saving step 8 in {ckpts} failed: No space left on device."
                            " The newest complete checkpoint, step 4, is intact. Fix the cause"
                            " (free space, permissions), then run the same command again "
                            "(training resumes).")
            variables, meta = checkpoint.restore_model(ckpts)
            assert checkpoint.latest_step(ckpts) == 4 and meta["model"] == "deit_tiny_patch16_224"
            assert (disk / "w" / "log.txt").read_text().splitlines()[-1].endswith(line[7:])
        else:
            assert line.startswith(f"error: saving step 4 in {ckpts} failed: File too large.")
            assert "No complete checkpoint had been written yet" in line
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], timeout=30)


def run_cluster(workdir, *flags):
    """main.py as a real 2-host cluster on this machine (gloo collectives), 4 CPU
    devices each: the two processes."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("device_count=8", "device_count=4")
    port = free_port()
    return [run_main(workdir, *flags, f"--coordinator_address=127.0.0.1:{port}",
                     "--num_processes=2", f"--process_id={i}", env=env) for i in range(2)]


def test_two_process_run_equals_one_process_run_and_survives_a_sigterm_to_one_process(
        tmp_path):
    single = run_main(tmp_path / "single", *LONG)
    procs = run_cluster(tmp_path / "multi", *LONG)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert "8 device(s) of cpu (cpu) in 2 process(es)" in outs[0]
    # Process 0 reports; both evaluated all 360 digits together.
    top1 = [re.search(r"test top-1: ([\d.]+)% \((\d+) images\)", o) for o in outs]
    assert top1[0] and top1[0].group(2) == "360" and top1[1] is None

    # SIGTERM to process 1 only: JAX's preemption sync point makes both save the same
    # step and stop; the restarted cluster ends where the uninterrupted one did.
    work = tmp_path / "preempted"
    procs = run_cluster(work, *LONG)
    wait_for(logged(work, "step 12/40"), procs[0], "step 12")
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    steps = set()
    for p, o in zip(procs, outs):
        assert p.returncode == 128 + signal.SIGTERM, o[-3000:]
        steps.add(int(re.search(r"stopped by a preemption notice .* at step (\d+): its "
                                r"checkpoint is saved", o)[1]))
    [at] = steps
    assert 12 <= at < 40 and checkpoint.latest_step(work / "checkpoints") == at
    procs = run_cluster(work, *LONG)
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    chex.assert_trees_all_equal(checkpoint.restore_model(tmp_path / "multi" / "checkpoints")[0],
                                checkpoint.restore_model(work / "checkpoints")[0])

    out, _ = single.communicate(timeout=600)
    assert single.returncode == 0, out[-3000:]
    a, _ = checkpoint.restore_model(tmp_path / "single" / "checkpoints")
    b, _ = checkpoint.restore_model(tmp_path / "multi" / "checkpoints")
    # Some parameters have an exactly zero gradient: the NOAH query bias, and the final
    # norm's bias on the key channels (the first half), which reaches the attention only
    # as a per-class constant that a softmax over positions ignores. Their values are
    # AdamW-normalised rounding noise that depends on the reduction order: they must
    # stay tiny, not match.
    for variables in (a, b):
        params = variables["params"]
        keys = params["norm"]["bias"].shape[0] // 2
        assert np.abs(params["head"]["query"].pop("bias")).max() < 1e-4
        assert np.abs(params["norm"]["bias"][:keys]).max() < 1e-4
        params["norm"]["bias"] = params["norm"]["bias"][keys:]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)
    single_top1 = re.search(r"test top-1: ([\d.]+)%", out).group(1)
    assert top1[0].group(1) == single_top1


def test_converted_reference_checkpoint_is_scored_by_eval_and_fine_tuned_by_the_trainer(
        tmp_path):
    fixture = PARITY / "resnet18_noah.npz"
    if not fixture.exists():
        pytest.skip(f"{fixture} is absent (a clone without ../shared)")
    from noah_jax import convert
    full, backbone = tmp_path / "full", tmp_path / "backbone"
    convert.main(["--model", "resnet18", "--input", str(fixture), "--output", str(full)])
    convert.main(["--model", "resnet18", "--input", str(fixture), "--output", str(backbone),
                  "--drop-head", "--num-classes", "10"])

    # Evaluation scores the converted 1000-class model: 12 synthetic 224 px images.
    config = common.resnet_recipe("resnet18", "noah")
    set_fields(config, dataset__name="synthetic", dataset__num_eval_examples=12,
               dataset__num_train_examples=16, eval_batch_size=8, batch_size=8,
               init_from__path=str(full), eval_only=True)
    results = trainer.train_and_evaluate(config, str(tmp_path / "eval"))
    variables, _ = checkpoint.restore_model(full)
    count, top1, loss = direct_eval(config, variables)
    assert results["eval/count"] == count == 12
    assert results["eval/top1"] == pytest.approx(top1, abs=1e-9)
    assert results["eval/loss"] == pytest.approx(loss, rel=1e-4)

    # Fine-tuning starts from the converted backbone with a fresh 10-class head: with a
    # zero learning rate, one step leaves every backbone parameter as converted.
    config = demo_config(model__name="resnet18", model__overrides={}, total_steps=1,
                         schedule__base_lr=0.0, schedule__warmup_epochs=0.0,
                         init_from__path=str(backbone), init_from__drop_head=True)
    trainer.train_and_evaluate(config, str(tmp_path / "finetune"))
    tuned, _ = checkpoint.restore_model(tmp_path / "finetune" / "checkpoints")
    assert tuned["params"]["head"]["query"]["kernel"].shape == (4, 64, 10)  # Ck/N = 64
    for name in ("conv1", "layer4_1"):
        jax.tree.map(np.testing.assert_array_equal, tuned["params"][name],
                     variables["params"][name])


def test_bfloat16_run_with_ema_keeps_float32_state_and_evaluates_both(tmp_path):
    config = demo_config(dtype="bfloat16", ema_decay=0.5, total_steps=3, eval_every_steps=3)
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert results["eval/count"] == results["eval_ema/count"] == 360
    stored = jax.tree.leaves(checkpoint.restore_model(tmp_path / "checkpoints")[0])
    assert all(x.dtype == np.float32 for x in stored)
    with pytest.raises(ValueError, match=r"config.dtype must be one of \['bfloat16', 'float32'\]"):
        trainer.train_and_evaluate(demo_config(dtype="float16"), str(tmp_path / "bad"))


def test_ema_is_the_decayed_average_of_the_parameters():
    config = demo_config(ema_decay=0.75)
    mesh = sharding.create_mesh(1, 1, devices=jax.devices()[:1])
    model = create_model(config.model.name, num_classes=10, **config.model.overrides.to_dict())
    schedule = optim.learning_rate_schedule(config, total_steps=10, steps_per_epoch=5)
    tx = optim.make_optimizer(config, schedule)
    images = jnp.asarray(np.random.default_rng(3).standard_normal((16, 32, 32, 3)), jnp.float32)
    state = trainer.init_train_state(model, tx, images.shape[1:], jax.random.key(0), ema=True)
    ema = jax.tree.map(lambda p: p + 1.0, state["params"])  # an EMA that differs from them
    state.update(step=jnp.array(4), ema_params=ema)
    new_state, _ = jax.jit(trainer.make_train_step(model, tx, config, schedule, mesh))(
        state, {"image": images, "label": jnp.arange(16) % 10})
    jax.tree.map(lambda e, old, new: np.testing.assert_allclose(
        e, 0.75 * old + 0.25 * new, rtol=1e-6, atol=1e-7),
        new_state["ema_params"], ema, new_state["params"])
    assert int(new_state["step"]) == 5


def test_the_best_evaluation_is_reported_beside_the_last(demo_run):
    """As the reference reports its best epoch (main.py best_acc): every evaluation's
    top-1 (raw and EMA) has its best so far and the step of it; metrics.jsonl has them."""
    from noah_jax.train import run_log

    workdir, results = demo_run
    history = run_log.read_metrics(str(workdir))
    for key in ("eval/top1", "eval_ema/top1"):
        steps, values = zip(*history[key])
        assert results[f"{key}_best"] == pytest.approx(max(values))
        assert results[f"{key}_best_step"] == steps[int(np.argmax(values))]
        assert [v for _, v in history[f"{key}_best"]] == pytest.approx(
            np.maximum.accumulate(values))


def test_the_best_so_far_survives_a_resume():
    best = trainer.BestScores()
    # metrics.jsonl of an interrupted run: steps after the checkpoint (30) are redone.
    best.resume({"eval/top1": [(10, 0.5), (20, 0.7), (40, 0.9)], "eval/loss": [(10, 0.1)],
                 "eval/imagenet_v2/top1": [(20, 0.99)]}, start_step=30)
    assert best.update(50, {"eval/top1": 0.6, "eval/mAP": 0.3, "eval/loss": 2.0}) == {
        "eval/top1_best": 0.7, "eval/top1_best_step": 20,
        "eval/mAP_best": 0.3, "eval/mAP_best_step": 50}
