"""`python -m noah_jax.predict`: the demo's test digits as files are scored as the run
evaluated them; formats, multi-label thresholds, and one-line mistakes."""

import csv
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

import noah_jax
from noah_jax.train import checkpoint
from noah_jax import inference, predict
from noah_jax.models import create_model

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(capsys, *args):
    """predict.main(args) -> (stdout, stderr); fails unless it returns 0."""
    assert predict.main([str(a) for a in args]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def refused(capsys, *args):
    """(exit status, stderr) of predict.main(args), which must exit with a status."""
    with pytest.raises(SystemExit) as info:
        predict.main([str(a) for a in args])
    captured = capsys.readouterr()
    assert captured.out == ""
    return info.value.code, captured.err


def test_the_test_digits_as_files_score_what_the_run_evaluated(demo_run, digit_pngs, capsys):
    """The acceptance: every test digit written as a PNG, predicted from the folder,
    gives exactly the run's final test top-1, with its EMA and with its raw parameters."""
    workdir, results = demo_run
    folder, paths, labels = digit_pngs
    for flags, metric in (([], "eval_ema/top1"), (["--no-ema"], "eval/top1")):
        out, err = run(capsys, workdir, folder, "--format", "json", "--top-k", "10", *flags)
        rows = json.loads(out)
        assert [r["path"] for r in rows] == sorted(paths)
        correct = 0
        for row in rows:
            predictions = row["predictions"]
            probabilities = [p["probability"] for p in predictions]
            assert [p["rank"] for p in predictions] == list(range(1, 11))
            assert sorted(p["index"] for p in predictions) == list(range(10))
            assert all(p["class"] == str(p["index"]) for p in predictions)
            assert probabilities == sorted(probabilities, reverse=True)
            assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
            correct += predictions[0]["class"] == pathlib.Path(row["path"]).parent.name
        assert results[metric] > 0.1  # the tiny run has learnt something to compare
        assert correct == round(results[metric] * 360), metric
        # More than one batch of 64: a progress line on stderr, ending with the total.
        assert err.splitlines()[-1].startswith("predicted 360/360 images (")


def test_table_and_csv_show_the_top_k_of_the_json(demo_run, digit_pngs, capsys):
    workdir, _ = demo_run
    paths = digit_pngs[1][:3]
    rows = json.loads(run(capsys, workdir, *paths, "--format", "json", "--top-k", "3")[0])
    assert [len(r["predictions"]) for r in rows] == [3, 3, 3]

    table, err = run(capsys, workdir, *paths, "--top-k", "3", "--batch-size", "2")
    assert err.startswith("predicted 3/3 images (") and err.count("\n") == 1  # not a terminal
    lines = table.splitlines()
    assert lines[0].split() == ["image", "top-1", "top-2", "top-3"]
    for line, row in zip(lines[1:], rows):
        expected = [row["path"]] + [x for p in row["predictions"]
                                    for x in (p["class"], f"{100 * p['probability']:.2f}%")]
        assert line.split() == expected

    text, _ = run(capsys, workdir, *paths, "--format", "csv", "--top-k", "3")
    records = list(csv.reader(io.StringIO(text)))
    assert records[0] == ["path", "rank", "class", "index", "probability"]
    assert records[1:] == [[r["path"], str(p["rank"]), p["class"], str(p["index"]),
                            f"{p['probability']:.6g}"] for r in rows for p in r["predictions"]]


def multilabel_checkpoint(path, class_names):
    """A random 1-block DeiT at 32 px saved as a multi-label (sigmoid) model."""
    model = create_model("deit_tiny_050_patch16_224", num_classes=len(class_names),
                         img_size=32, depth=1)
    variables = jax.jit(model.init)(jax.random.key(5), np.zeros((1, 32, 32, 3), np.float32))
    checkpoint.save_model(path, variables, {
        "model": "deit_tiny_050_patch16_224", "head": "noah", "num_classes": len(class_names),
        "overrides": {"img_size": 32, "depth": 1}, "class_names": class_names,
        "dataset": "coco/2017", "loss": "sigmoid_xent"})
    return model, variables


def test_a_multi_label_model_lists_every_class_at_or_above_the_threshold(tmp_path, capsys):
    names = ["person", "dog", "cat", "car", "kite", "cup"]
    model, variables = multilabel_checkpoint(tmp_path / "coco", names)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"{i}.png"))
        pathlib.Path(paths[-1]).write_bytes(
            tf.io.encode_png(rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)).numpy())
    images = inference.load(tmp_path / "coco").preprocess(paths)
    scores = 1 / (1 + np.exp(-np.asarray(model.apply(variables, images, train=False),
                                         np.float64)))
    # Thresholds halfway across the two widest gaps between scores: no score is near one.
    ordered = np.sort(scores.ravel())
    widest = np.argsort(np.diff(ordered))[-2:]
    assert scores.max() < 1 and np.diff(ordered)[widest].min() > 1e-4
    middles = (ordered[widest] + ordered[widest + 1]) / 2
    for threshold in (0.0, *middles, 1.0):
        out, _ = run(capsys, tmp_path / "coco", *paths, "--format", "json",
                     "--threshold", threshold, "--top-k", "1")  # top-k: single-label only
        for row, expected in zip(json.loads(out), scores):
            listed = [(p["class"], p["score"]) for p in row["predictions"]]
            above = sorted(np.flatnonzero(expected >= threshold), key=lambda k: -expected[k])
            assert [c for c, _ in listed] == [names[k] for k in above]
            np.testing.assert_allclose([s for _, s in listed], expected[above], rtol=1e-5)
    table, _ = run(capsys, tmp_path / "coco", paths[0], "--threshold", "1")
    assert table.splitlines() == ["image" + " " * (len(paths[0]) - 3)
                                  + "classes scoring >= 1", f"{paths[0]}  (none)"]


# ----------------------------------------------------------------------------------
# Mistakes: one line on stderr, a non-zero status, no traceback.
# ----------------------------------------------------------------------------------
PREFIX = "python -m noah_jax.predict: error: "


def test_mistakes_end_in_one_line(demo_run, digit_pngs, tmp_path, capsys):
    workdir, image = demo_run[0], digit_pngs[1][0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (tmp_path / "empty").mkdir()
    checkpoint.save_model(tmp_path / "unknown", {"params": {"w": np.zeros(2, np.float32)}},
                          {"model": "resnet9000", "num_classes": 2})
    cases = [
        ((tmp_path / "nowhere", image), 1, f"{tmp_path / 'nowhere'}: no such file or folder; "
                                           "expected a training workdir"),
        ((tmp_path / "empty", image), 1, f"no checkpoint in {tmp_path / 'empty'}: expected"),
        ((tmp_path / "unknown", image), 1, "is of a model this code cannot build: unknown "
                                           "model 'resnet9000'."),
        ((workdir, broken), 1, f"no image to predict: {broken}: cannot be decoded as an "
                               "image (JPEG, PNG, GIF or BMP;"),
        ((workdir, tmp_path / "missing.png"), 1, f"{tmp_path / 'missing.png'}: no such file"),
        ((workdir, tmp_path / "empty"), 1, f"folder {tmp_path / 'empty'} holds no images"),
        ((workdir, image, "--top-k", "0"), 2, "argument --top-k: expected a positive integer, "
                                              "got '0' (see --help)"),
        ((workdir, image, "--threshold", "1.5"), 2, "argument --threshold: expected a number "
                                                    "from 0 to 1, got '1.5'"),
        ((workdir, image, "--format", "xml"), 2, "argument --format: invalid choice: 'xml'"),
        ((workdir,), 2, "the following arguments are required: IMAGES_OR_FOLDERS"),
    ]
    for args, status, message in cases:
        code, err = refused(capsys, *args)
        assert code == status, (args, err)
        assert err.startswith(PREFIX) and message in err and err.count("\n") == 1, (args, err)


def test_files_that_are_not_images_are_skipped_with_a_warning_each(demo_run, digit_pngs,
                                                                    tmp_path, capsys):
    """A folder of digits with a text file named .png and a JPEG cut short: the digits
    are predicted as on their own, each stray file gets one warning line, a last line
    counts them, and the exit status is 0. TensorFlow and libjpeg add no line of their
    own about those files."""
    workdir, paths = demo_run[0], digit_pngs[1][:3]
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, path in enumerate(paths):
        (folder / f"{i}.png").write_bytes(pathlib.Path(path).read_bytes())
    (folder / "1_notes.png").write_text("not an image\n")  # sorted between the digits
    (folder / "9_cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    alone, _ = run(capsys, workdir, *paths, "--format", "json", "--batch-size", "4")

    # As a user runs it, so that stderr is all the process writes (TensorFlow's C++
    # lines and libjpeg's included), with TensorFlow's settings left to the command.
    proc = subprocess.run([sys.executable, "-m", "noah_jax.predict", str(workdir), str(folder),
                           "--format", "json", "--batch-size", "4"],
                          cwd=ROOT, env=user_environment(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["path"] for r in rows] == [str(folder / f"{i}.png") for i in range(3)]
    for row, expected in zip(rows, json.loads(alone)):
        assert [p["class"] for p in row["predictions"]] == [
            p["class"] for p in expected["predictions"]]
        assert [p["probability"] for p in row["predictions"]] == pytest.approx(
            [p["probability"] for p in expected["predictions"]], rel=1e-6)
    # Two batches of 4: the progress line at the end (and, on a slow machine, one after
    # the first batch), then a warning per file and the count: nothing else.
    lines = proc.stderr.splitlines()
    progress = [line for line in lines
                if re.fullmatch(r"predicted [45]/5 images \(\d+\.\d images/s\)", line)]
    assert progress and progress[-1].startswith("predicted 5/5 images"), proc.stderr
    undecodable = "cannot be decoded as an image (JPEG, PNG, GIF or BMP; the file may be "
    assert lines == progress + [
        f"warning: skipped {folder / '1_notes.png'}: {undecodable}damaged or of another kind)",
        f"warning: skipped {folder / '9_cut.jpg'}: {undecodable}damaged or of another kind)",
        "warning: skipped 2 of 5 files (not readable images); predicted the other 3"], (
        proc.stderr)


def user_environment():
    """This process's environment as a user's shell has it: without the TensorFlow
    settings that importing noah_jax here added, so that a command sets its own."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):
        if name not in noah_jax.TF_SETTINGS_FROM_USER:
            env.pop(name, None)
    return env


def test_a_checkpoint_that_does_not_fit_its_model_is_one_line_counting_the_keys(tmp_path,
                                                                                 capsys):
    checkpoint.save_model(tmp_path / "odd", {"params": {"w": np.zeros(2, np.float32)}},
                          {"model": "mobilenetv2_035", "num_classes": 2})
    image = tmp_path / "x.png"
    image.write_bytes(tf.io.encode_png(np.zeros((9, 9, 3), np.uint8)).numpy())
    code, err = refused(capsys, tmp_path / "odd", image)
    # Every variable of the model is missing, three named in sorted order.
    model = create_model("mobilenetv2_035", num_classes=2)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 224, 224, 3)),
                                               train=False))
    keys = sorted(jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in
                  jax.tree_util.tree_flatten_with_path(shapes)[0])
    assert code == 1
    assert err == (f"{PREFIX}checkpoint {tmp_path / 'odd'} (step 0: mobilenetv2_035 "
                   f"num_classes=2) does not fit the model: {len(keys)} keys missing (e.g. "
                   f"{'; '.join(keys[:3])}), 1 unexpected key (params/w)\n")


def test_the_command_prints_one_line_and_no_traceback(tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(tf.io.encode_png(np.zeros((9, 9, 3), np.uint8)).numpy())
    proc = subprocess.run([sys.executable, "-m", "noah_jax.predict", str(tmp_path), str(image)],
                          cwd=ROOT, env=user_environment(), capture_output=True, text=True,
                          timeout=300)
    assert (proc.returncode, proc.stdout) == (1, "")
    # TensorFlow's C++ start-up notices (oneDNN, absl::InitializeLog) are off: noah_jax
    # sets TF_ENABLE_ONEDNN_OPTS=0, and predict its log level.
    assert proc.stderr == (f"{PREFIX}no checkpoint in {tmp_path}: expected a training workdir "
                           "(with checkpoints/ inside), its checkpoints/ folder, or a converted "
                           "checkpoint (the --output of python -m noah_jax.convert), or an "
                           "export folder (python -m noah_jax.export)\n")
