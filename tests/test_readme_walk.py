"""The README walked as a newcomer walks it: the commands of its bash blocks, in the
README's order, pasted into a shell on a scratch copy of the clone, each one required to
exit 0. The training and study commands run shortened (one or two epochs, one seed);
the ones that need what no CI machine has (ImageNet or COCO archives, an accelerator, a
TPU pod or SLURM cluster, the reference's released weights) are named in PLAN with the
reason, and other tests run them on fakes. A command that PLAN does not know fails the
test, so a new README command needs a decision here."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The README's setup, which CI itself has just done (.ci/run): the scratch copy's .venv
# is this test's own venv, so the rest of a command that starts with it runs alone.
SETUP = ("python3 -m venv .venv && .venv/bin/python -m pip install -r requirements.txt -e . "
         "&& .venv/bin/python -m pip install --no-deps jax2onnx==0.17.1")

# (pattern a command must match from its start, what to do): a string of arguments to
# append (the shortening; later flags win in main.py, study and argparse alike), or
# SKIP and the reason. The first pattern that matches decides.
SKIP = object()
PLAN = [
    (r"\.venv/bin/python -m pytest ", (SKIP, "the suite itself, which CI runs; "
                                       "test_readme.py checks .ci/run runs this command")),
    (r"\.venv/bin/python main\.py --config=configs/\w+\.py:\S*demo",
     "--config.num_epochs=1"),
    (r"\.venv/bin/python - <<'EOF'", ""),
    (r"\.venv/bin/python -m noah_jax\.predict runs/demo ", ""),
    (r"\.venv/bin/python -m noah_jax\.visualize runs/demo ", ""),
    (r"\.venv/bin/python -m noah_jax\.export runs/demo ", ""),
    (r"\.venv/bin/python -m noah_jax\.predict exports/demo ", ""),
    (r"docker run .* tensorflow/serving", (SKIP, "TF Serving's Docker image (the "
                                            "SavedModel's serving_default signature, which "
                                            "it calls, runs in the snippet above)")),
    (r"\.venv/bin/python -m noah_jax\.study --config=configs/mobilenetv2",
     (SKIP, "the ViT studies' command on MobileNetV2, minutes of compiling and training "
            "even shortened (test_readme.py parses it)")),
    (r"\.venv/bin/python -m noah_jax\.study --config=configs/\w+\.py:\S*demo",
     "--seeds=1 --config.num_epochs=1"),
    (r"\.venv/bin/python -m pip install \"jax\[", (SKIP, "an accelerator's JAX")),
    (r"\.venv/bin/python -m noah_jax\.prepare (imagenet|coco)",
     (SKIP, "the ImageNet / COCO archives (test_prepare.py runs it on fake ones)")),
    (r"\.venv/bin/python main\.py --config=configs/\w+\.py\S* --workdir=runs/(eval|resnet|deit|coco)",
     (SKIP, "ImageNet or COCO prepared (test_readme.py parses it)")),
    (r"\.venv/bin/python -m noah_jax\.convert .*--input noah_resnet50\.pth",
     (SKIP, "the reference's released weights (test_convert.py converts its fixtures)")),
    (r"gcloud ", (SKIP, "a TPU VM pod slice")),
    (r"#!/bin/bash\n#SBATCH", (SKIP, "a SLURM cluster")),
    (r"\.venv/bin/python benchmarks/input_pipeline\.py ",
     "--num_images 16 --batch_size 8 --batches 1 --warmup 1"),
    (r"\.venv/bin/python -m noah_jax\.benchmark --models resnet50,deit_small",
     (SKIP, "ResNet-50 and DeiT-S at batch 128: an accelerator's measurement "
            "(test_benchmark.py runs the command on tiny models)")),
]


def readme_walk(readme: str) -> list[str]:
    """The README's shell commands in order: one per line of its bash blocks (continued
    lines joined, comments dropped), a heredoc with its body, a script block (#!) whole."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        if block.startswith("#!"):
            commands.append(block.strip())
            continue
        lines = block.replace("\\\n", " ").splitlines()
        while lines:
            line = lines.pop(0)
            heredoc = re.search(r"<<'(\w+)'", line)
            if heredoc:
                end = lines.index(heredoc.group(1))
                commands.append("\n".join([line, *lines[:end + 1]]))
                del lines[:end + 1]
                continue
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def plan_for(command: str):
    for pattern, action in PLAN:
        if re.match(pattern, command):
            return action
    raise AssertionError(f"README command not in PLAN of {__file__}: {command!r}; add how "
                         "the walk runs it (arguments that shorten it) or why it cannot")


def scratch_clone(dest: pathlib.Path) -> pathlib.Path:
    """The clone's files as `git clone` of this tree would give them (tracked and
    untracked-but-not-ignored files, so uncommitted work is walked too), with .venv
    pointing at the venv running this test and ../shared beside it where it exists."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    clone = dest / "noah-jax"
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    (clone / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    if (ROOT.parent / "shared").is_dir():
        (dest / "shared").symlink_to(ROOT.parent / "shared", target_is_directory=True)
    return clone


def test_readme_commands_know_their_plan():
    """Every command of the README is in PLAN, and the walk finds the blocks it should."""
    commands = readme_walk((ROOT / "README.md").read_text())
    actions = [plan_for(c.removeprefix(SETUP + " && ")) for c in commands
               if c != SETUP]
    ran = [a for a in actions if not (isinstance(a, tuple) and a[0] is SKIP)]
    assert len(commands) >= 20 and len(ran) >= 9, commands


@pytest.mark.skipif(not (pathlib.Path(sys.prefix) / "bin" / "python").exists(),
                    reason="not run from a venv: the README's commands name .venv/bin/python")
def test_readme_commands_run_in_order_on_a_scratch_clone(tmp_path):
    clone = scratch_clone(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    # One CPU device as on a newcomer's machine (not the suite's 8 fake ones), and cheap
    # XLA compiles as in the rest of the suite (conftest.py).
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    walked = []
    for command in readme_walk((ROOT / "README.md").read_text()):
        command = command.removeprefix(SETUP + " && ") if command != SETUP else ""
        if not command:
            continue
        action = plan_for(command)
        if isinstance(action, tuple):
            continue
        if action:
            first, _, rest = command.partition("\n")
            command = "\n".join(filter(None, [f"{first} {action}", rest]))
        start = time.monotonic()
        proc = subprocess.run(["bash", "-c", command], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=900)
        print(f"{time.monotonic() - start:6.1f} s  {command.splitlines()[0]}")  # with -s
        assert proc.returncode == 0, (
            f"README command exited {proc.returncode}: {command}\n"
            f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}")
        walked.append((command, proc.stdout))
    # What the walk's commands say they made is there.
    assert (clone / "runs/demo/attention.png").is_file()
    assert sorted(p.name for p in (clone / "digits").rglob("*.png")) == [
        "0003.png", "0005.png", "0010.png", "0016.png", "0028.png"]
    assert (clone / "figures/0000_0005_heads.png").is_file()
    assert (clone / "figures/0000_0005_gradcam.png").is_file()
    for study in ("vit_digits", "vit_canvases"):
        assert (clone / "studies" / study / "study.md").is_file(), study
    predicted = next(out for command, out in walked if "noah_jax.predict" in command)
    assert predicted.splitlines()[0].split() == ["image", "top-1", "top-2", "top-3"]
    assert len(predicted.splitlines()) == 6
