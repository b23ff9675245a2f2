"""Classify image files with a trained or converted model.

    python -m noah_jax.predict CHECKPOINT IMAGES_OR_FOLDERS... [--top-k 5]
        [--format table|json|csv] [--batch-size 64] [--no-ema] [--threshold 0.5]
        [--image-size S]

CHECKPOINT is a training workdir, its checkpoints/ folder, a converted checkpoint or an
export folder (`noah_jax.inference.load`: the model and its evaluation preprocessing
come from the checkpoint and the run's config.json, or from the export's manifest and
StableHLO modules). IMAGES_OR_FOLDERS are image files, and folders
whose images are all read (.jpg .jpeg .png .gif .bmp anywhere below, as for folder
datasets), sorted by path.

For every image, in that order, stdout gets
  single-label models  the --top-k classes by softmax probability;
  multi-label models   (COCO, VOC, or trained with a sigmoid or asymmetric loss) every
                       class whose sigmoid score is at least --threshold, highest first.
--format table is for reading, json one array of {"path", "predictions": [{"rank",
"class", "index", "probability" or "score"}, ...]}, csv one row per image and class.
Images go through the model --batch-size at a time (the last batch padded, so the
model compiles once); over several batches a progress line goes to stderr.

A file that is not a readable image (a text file named .png, a damaged download) is
skipped with a warning line naming it, and a last line on stderr counts the skipped.
Those lines are all stderr gets about such files: TensorFlow's C++ log is held back
(TF_CPP_MIN_LOG_LEVEL=3 unless it is set), and a JPEG cut short in its header is
refused before libjpeg, which would print on its own, reads it.

Exit status 0 when at least one image was predicted. A mistake ends in one line on
stderr: status 2 for the command line, 1 for the checkpoint, a path that does not
exist, or no readable image at all (`noah_jax.errors.UserError`). Paths are checked
before TensorFlow and JAX are imported, so a mistyped one is told at once.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Optional, Sequence, TextIO

import numpy as np

from noah_jax import cli

FORMATS = ("table", "json", "csv")
PROG = "python -m noah_jax.predict"


# ----------------------------------------------------------------------------------
# Scoring.
# ----------------------------------------------------------------------------------
class _Progress:
    """'done/total images' on stderr: rewritten in place on a terminal, else a line
    every 10 seconds; nothing for a single batch."""

    def __init__(self, total: int, batch_size: int, stream: TextIO):
        self.total, self.stream = total, stream
        self.active = total > batch_size
        self.tty = stream.isatty()
        self.start = self.last = time.time()

    def update(self, done: int) -> None:
        if not self.active:
            return
        now = time.time()
        finished = done == self.total
        if not (self.tty or finished or now - self.last >= 10):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        start, end = ("\r", "\n" if finished else "") if self.tty else ("", "\n")
        self.stream.write(f"{start}predicted {done}/{self.total} images "
                          f"({rate:.1f} images/s){end}")
        self.stream.flush()


def predict_scores(loaded, paths: Sequence[str], *, batch_size: int,
                   progress: Optional[TextIO] = None,
                   skipped: Optional[list[tuple[str, str]]] = None
                   ) -> tuple[list[str], np.ndarray]:
    """(the paths scored, their float32 [n, K] scores) of `loaded` (an
    `inference.Loaded`) on the image files: softmax probabilities, or sigmoids for a
    multi-label model. A file that cannot be read or decoded raises its ImageFileError;
    with `skipped` (a list) it is left out and (path, why) appended there."""
    import jax

    apply = jax.jit(lambda variables, x: loaded.model.apply(variables, x, train=False))
    scored, rows = [], []
    report = _Progress(len(paths), batch_size, progress or sys.stderr)
    for start in range(0, len(paths), batch_size):
        batch, images = _readable(loaded, list(paths[start:start + batch_size]), skipped)
        n = len(batch)
        if n:
            if n < batch_size:  # one shape for every batch: one compilation
                images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]),
                                                          images.dtype)])
            rows.append(loaded.scores(apply(loaded.variables, images))[:n])
            scored += batch
        report.update(min(start + batch_size, len(paths)))
    scores = (np.concatenate(rows) if rows
              else np.zeros((0, len(loaded.class_names)), np.float32))
    return scored, scores


def _readable(loaded, paths: list[str], skipped: Optional[list[tuple[str, str]]]
              ) -> tuple[list[str], np.ndarray]:
    """(paths, their images): the whole batch at once, or, when a file in it fails and
    `skipped` is given, file by file without the ones that fail."""
    from noah_jax.errors import ImageFileError

    try:
        return paths, loaded.preprocess(paths)
    except ImageFileError:
        if skipped is None:
            raise
    kept, images = [], []
    for path in paths:
        try:
            images.append(loaded.preprocess([path]))
        except ImageFileError as e:
            skipped.append((path, _without_path(one_line(e), path)))
            continue
        kept.append(path)
    return kept, np.concatenate(images) if images else np.zeros((0,))


def _without_path(message: str, path: str) -> str:
    """An image error's message without the path it starts with (or names)."""
    if message.startswith(path + " "):
        return message[len(path) + 1:]
    return message.replace(f" {path}", "", 1)


def results(scores: np.ndarray, paths: Sequence[str], class_names: Sequence[str], *,
            multilabel: bool, top_k: int, threshold: float) -> list[dict]:
    """Per image {'path', 'predictions': [{'rank', 'class', 'index', 'probability'}]}
    (the top_k classes), or for a multi-label model the classes scoring at least
    `threshold`, each with its 'score', highest first (ties: lower index first)."""
    key = "score" if multilabel else "probability"
    out = []
    for path, row in zip(paths, scores):
        order = np.argsort(-row, kind="stable")
        chosen = order[row[order] >= threshold] if multilabel else order[:top_k]
        out.append({"path": path, "predictions": [
            {"rank": rank, "class": class_names[k], "index": int(k), key: float(row[k])}
            for rank, k in enumerate(chosen, 1)]})
    return out


# ----------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------
def write_table(rows: list[dict], multilabel: bool, threshold: float, out: TextIO) -> None:
    """Aligned columns: the image, then its classes with their percentages."""
    def cell(p):
        value = p["score"] if multilabel else p["probability"]
        return f"{p['class']} {100 * value:.2f}%"

    cells = [[r["path"]] + [cell(p) for p in r["predictions"]] for r in rows]
    if multilabel:
        header = ["image", f"classes scoring >= {threshold:g}"]
        cells = [[c[0], ", ".join(c[1:]) or "(none)"] for c in cells]
    else:
        header = ["image"] + [f"top-{k}" for k in range(1, max(map(len, cells), default=1))]
    table = [header] + cells
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(header))]
    for row in table:
        out.write("  ".join(text.ljust(w) for text, w in zip(row, widths)).rstrip() + "\n")


def write_csv(rows: list[dict], multilabel: bool, out: TextIO) -> None:
    key = "score" if multilabel else "probability"
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "rank", "class", "index", key])
    for r in rows:
        for p in r["predictions"]:
            writer.writerow([r["path"], p["rank"], p["class"], p["index"], f"{p[key]:.6g}"])


# ----------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------
def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description="Classify image files with a trained or "
                                                  "converted NOAH model.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a training workdir, its checkpoints/ folder, a converted checkpoint, "
                        "or an export folder (python -m noah_jax.export)")
    p.add_argument("images", metavar="IMAGES_OR_FOLDERS", nargs="+",
                   help="image files and folders of images (searched recursively)")
    p.add_argument("--top-k", type=cli.int_at_least(1), default=5,
                   help="classes shown per image (single-label models; default 5)")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format")
    p.add_argument("--batch-size", type=cli.int_at_least(1), default=64,
                   help="images per forward pass (default 64)")
    p.add_argument("--no-ema", action="store_true",
                   help="use the raw parameters of a run that kept an EMA of them")
    p.add_argument("--threshold", type=_fraction, default=0.5,
                   help="multi-label models: show classes scoring at least this (default 0.5)")
    p.add_argument("--image-size", type=cli.int_at_least(1), default=None,
                   help="input size for a converted checkpoint of a CNN (default 224)")
    return p


def one_line(error: BaseException) -> str:
    """An error message on one line: a listing's lines joined with '; '."""
    return cli.one_line(str(error)) or type(error).__name__


def quiet_tensorflow() -> None:
    """TF_CPP_MIN_LOG_LEVEL=3 where the user set none, before TensorFlow is imported
    (which reads it then). TensorFlow only decodes the images here, and each file it
    cannot decode gets a warning line of this command, which its C++ runtime would
    repeat: 'Local rendezvous is aborting' warnings, and errors such as 'Premature end
    of JPEG data' for a download cut short. Its errors that matter reach Python as
    exceptions, which this command reports."""
    import noah_jax

    if ("TF_CPP_MIN_LOG_LEVEL" not in noah_jax.TF_SETTINGS_FROM_USER
            and "tensorflow" not in sys.modules):
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


def _refuse(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.exit(1)


def _nothing_readable(skipped: list[tuple[str, str]]) -> str:
    (path, why), more = skipped[0], len(skipped) - 1
    others = f" (and {more} other file{'s' * (more > 1)} that cannot be read)" if more else ""
    return f"no image to predict: {path}: {why}{others}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    # Mistyped paths are told before TensorFlow and JAX are imported (seconds).
    mistake = (cli.checkpoint_path_error(args.checkpoint, exports=True)
               or cli.missing_path_error(args.images))
    if mistake:
        _refuse(mistake)
    quiet_tensorflow()
    from noah_jax import inference
    from noah_jax.train import run_log
    from noah_jax.errors import UserError

    run_log.quiet_library_notices()  # e.g. Orbax's "read only" notice, on purpose here
    skipped: list[tuple[str, str]] = []
    try:
        paths = inference.image_files(args.images)
        loaded = inference.load(args.checkpoint, ema=not args.no_ema,
                                image_size=args.image_size)
        scored, scores = predict_scores(loaded, paths, batch_size=args.batch_size,
                                        skipped=skipped)
    except UserError as e:
        _refuse(one_line(e))
    if not scored:
        _refuse(_nothing_readable(skipped))
    # A folder with a stray file (a text file named .png, a damaged download) is still
    # predicted: each file left out is named, and counted at the end.
    for path, why in skipped:
        sys.stderr.write(f"warning: skipped {path}: {why}\n")
    if skipped:
        sys.stderr.write(f"warning: skipped {len(skipped)} of {len(paths)} files (not readable "
                         f"images); predicted the other {len(scored)}\n")
    rows = results(scores, scored, loaded.class_names, multilabel=loaded.multilabel,
                   top_k=args.top_k, threshold=args.threshold)
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif args.format == "csv":
        write_csv(rows, loaded.multilabel, sys.stdout)
    else:
        write_table(rows, loaded.multilabel, args.threshold, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
