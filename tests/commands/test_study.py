"""noah_jax.study: a tiny study of 2 heads x 2 seeds on the digits, its tables checked
against what the runs logged, resumption, refusals; and its statistics by hand."""

import io
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from contextlib import redirect_stdout

import numpy as np
import pytest
from PIL import Image

from noah_jax import study
from noah_jax.train.jsonl_writer import JsonLinesWriter

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = f"--config={ROOT / 'configs' / 'vit_noah.py'}:demo"
# helpers.demo_config's tiny ViT as flags: 6 steps of 16 digits, evaluated at 3 and 6.
TINY = ["--config.model.overrides.depth=1", "--config.model.overrides.embed_dim=96",
        "--config.model.overrides.attn_heads=3", "--config.num_epochs=0",
        "--config.total_steps=6", "--config.batch_size=16", "--config.eval_batch_size=48",
        "--config.log_every_steps=3", "--config.eval_every_steps=3",
        "--config.checkpoint_every_steps=3", "--config.attention_figure_images=0"]


def run_main(argv, capsys):
    """(exit status, stdout, stderr) of study.main(argv)."""
    try:
        status = study.main(["study", *argv])
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """(out, argv, stdout) of one tiny study, run once for the tests of this file."""
    out = tmp_path_factory.mktemp("study")
    argv = [CONFIG, *TINY, "--heads=noah,linear", "--seeds=2", f"--out={out}"]
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert study.main(["study", *argv]) == 0
    return out, argv, printed.getvalue()


def logged(workdir):
    """{step: {key: value}} of a run's metrics.jsonl, read here without noah_jax (the last
    value of each step and key wins, as documented)."""
    steps = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record.pop("step"), {}).update(record)
    return steps


def test_the_tables_hold_what_the_runs_logged_and_their_statistics(tiny_study):
    out, _, printed = tiny_study
    summary = json.loads((out / "study.json").read_text())
    assert summary["finished"] and summary["complete_seeds"] == [0, 1]
    assert summary["primary_metric"] == "eval/top1"
    assert [(r["head"], r["seed"]) for r in summary["runs"]] == [
        ("noah", 0), ("linear", 0), ("noah", 1), ("linear", 1)]  # seed by seed
    top1 = {}
    for run in summary["runs"]:
        workdir = out / "runs" / f"{run['head']}_seed{run['seed']}"
        steps = logged(workdir)
        assert sorted(steps) == [3, 6]
        final = {k: v for k, v in steps[6].items() if k.startswith("eval/")}
        assert set(final) == {"eval/loss", "eval/top1", "eval/top5", "eval/top1_best",
                              "eval/top1_best_step"}
        assert run["final_step"] == 6 and run["metrics"] == final
        assert run["primary"] == final["eval/top1"]
        result = json.loads((workdir / "result.json").read_text())
        assert result["metrics"] == {**final, "eval/count": 360.0}
        assert (result["config"]["seed"], result["config"]["model"]["head"]) == (
            run["seed"], run["head"])
        top1[run["head"], run["seed"]] = final["eval/top1"]
    noah, linear = ([top1[h, s] for s in (0, 1)] for h in ("noah", "linear"))
    for head, values in (("noah", noah), ("linear", linear)):
        s = summary["heads_summary"][head]
        assert s["values"] == values and s["seeds"] == [0, 1]
        assert s["mean"] == pytest.approx(np.mean(values), abs=1e-15)
        assert s["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-15)
    paired = summary["paired"]
    diffs = np.subtract(noah, linear)
    assert (paired["first"], paired["second"]) == ("noah", "linear")
    assert paired["differences"] == pytest.approx(diffs, abs=1e-15)
    assert paired["mean"] == pytest.approx(diffs.mean(), abs=1e-15)
    assert paired["wins"] == int((diffs > 0).sum())
    # study.md, also printed at the end, shows the same numbers in percent.
    table = (out / "study.md").read_text()
    assert table in printed
    for head, values in (("noah", noah), ("linear", linear)):
        row = (f"| {head} | {100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}"
               f" | {100 * values[0]:.2f}, {100 * values[1]:.2f} |")
        assert row in table.splitlines()
    assert f"noah − linear: {100 * diffs.mean():+.2f}" in table


def test_curves_are_a_png_with_a_panel_per_curve(tiny_study):
    out, _, _ = tiny_study
    with Image.open(out / "curves.png") as png:
        assert png.format == "PNG"
        # Training loss and accuracy, validation loss and top-1.
        assert png.size == (4 * study.PANEL_SIZE[0], study.PANEL_SIZE[1])


def test_a_rerun_skips_finished_runs_and_resumes_an_unfinished_one(tiny_study, capsys):
    out, argv, _ = tiny_study
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    summary = json.loads((out / "study.json").read_text())
    start = time.time()
    status, printed, err = run_main(argv, capsys)
    assert status == 0, err
    assert printed.count("finished before") == 4 and time.time() - start < 20
    assert before == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*")
                      if p.is_file()}  # nothing trained or rewritten
    again = json.loads((out / "study.json").read_text())
    assert again["runs"] == summary["runs"]

    # A run that trained to its end but has no result.json (stopped before writing it)
    # resumes from its last checkpoint: it only evaluates, with the same result.
    workdir = out / "runs" / "linear_seed1"
    (workdir / "result.json").unlink()
    checkpoints = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    status, printed, err = run_main(argv, capsys)
    assert status == 0, err
    assert "linear seed 1: resuming from step 6" in printed
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == checkpoints
    assert json.loads((out / "study.json").read_text())["runs"][3]["metrics"] == (
        summary["runs"][3]["metrics"])


def test_another_config_in_the_same_folder_is_refused(tiny_study, capsys):
    out, argv, _ = tiny_study
    changed = [a.replace("total_steps=6", "total_steps=9") for a in argv]
    status, _, err = run_main(changed, capsys)
    assert status == 2
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: --out={out} holds runs of another config")
    assert "total_steps: 9 here, 6 there" in line
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "linear_seed0", "linear_seed1", "noah_seed0", "noah_seed1"]


MISTAKES = [
    (["--heads=noah,mlp"], "--heads=noah,mlp: unknown head 'mlp'; valid: noah, linear"),
    (["--heads=noah,noah"], "--heads=noah,noah: a head is repeated"),
    (["--seeds=0"], "--seeds=0: give at least one seed"),
    (["--seeds=2,2"], "--seeds=2,2: a seed is repeated"),
    (["--seeds=,"], "--seeds=,: give a number of seeds (5 for seeds 0-4) or comma-separated"),
    (["--config.seed=4"], "--config.seed: the study sets seed for each run; give --seeds"),
    (["--config.batchsize=4"], "config has no field 'batchsize' (did you mean 'batch_size'?)"),
]


@pytest.mark.parametrize("extra,message", MISTAKES)
def test_command_line_mistakes_end_in_one_line_and_status_2(extra, message, tmp_path, capsys):
    status, _, err = run_main([CONFIG, f"--out={tmp_path}/s", *extra], capsys)
    assert status == 2
    [line] = err.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv,message", [
    ([CONFIG], "give the study's folder: --out=DIR"),
    (["--config=configs/vit.py", "--out=x"], "there is no file 'configs/vit.py'"),
    ([f"{CONFIG},dmo", "--out=x"], "unknown config argument 'dmo'"),
])
def test_a_missing_folder_or_a_bad_config_is_one_line_from_the_command(argv, message):
    proc = subprocess.run([sys.executable, "-m", "noah_jax.study", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line


def test_seeds_are_a_count_or_a_list():
    assert study.parse_seeds("5") == [0, 1, 2, 3, 4]
    assert study.parse_seeds("0,3,7") == [0, 3, 7]
    assert study.parse_seeds("3,") == [3]


def test_sample_summary_by_hand():
    s = study.sample_summary([0.9, 0.8, 0.7])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.8) and s["std"] == pytest.approx(0.1)
    assert (s["min"], s["max"]) == (0.7, 0.9)
    one = study.sample_summary([0.5])
    assert one["std"] is None and one["note"] == "one seed: no standard deviation"


def test_paired_comparison_by_hand():
    # Differences 2, 3, 0: mean 5/3, variance ((1/3)^2 + (4/3)^2 + (5/3)^2) / 2 = 7/3,
    # t = (5/3) / sqrt(7/9) = sqrt(25/7); with 2 degrees of freedom the t distribution's
    # two-sided tail is 1 - |t| / sqrt(2 + t^2) = 1 - 5 / sqrt(39).
    p = study.paired_comparison([3.0, 5.0, 4.0], [1.0, 2.0, 4.0])
    assert p["differences"] == [2.0, 3.0, 0.0]
    assert p["mean"] == pytest.approx(5 / 3) and p["std"] == pytest.approx(math.sqrt(7 / 3))
    assert (p["wins"], p["ties"], p["losses"], p["dof"]) == (2, 1, 0, 2)
    assert p["t"] == pytest.approx(math.sqrt(25 / 7))
    assert p["p_value"] == pytest.approx(1 - 5 / math.sqrt(39))
    same = study.paired_comparison([2.0, 3.0], [1.0, 2.0])
    assert same["std"] == 0.0 and same["t"] is None and "same difference" in same["note"]
    one = study.paired_comparison([2.0], [1.0])
    assert one["std"] is None and one["t"] is None and one["wins"] == 1


def test_a_multilabel_study_is_compared_on_map(tmp_path):
    """Runs that report mAP (the 'multilabel' evaluator) are compared on it; the runs are
    written by hand as the trainer writes them."""
    mean_ap = {("noah", 0): 0.61, ("linear", 0): 0.55, ("noah", 1): 0.64, ("linear", 1): 0.60}
    for (head, seed), value in mean_ap.items():
        workdir = tmp_path / "runs" / f"{head}_seed{seed}"
        workdir.mkdir(parents=True)
        writer = JsonLinesWriter(str(workdir / "metrics.jsonl"))
        for step in (10, 20):
            writer.write_scalars(step, {"train/loss": 1.0 / step, "train/accuracy": 0.5,
                                        "train/epoch": step / 10})
            writer.write_scalars(step, {"eval/loss": 0.2, "eval/mAP": value * step / 20,
                                        "eval/CF1": 0.5, "eval/OF1": 0.6})
        writer.close()
        (workdir / "result.json").write_text(json.dumps({"seconds": 1.0, "metrics": {}}))
    description = {"command": "study", "config": {"spec": "c.py:demo,multilabel",
                                                  "overrides": [], "model": "vit",
                                                  "dataset": "digits_multilabel"}}
    summary = study.summarize(str(tmp_path), ["noah", "linear"], [0, 1], description, 2.0)
    assert summary["primary_metric"] == "eval/mAP"
    assert summary["runs"][0]["metrics"] == {"eval/loss": 0.2, "eval/mAP": 0.61,
                                             "eval/CF1": 0.5, "eval/OF1": 0.6}
    assert summary["heads_summary"]["noah"]["values"] == [0.61, 0.64]
    assert summary["paired"]["differences"] == pytest.approx([0.06, 0.04])
    text = study.write_summary(str(tmp_path), summary)
    assert "| head | mAP mean ± std | per seed (0, 1) |" in text
    assert "| noah | 62.50 ± 2.12 | 61.00, 64.00 |" in text
    with Image.open(tmp_path / "curves.png") as png:
        assert png.size == (4 * study.PANEL_SIZE[0], study.PANEL_SIZE[1])
