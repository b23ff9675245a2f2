"""Training on ImageNet prepared by the real TFDS builder (from tiny archives in the
ILSVRC2012 layout), in both file formats: a run resumed from a mid-epoch checkpoint
ends with exactly the parameters of the uninterrupted run, on 1 device, on 8 and on a
2-process cluster. TFRecord files reach the resumed position by reading up to it,
ArrayRecord files by record index."""

import os
import pathlib
import shutil
import subprocess
import sys

import chex
import pytest

pytest.importorskip("tensorflow_datasets")

from commands.test_prepare import (NUM_VAL, validation_synsets,  # noqa: E402
                                   write_ilsvrc2012_archives)
from helpers import free_port  # noqa: E402
from noah_jax import prepare  # noqa: E402
from noah_jax.train import checkpoint  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
FORMATS = ("tfrecord", "array_record")


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """{file format: a data_dir with imagenet2012 prepared in it in that format}."""
    root = tmp_path_factory.mktemp("imagenet")
    manual = root / "manual"
    write_ilsvrc2012_archives(manual, sorted(set(validation_synsets()[:NUM_VAL])))
    dirs = {}
    for file_format in FORMATS:
        dirs[file_format] = root / file_format
        prepare.prepare("imagenet2012", str(dirs[file_format]), str(manual),
                        skip_disk_check=True, file_format=file_format)
    return dirs


def main_py(workdir, data_dir, devices, process=None):
    """main.py on the DeiT recipe (a 1-block DeiT-Tiny at 32 px): 6 steps of 8 images
    from the 24 training images (an epoch is 9 steps with the recipe's 3 repeats),
    checkpoints at steps 3 and 6. `process`: (port, index) of a 2-process cluster."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("device_count=8", f"device_count={devices}")
    command = [sys.executable, str(ROOT / "main.py"), "--config=configs/vit_noah.py:variant=tiny",
               f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
               "--config.dataset.image_size=32", "--config.model.overrides.img_size=32",
               "--config.model.overrides.depth=1", "--config.batch_size=8",
               "--config.eval_batch_size=8", "--config.num_epochs=0",
               "--config.total_steps=6", "--config.checkpoint_every_steps=3",
               "--config.keep_checkpoints=2", "--config.eval_every_steps=6",
               "--config.log_every_steps=3", "--config.dataset.shuffle_buffer=16",
               "--config.attention_figure_images=0"]
    if process is not None:
        port, index = process
        command += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={index}"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(workdir, data_dir, devices, processes):
    """Runs main.py (`processes` of `devices` CPU devices each) to its end; the output
    of process 0."""
    if processes == 1:
        procs = [main_py(workdir, data_dir, devices)]
    else:
        port = free_port()
        procs = [main_py(workdir, data_dir, devices, (port, i)) for i in range(processes)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs[0]


@pytest.mark.parametrize("file_format", FORMATS)
@pytest.mark.parametrize("devices,processes", [(1, 1), (8, 1), (4, 2)],
                         ids=["1-device", "8-devices", "2-processes"])
def test_a_run_resumed_mid_epoch_ends_where_the_uninterrupted_run_does(
        data_dirs, tmp_path, file_format, devices, processes):
    workdir = tmp_path / "run"
    ckpts = workdir / "checkpoints"
    out = run(workdir, data_dirs[file_format], devices, processes)
    assert f"{devices * processes} device(s) of cpu (cpu) in {processes} process(es)" in out
    straight, _ = checkpoint.restore_model(ckpts)
    assert checkpoint.latest_step(ckpts) == 6
    # As if the run had been stopped after step 3: its last checkpoint goes, and the
    # rerun resumes at step 3, a third of the way through the first epoch.
    shutil.rmtree(ckpts / "6")
    out = run(workdir, data_dirs[file_format], devices, processes)
    assert f"resuming from {ckpts} step 3" in out, out[-3000:]
    assert checkpoint.latest_step(ckpts) == 6
    chex.assert_trees_all_equal(straight, checkpoint.restore_model(ckpts)[0])
