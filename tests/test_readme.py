"""The README: its test command is the one CI runs, and its commands and snippet work
as written."""

import os
import pathlib
import re
import subprocess
import sys

from absl import flags
from ml_collections import config_flags

from helpers import readme_commands

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    (command,) = re.findall(r"^python3 -m venv .*pytest.*$", readme, flags=re.M)
    setup, *installs, test = command.split(" && ")
    assert setup == "python3 -m venv .venv"
    assert installs[0] == ".venv/bin/python -m pip install -r requirements.txt -e ."
    for step in (setup, *(i.replace("pip install ", "pip install -q ") for i in installs), test):
        assert step in ci.splitlines(), f"{step!r} is in README.md but not in .ci/run"
    # The demo's command sets up the same way, and export names the same converter.
    (demo,) = re.findall(r"^python3 -m venv .*main\.py.*$", readme, flags=re.M)
    assert demo.split(" && ")[:-1] == [setup, *installs]
    from noah_jax import export
    assert f".venv/bin/python -m {export.ONNX_INSTALL}" in installs


MAIN_FLAGS = {"workdir", "distributed", "coordinator_address", "num_processes", "process_id"}


def test_every_readme_training_command_parses(monkeypatch):
    """The config files, arguments and fields the README's main.py commands name exist."""
    commands = readme_commands("python main.py")
    assert len(commands) >= 7
    for args in commands:
        config_args = [a for a in args if a.startswith("--config")]
        others = {a[2:].split("=")[0] for a in args if not a.startswith("--config")}
        assert others <= MAIN_FLAGS, (args, others - MAIN_FLAGS)
        monkeypatch.setattr(sys, "argv", ["main.py", *config_args])
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                        lock_config=True)
        values(sys.argv)  # raises on an unknown file, argument or field
        assert values.config.model.name


def test_every_readme_prepare_command_names_known_datasets():
    from noah_jax.data import tfds_source
    commands = readme_commands("python -m noah_jax.prepare")
    assert len(commands) >= 3
    for args in commands:
        names = [a for a in args if not a.startswith("--")]
        assert names and all(n in tfds_source.DATASETS for n in names), args


def test_readme_python_snippet_runs_from_another_directory(tmp_path):
    """The installed package (pip install -e .) imports from anywhere, not only the root."""
    readme = (ROOT / "README.md").read_text()
    (snippet,) = re.findall(r"## The models in Python\n\n```python\n(.*?)```", readme, re.S)
    checks = "\nprint(logits.shape, logits.dtype, attention.shape)\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", snippet + checks], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "(8, 80) float32 (8, 4, 80, 196)"


def test_every_readme_study_command_parses():
    """The README's `noah_jax.study` commands name existing configs, arguments, fields,
    heads and seeds (parsed as the command parses them, nothing trained)."""
    from noah_jax import study
    commands = readme_commands("python -m noah_jax.study")
    assert len(commands) >= 4
    for args in commands:
        argv = ["study", *args]
        values = study.define_flags(argv)
        study.cli.parse_flags(argv, values)
        assert study.parse_heads(values.heads) == ["noah", "linear"], args
        assert study.parse_seeds(values.seeds) == [0, 1, 2, 3, 4], args
        assert values.out and values.config.dataset.name in ("digits", "digits_multilabel")
