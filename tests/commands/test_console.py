"""A quiet console: TensorFlow's start-up notices held back by noah_jax/__init__.py (the
user's own settings kept), and no TFDS warning about a dataset folder that is not there."""

import importlib
import logging
import os
import pathlib
import subprocess
import sys

import tensorflow_datasets as tfds

import noah_jax
from noah_jax.data import tfds_source

ROOT = pathlib.Path(__file__).resolve().parents[2]
TF_SETTINGS = ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")


def test_environment_defaults_are_set_and_the_users_values_kept(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    importlib.reload(noah_jax)
    assert [os.environ[name] for name in TF_SETTINGS] == ["1", "1"]
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    importlib.reload(noah_jax)
    assert [os.environ[name] for name in TF_SETTINGS] == ["0", "0"]


def test_a_command_that_imports_tensorflow_prints_only_its_own_error(tmp_path):
    # prepare imports TensorFlow (through TFDS) and asks TFDS about a dataset folder
    # that does not exist; it stops at the missing archives, before any work.
    env = {k: v for k, v in os.environ.items() if k not in TF_SETTINGS}
    data_dir = tmp_path / "tfds"
    proc = subprocess.run([sys.executable, "-m", "noah_jax.prepare", "imagenet2012",
                           f"--data_dir={data_dir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (1, "")
    # Neither TensorFlow's "oneDNN custom operations are on" and CPU feature notices,
    # nor absl's "before absl::InitializeLog()" line, nor TFDS's "Variant folder ...
    # has no dataset_info.json": the one line that says what to do.
    assert proc.stderr == (
        "python -m noah_jax.prepare: error: imagenet2012 needs ILSVRC2012_img_train.tar "
        f"and ILSVRC2012_img_val.tar in {data_dir}/downloads/manual (from "
        "https://image-net.org/download-images (free registration)); put them there, or "
        "pass --manual_dir=DIR where they are\n"), proc.stderr
    assert not data_dir.exists()


def test_only_a_dataset_folder_that_is_there_but_incomplete_is_warned_about(tmp_path,
                                                                            caplog):
    builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert not tfds_source.is_prepared(builder)  # never built here
        assert caplog.messages == []
        builder.data_path.mkdir(parents=True)  # e.g. a build that stopped early
        assert not tfds_source.is_prepared(builder)
    assert caplog.messages == [
        f"Variant folder {tmp_path}/imagenet2012/5.1.0 has no dataset_info.json"]
