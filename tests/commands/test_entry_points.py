"""Every command's front door, as a newcomer meets it: --help and -h exit 0 and name the
command's flags; a mistyped path is told before TensorFlow and JAX are imported; a
--workdir that is a file ends in one line and is left alone."""

import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

# (command line after `python`, a flag its help must name)
HELP = [
    (["main.py", "--help"], "--workdir"), (["main.py", "-h"], "--config"),
    (["-m", "noah_jax.study", "--help"], "--heads"), (["-m", "noah_jax.study", "-h"], "--seeds"),
    (["-m", "noah_jax.predict", "--help"], "--top-k"),
    (["-m", "noah_jax.visualize", "-h"], "--grad-cam"),
    (["-m", "noah_jax.benchmark", "--help"], "--batch-sizes"),
    (["-m", "noah_jax.prepare", "--help"], "--manual_dir"),
    (["-m", "noah_jax.convert", "--help"], "--drop-head"),
    (["-m", "noah_jax.export", "--help"], "--platforms"),
]


def start(args):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_every_command_prints_its_help_and_exits_0():
    procs = [start(args) for args, _ in HELP]  # side by side: most time is start-up
    for proc, (args, flag) in zip(procs, HELP):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (args, err[-2000:])
        assert flag in out and "Traceback" not in err, (args, out[-2000:], err[-2000:])
    # absl's own --help lists only the flags of the command's module (not absl's
    # logging flags), after the command's docstring.
    main_help = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=300).stdout
    assert main_help.startswith("Trains and evaluates a NOAH model")
    assert "--workdir: Directory for checkpoints" in main_help
    assert "--alsologtostderr" not in main_help


# Runs each command's main on wrong paths, in one process, and reports after each
# whether TensorFlow or JAX had been imported by then.
WRONG_PATHS = r"""
import json, sys
from noah_jax import export, predict, visualize

def outcome(main, args):
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    return [code, "tensorflow" in sys.modules, "jax" in sys.modules]

nowhere, no_checkpoint, looks_right, image, notes = sys.argv[1:6]
print(json.dumps([
    outcome(predict.main, [nowhere, image]),
    outcome(predict.main, [no_checkpoint, image]),
    outcome(predict.main, [looks_right, image + ".missing"]),
    outcome(visualize.main, [nowhere, image, "--out", no_checkpoint]),
    outcome(visualize.main, [no_checkpoint, image, "--out", no_checkpoint]),
    outcome(visualize.main, [looks_right, image, "--out", notes + "/figures"]),
    outcome(visualize.main, [looks_right, image, "--out", no_checkpoint, "--heads", "first"]),
    outcome(export.main, [nowhere, "--out", no_checkpoint]),
    outcome(export.main, [looks_right, "--out", notes]),
]))
"""


def test_wrong_paths_fail_before_tensorflow_and_jax_are_imported(tmp_path):
    nowhere, no_checkpoint = tmp_path / "nowhere", tmp_path / "empty"
    looks_right, image, notes = tmp_path / "run", tmp_path / "x.png", tmp_path / "notes.txt"
    no_checkpoint.mkdir()
    (looks_right / "checkpoints" / "0").mkdir(parents=True)  # a step folder, as Orbax's
    image.write_bytes(b"never read: the checks come first")
    notes.write_text("")
    proc = subprocess.run([sys.executable, "-c", WRONG_PATHS, str(nowhere), str(no_checkpoint),
                           str(looks_right), str(image), str(notes)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Every one refused (status 1), with neither TensorFlow nor JAX imported.
    assert json.loads(proc.stdout) == [[1, False, False]] * 9, proc.stderr
    expected = ("expected a training workdir (with checkpoints/ inside), its checkpoints/ "
                "folder, or a converted checkpoint (the --output of python -m noah_jax.convert)")
    or_export = f"{expected}, or an export folder (python -m noah_jax.export)"
    predict = "python -m noah_jax.predict: error: "
    visualize = "python -m noah_jax.visualize: error: "
    export = "python -m noah_jax.export: error: "
    assert proc.stderr.splitlines() == [
        f"{predict}{nowhere}: no such file or folder; {or_export}",
        f"{predict}no checkpoint in {no_checkpoint}: {or_export}",
        f"{predict}{image}.missing: no such file or folder",
        f"{visualize}{nowhere}: no such file or folder; {expected}",
        f"{visualize}no checkpoint in {no_checkpoint}: {expected}",
        f"{visualize}--out {notes}/figures is under the file {notes}: give a folder (new, or "
        "one to add to)",
        f"{visualize}--heads=first: give 'all' or head indices separated by commas",
        f"{export}{nowhere}: no such file or folder; {expected}",
        f"{export}--out {notes} is a file: give a folder (new, or one to add to)",
    ]


def test_a_workdir_that_is_a_file_or_under_one_is_one_line_and_left_alone(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    workdirs = [notes, notes / "run"]
    procs = [start(["main.py", "--config=configs/vit_noah.py:demo", f"--workdir={w}"])
             for w in workdirs]
    messages = [f"error: workdir {notes} is a file, not a folder: give a folder (a new path, "
                "or the workdir of a run to resume)",
                f"error: workdir {notes / 'run'}: {notes} is a file, so no folder can be made "
                "under it; give a path whose folders are folders"]
    for proc, message in zip(procs, messages):
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines()  # TensorFlow's C++ start-up notices
                 if not re.search(r"oneDNN custom operations|before absl::InitializeLog", line)]
        assert (proc.returncode, lines) == (1, [message]), err[-3000:]
    assert notes.read_text() == "my notes\n" and sorted(tmp_path.iterdir()) == [notes]
