"""Compares classification heads over several seeds: does NOAH beat the linear head?

    python -m noah_jax.study --config=configs/vit_noah.py:demo --config.num_epochs=15 \\
        --heads=noah,linear --seeds=5 --out=studies/vit_demo

trains the config once per (head, seed), one run after another in this process, with
`trainer.train_and_evaluate` on the config with `model.head` and `seed` replaced, and
compares the heads on the primary metric of the runs' last evaluation: top-1 for a
single-label dataset ('single' evaluator), mAP for a multi-label one ('multilabel'),
taken from the raw (not EMA) parameters' `eval/` metrics.

  --config       a config file and its arguments, with `--config.FIELD=VALUE`
                 overrides, as for main.py. The study sets `seed` and `model.head`.
  --heads        comma-separated heads (default noah,linear); the first two are compared
                 seed by seed.
  --seeds        N: seeds 0..N-1; or a comma-separated list: `--seeds=0,3,7`
                 (one given seed: `--seeds=3,`).
  --out          the study's folder.
  --compilation_cache  JAX's persistent compilation cache (default OUT/compilation_cache;
                 'off': none; a cache set with JAX_COMPILATION_CACHE_DIR is used as is).
  --trainer_logs also print the trainer's own log lines (always in each run's log.txt).

Runs go seed by seed, every head of a seed before the next seed, so an interrupted
study has complete pairs first. Each run has its own workdir OUT/runs/<head>_seed<k>/
(the trainer's log.txt, checkpoints, TensorBoard files, metrics.jsonl) and, once it
has finished, result.json: its last evaluation's metrics and the config it ran.

Resumption: run the same command again. Runs with a result.json are skipped, an
interrupted run resumes from its newest checkpoint (as main.py does), and more seeds or
heads can be added later. An OUT whose runs used another config (compared without
`seed` and `model.head`) is refused.

Written after each completed seed (every head of it finished), and at the end:
  OUT/study.json  the config, heads and seeds; each run's final metrics; per head the
                  mean, sample standard deviation (ddof=1; null with one seed) and the
                  per-seed values of the primary metric; the paired comparison of the
                  first two heads (per-seed differences, their mean and standard
                  deviation, wins, a paired t statistic and its two-sided p-value); times.
  OUT/study.md    the same as a markdown table and one line for the difference, which
                  the command also prints at the end.
  OUT/curves.png  training loss and accuracy, validation loss and primary metric against
                  epoch, one colour per head: the mean over seeds as a line in a band
                  from the lowest to the highest seed (the NOAH paper's Figure 3).
All numbers are the ones the runs logged: read back from their metrics.jsonl.

Time: a run takes as long as main.py's, and on CPU each begins by compiling, less from
the second seed of a head on (the compilation cache; NOAH's train step is compiled again
for each seed, which it holds as a constant). README.md ("Does NOAH help?") gives the
measured times and results of the studies it shows.

Exit status: 0 when the study is complete; 2 for a mistake on the command line (one
line saying what is wrong); 1 when a run stops on an error of the config, the data or
the workdir; 128 + the signal's number when stopped by a signal (the interrupted run
keeps its checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging as logging_lib
import math
import os
import sys
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from noah_jax import cli
from noah_jax.train import run_log
from noah_jax.errors import UserError

PROG = "python -m noah_jax.study"
RESULT_FILE = "result.json"
RUNS_FOLDER = "runs"
# The primary metric of a run: the first of these that its last evaluation reports
# (a multi-label evaluator reports mAP, a single-label one top-1).
PRIMARY_METRICS = ("eval/mAP", "eval/top1")
METRIC_NAMES = {"eval/mAP": "mAP", "eval/top1": "top-1"}
# curves.png: one panel per curve, each PANEL_SIZE pixels, at DPI.
DPI = 100
PANEL_SIZE = (380, 400)  # (width, height) in pixels, with the figure's title band


class StudyError(UserError):
    """A study that cannot go on as asked; the message says what to do."""


# ----------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------
def sample_summary(values: Sequence[float]) -> dict[str, Any]:
    """{'n', 'mean', 'std', 'min', 'max', 'values'} of per-seed values; `std` is the
    sample standard deviation (ddof=1), None with fewer than two values (and 'note'
    says so)."""
    x = np.asarray(values, np.float64)
    summary = {"n": len(x), "mean": float(x.mean()), "std": None,
               "min": float(x.min()), "max": float(x.max()), "values": [float(v) for v in x]}
    if len(x) > 1:
        summary["std"] = float(x.std(ddof=1))
    else:
        summary["note"] = "one seed: no standard deviation"
    return summary


def paired_comparison(first: Sequence[float], second: Sequence[float]) -> dict[str, Any]:
    """The paired comparison of two heads' per-seed values (same seeds, same order):
    the differences first - second, their mean and sample standard deviation, on how
    many seeds the first is higher / equal / lower, and the paired t statistic
    mean / (std / sqrt(n)) with n - 1 degrees of freedom and its two-sided p-value
    (None when n < 2 or every difference is the same, and 'note' says why)."""
    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two equally long lists of values, got {a.shape} and {b.shape}")
    diff = a - b
    n = len(diff)
    result = {"n": n, "differences": [float(d) for d in diff], "mean": float(diff.mean()),
              "std": None, "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()),
              "losses": int((diff < 0).sum()), "t": None, "dof": n - 1, "p_value": None}
    if n < 2:
        result["note"] = "one seed: no standard deviation and no t statistic"
        return result
    std = float(diff.std(ddof=1))
    result["std"] = std
    if std == 0.0:
        result["note"] = "every seed gives the same difference: no t statistic"
        return result
    from scipy import stats

    t = float(diff.mean() / (std / math.sqrt(n)))
    result["t"] = t
    result["p_value"] = float(2.0 * stats.t.sf(abs(t), n - 1))
    return result


# ----------------------------------------------------------------------------------
# The runs: what each one ran, and what it logged.
# ----------------------------------------------------------------------------------
def run_name(head: str, seed: int) -> str:
    return f"{head}_seed{seed}"


def comparable_config(config: dict) -> dict:
    """A config (as config.json holds it) without the fields that differ between the
    runs of one study: `seed` and `model.head`."""
    config = json.loads(json.dumps(config))  # a deep copy
    config.pop("seed", None)
    config.get("model", {}).pop("head", None)
    # The family's preprocessing, where the config leaves it to the family (None): the
    # trainer's config.json records it filled in, a study's result.json as given.
    from noah_jax.data.preprocess import FAMILY_FIELDS
    from noah_jax.models import input_preprocessing
    dataset, name = config.get("dataset", {}), config.get("model", {}).get("name")
    if name and any(dataset.get(f, 0) is None for f in FAMILY_FIELDS):
        family = dataclasses.asdict(input_preprocessing.for_model(name))
        for field, value in family.items():
            if dataset.get(field, 0) is None:
                dataset[field] = list(value) if isinstance(value, tuple) else value
    return config


def config_differences(here: dict, there: dict) -> list[str]:
    """'field: A here, B there' for each field whose values differ (dotted names)."""
    from flax.traverse_util import flatten_dict

    a, b = flatten_dict(here, sep="."), flatten_dict(there, sep=".")
    missing = object()
    return [f"{key}: {a.get(key, 'absent')!r} here, {b.get(key, 'absent')!r} there"
            for key in sorted(set(a) | set(b)) if a.get(key, missing) != b.get(key, missing)]


def saved_config(workdir: str) -> Optional[dict]:
    """The config a run ran (result.json's, else the trainer's config.json), or None."""
    result = load_result(workdir)
    if result is not None:
        return result["config"]
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def check_same_config(out: str, config: dict) -> None:
    """Refuses (cli.UsageError) an OUT whose runs used another config (seed and head
    aside)."""
    runs = os.path.join(out, RUNS_FOLDER)
    if not os.path.isdir(runs):
        return
    here = comparable_config(config)
    for name in sorted(os.listdir(runs)):
        there = saved_config(os.path.join(runs, name))
        if there is None:
            continue
        differences = config_differences(here, comparable_config(there))
        if differences:
            shown = "; ".join(differences[:3]) + (
                f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
            raise cli.UsageError(f"--out={out} holds runs of another config ({RUNS_FOLDER}/{name}: "
                             f"{shown}): give the config they ran to resume the study, or "
                             "another --out for a new one")


def load_result(workdir: str) -> Optional[dict]:
    path = os.path.join(workdir, RESULT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def primary_metric(metrics: dict[str, float]) -> str:
    """The metric the heads are compared on: mAP where the evaluator reports it
    (multi-label), else top-1."""
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name
    raise StudyError(f"the runs report none of {', '.join(PRIMARY_METRICS)} (they report "
                     f"{', '.join(sorted(metrics))}); the study compares heads on those")


def final_metrics(workdir: str) -> tuple[int, dict[str, float]]:
    """(step, metrics) of the run's last evaluation as it logged them in metrics.jsonl:
    every evaluation metric (not `train/...`) at the last step that has any."""
    logged = run_log.read_metrics(workdir)
    evaluated = {key: values for key, values in logged.items() if not key.startswith("train/")}
    if not evaluated:
        raise StudyError(f"{os.path.join(workdir, run_log.METRICS_FILE)} has no evaluation "
                         "metrics: delete the run's folder to train it again")
    step = max(values[-1][0] for values in evaluated.values())
    return step, {key: values[-1][1] for key, values in evaluated.items()
                  if values[-1][0] == step}


def train_run(config, workdir: str) -> dict:
    """Trains (or resumes) one run and writes its result.json; returns that record."""
    from noah_jax.train import trainer
    from noah_jax import visualize

    start = time.time()
    results = trainer.train_and_evaluate(config, workdir)
    if not config.eval_only:
        visualize.run_attention_figure(config, workdir)  # if the config asks for it
    seconds = time.time() - start
    step, logged = final_metrics(workdir)
    # The trainer logs every metric of its last evaluation but the example counts.
    returned = {k: float(v) for k, v in results.items() if not k.endswith("count")}
    if not _same_values(returned, logged):  # a bug of the trainer or of metrics.jsonl
        raise RuntimeError(f"{workdir}: the last evaluation returned {returned} but "
                           f"metrics.jsonl holds {logged} at step {step}")
    record = {"head": config.model.head, "seed": config.seed, "final_step": step,
              "metrics": {k: float(v) for k, v in results.items()}, "seconds": seconds,
              "finished": datetime.datetime.now().isoformat(timespec="seconds"),
              "config": json.loads(config.to_json_best_effort())}
    with open(os.path.join(workdir, RESULT_FILE + ".tmp"), "w") as f:
        json.dump(record, f, indent=1)
    os.replace(os.path.join(workdir, RESULT_FILE + ".tmp"), os.path.join(workdir, RESULT_FILE))
    return record


def _same_values(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal dicts of floats, a NaN equal to a NaN."""
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


# ----------------------------------------------------------------------------------
# The study's summary: study.json, study.md and curves.png.
# ----------------------------------------------------------------------------------
def summarize(out: str, heads: Sequence[str], seeds: Sequence[int], description: dict,
              wall_seconds: float) -> dict:
    """study.json's content from the runs' folders: every finished run's logged final
    metrics, and the statistics over the seeds whose runs of every head finished."""
    runs, primary = [], None
    for seed in seeds:
        for head in heads:
            workdir = os.path.join(out, RUNS_FOLDER, run_name(head, seed))
            result = load_result(workdir)
            if result is None:
                continue
            step, metrics = final_metrics(workdir)
            primary = primary or primary_metric(metrics)
            runs.append({"head": head, "seed": seed, "workdir": workdir, "final_step": step,
                         "metrics": metrics, "primary": metrics[primary],
                         "seconds": result["seconds"]})
    by_run = {(r["head"], r["seed"]): r for r in runs}
    complete = [s for s in seeds if all((h, s) in by_run for h in heads)]
    study = {"command": description["command"], "config": description["config"],
             "heads": list(heads), "seeds": list(seeds), "complete_seeds": complete,
             "finished": len(complete) == len(seeds), "runs_done": len(runs),
             "runs_total": len(heads) * len(seeds), "primary_metric": primary,
             "runs": runs, "heads_summary": {}, "paired": None,
             "train_seconds": sum(r["seconds"] for r in runs), "wall_seconds": wall_seconds,
             "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if complete:
        for head in heads:
            study["heads_summary"][head] = {
                "seeds": complete,
                **sample_summary([by_run[head, s]["primary"] for s in complete])}
    if complete and len(heads) > 1:
        first, second = heads[0], heads[1]
        study["paired"] = {"first": first, "second": second, "seeds": complete,
                           **paired_comparison(study["heads_summary"][first]["values"],
                                               study["heads_summary"][second]["values"])}
    return study


def _percent(x: Optional[float], signed: bool = False) -> str:
    return "n/a" if x is None else f"{100 * x:{'+' if signed else ''}.2f}"


def markdown(study: dict) -> str:
    """study.md: the table of heads (mean ± std of the primary metric, per-seed values)
    and the paired difference of the first two heads."""
    config = study["config"]
    primary = study["primary_metric"]
    name = METRIC_NAMES.get(primary, primary)
    lines = [f"# {' vs '.join(study['heads'])}: {config['model']} on {config['dataset']}", ""]
    seeds = study["complete_seeds"]
    lines.append(f"Config `{config['spec']}`{''.join(' `' + o + '`' for o in config['overrides'])}"
                 f"; {len(seeds)} seed{'s' * (len(seeds) != 1)} "
                 f"({', '.join(map(str, seeds)) or 'none finished yet'}); {primary} of the last "
                 "evaluation, in %" + ("" if study["finished"] else
                                       f" (unfinished: {study['runs_done']} of "
                                       f"{study['runs_total']} runs done)") + ".")
    lines.append("")
    if not seeds:
        return "\n".join(lines) + "\n"
    lines += [f"| head | {name} mean ± std | per seed ({', '.join(map(str, seeds))}) |",
              "|---|---|---|"]
    for head, s in study["heads_summary"].items():
        spread = f" ± {_percent(s['std'])}" if s["std"] is not None else " (one seed: no std)"
        lines.append(f"| {head} | {_percent(s['mean'])}{spread} | "
                     f"{', '.join(_percent(v) for v in s['values'])} |")
    paired = study["paired"]
    if paired:
        lines.append("")
        spread = f" ± {_percent(paired['std'])}" if paired["std"] is not None else ""
        n = paired["n"]
        line = (f"{paired['first']} − {paired['second']}: {_percent(paired['mean'], True)}"
                f"{spread} points (mean ± std over {n} seed{'s' * (n != 1)}; per seed "
                f"{', '.join(_percent(d, True) for d in paired['differences'])}); "
                f"{paired['first']} higher on {paired['wins']} of {n} seeds")
        if paired["ties"]:
            line += f", equal on {paired['ties']}"
        if paired["t"] is not None:
            dof = paired["dof"]
            line += (f"; paired t = {paired['t']:.2f} ({dof} degree{'s' * (dof != 1)} of "
                     f"freedom, two-sided p = {paired['p_value']:.3g})")
        elif paired.get("note"):
            line += f"; {paired['note']}"
        lines.append(line + ".")
    lines += ["", f"Training time {run_log.format_duration(study['train_seconds'])} over "
              f"{study['runs_done']} runs."]
    return "\n".join(lines) + "\n"


def curves(out: str, study: dict) -> dict[str, dict[str, list[dict]]]:
    """{head: {key: [{step: value} per seed]}} of every logged key, for the seeds of
    the summary."""
    result = {}
    for head in study["heads"]:
        per_seed = [run_log.read_metrics(os.path.join(out, RUNS_FOLDER, run_name(head, s)))
                    for s in study["complete_seeds"]]
        keys = set().union(*per_seed) if per_seed else set()
        result[head] = {key: [dict(m.get(key, [])) for m in per_seed] for key in keys}
    return result


def draw_curves(path: str, study: dict, series: dict[str, dict[str, list[dict]]]) -> None:
    """curves.png: a panel per curve (training loss, training accuracy, validation loss,
    the primary metric) against epoch; per head the mean over seeds as a line and the
    range from the lowest to the highest seed as a band. Only the steps that every
    seed of a head logged are drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    primary = study["primary_metric"]
    panels = [("train/loss", "training loss", 1.0), ("train/accuracy", "training accuracy (%)",
                                                       100.0),
              ("eval/loss", "validation loss", 1.0),
              (primary, f"validation {METRIC_NAMES.get(primary, primary)} (%)", 100.0)]
    panels = [p for p in panels if any(p[0] in series[h] for h in series)]
    width, height = PANEL_SIZE[0] * max(len(panels), 1), PANEL_SIZE[1]
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    axes_row = figure.subplots(1, max(len(panels), 1), squeeze=False)[0]
    colours = {head: f"C{i}" for i, head in enumerate(study["heads"])}
    for axes, (key, label, scale) in zip(axes_row, panels):
        for head in study["heads"]:
            runs = series[head].get(key)
            if not runs:
                continue
            steps = sorted(set.intersection(*(set(r) for r in runs)))
            values = scale * np.array([[r[s] for s in steps] for r in runs])
            x = np.array(steps, np.float64) / _steps_per_epoch(series[head])
            axes.plot(x, values.mean(0), color=colours[head], linewidth=1.5, marker="o",
                      markersize=2.5, label=head)
            if len(runs) > 1:
                axes.fill_between(x, values.min(0), values.max(0), color=colours[head],
                                  alpha=0.2, linewidth=0)
        axes.set_xlim(left=0)
        axes.set_xlabel("epoch" if _steps_per_epoch(series[study["heads"][0]]) != 1
                        else "step")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    config = study["config"]
    seeds = study["complete_seeds"]
    figure.suptitle(f"{config['model']} on {config['dataset']}: "
                    f"{' vs '.join(study['heads'])} over {len(seeds)} "
                    f"seed{'s' * (len(seeds) != 1)} (line: mean, band: lowest to highest)",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, format="png")


def _steps_per_epoch(head_series: dict[str, list[dict]]) -> float:
    """Steps per epoch from the trainer's `train/epoch` (step / epoch); 1 (the x axis in
    steps) when the runs did not log it."""
    for run in head_series.get("train/epoch", []):
        for step, epoch in run.items():
            if epoch > 0:
                return step / epoch
    return 1.0


def write_summary(out: str, study: dict) -> str:
    """Writes study.json, study.md and (once a seed is complete) curves.png; returns
    the markdown."""
    text = markdown(study)
    for name, content in (("study.json", json.dumps(study, indent=1) + "\n"),
                          ("study.md", text)):
        with open(os.path.join(out, name + ".tmp"), "w") as f:
            f.write(content)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    if study["complete_seeds"]:
        draw_curves(os.path.join(out, "curves.png"), study, curves(out, study))
    return text


# ----------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------
def parse_seeds(text: str) -> list[int]:
    """'N' -> [0, ..., N-1]; '0,3,7' -> [0, 3, 7]; '3,' -> [3]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
        if not values:
            raise ValueError(text)
    except ValueError:
        raise cli.UsageError(f"--seeds={text}: give a number of seeds (5 for seeds 0-4) or "
                             "comma-separated seeds (0,3,7)") from None
    if "," not in text:
        if values[0] < 1:
            raise cli.UsageError(f"--seeds={text}: give at least one seed")
        return list(range(values[0]))
    if not values or min(values) < 0:
        raise cli.UsageError(f"--seeds={text}: seeds are integers >= 0")
    if len(set(values)) < len(values):
        raise cli.UsageError(f"--seeds={text}: a seed is repeated")
    return values


def parse_heads(values: Sequence[str]) -> list[str]:
    from noah_jax.models.heads import registered_heads

    given = ",".join(values)
    known = registered_heads()
    unknown = [h for h in values if h not in known]
    if unknown or not values:
        raise cli.UsageError(f"--heads={given}: unknown head {unknown[0] if unknown else ''!r}"
                             f"; valid: {', '.join(known)}")
    if len(set(values)) < len(values):
        raise cli.UsageError(f"--heads={given}: a head is repeated")
    return list(values)


def define_flags(argv: Sequence[str]) -> flags.FlagValues:
    """The command's flags, on a registry of their own (main() can run more than once
    in a process)."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py), "
                                    "with its arguments after a colon.", flag_values=values,
                                    lock_config=True, sys_argv=list(argv))
    flags.DEFINE_list("heads", ["noah", "linear"], "Heads to compare (the first two in "
                      "pairs, seed by seed).", flag_values=values)
    flags.DEFINE_string("seeds", "5", "N for seeds 0..N-1, or comma-separated seeds.",
                        flag_values=values)
    flags.DEFINE_string("out", None, "The study's folder.", flag_values=values)
    flags.DEFINE_string("compilation_cache", None, "JAX's persistent compilation cache "
                        "folder (default OUT/compilation_cache; 'off': none).",
                        flag_values=values)
    flags.DEFINE_bool("trainer_logs", False, "Also print the trainer's log lines (always in "
                      "each run's log.txt).", flag_values=values)
    return values


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


@contextlib.contextmanager
def compilation_cache(path: Optional[str]) -> Iterator[Optional[str]]:
    """JAX's persistent compilation cache in `path` while the study runs; yields the
    folder in use. A cache the user set (JAX_COMPILATION_CACHE_DIR) is left as it is;
    None: no cache. From the second seed of a head on, its initialisation and
    evaluation programs come from the cache, and so does the linear head's train step;
    NOAH's train step is compiled for each seed, which is a constant in it (NOAH's
    heads split the dropout key, so the seed is not dead code there). A resumed or
    repeated study reads every program from the cache."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cache

    if jax.config.jax_compilation_cache_dir or path is None:
        yield jax.config.jax_compilation_cache_dir
        return
    jax.config.update("jax_compilation_cache_dir", path)
    try:
        yield path
    finally:  # the process (a test, a notebook) goes on without it
        jax.config.update("jax_compilation_cache_dir", None)
        cache.reset_cache()


@contextlib.contextmanager
def console_logging(trainer_logs: bool) -> Iterator[None]:
    """The trainer's INFO lines reach each run's log.txt; on the console only its
    warnings and errors (all of it with `trainer_logs`), beside the study's lines."""
    handler = logging.get_absl_handler()
    verbosity, level = logging.get_verbosity(), handler.level
    logging.set_verbosity(logging.INFO)
    handler.setLevel(logging_lib.INFO if trainer_logs else logging_lib.WARNING)
    logging.use_absl_handler()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        handler.setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    values = define_flags(argv)
    rest = cli.parse_flags(argv, values, doc=__doc__)
    try:
        if len(rest) > 1:
            raise cli.UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
        if values.config is None:
            raise cli.UsageError("give a config: --config=configs/vit_noah.py:demo (a "
                                 "config file and its arguments)")
        if not values.out:
            raise cli.UsageError("give the study's folder: --out=DIR")
        heads, seeds = parse_heads(values.heads), parse_seeds(values.seeds)
        for arg, path in cli.overridden_paths(argv):
            if path in ("seed", "model.head"):
                raise cli.UsageError(f"{arg}: the study sets {path} for each run; give "
                                     f"{'--seeds' if path == 'seed' else '--heads'} instead")
        config = values.config
        out = values.out
        if "://" in out:
            raise cli.UsageError(f"--out={out}: the study's folder must be a local path")
        config_dict = json.loads(config.to_json_best_effort())
        check_same_config(out, config_dict)
    except cli.UsageError as e:
        _usage_error(str(e))
    cache = values.compilation_cache or os.path.join(out, "compilation_cache")
    description = {
        "command": " ".join([PROG, *argv[1:]]),
        "config": {"spec": cli.config_spec(argv),
                   "overrides": [a for a in argv[1:] if a.startswith(("--config.",
                                                                       "--noconfig."))],
                   "model": config.model.name, "dataset": config.dataset.name,
                   "fields": comparable_config(config_dict)}}
    with console_logging(values.trainer_logs), \
            compilation_cache(None if cache == "off" else cache):
        try:
            return run_study(config, out, heads, seeds, description)
        except StudyError as e:  # runs that cannot be read back
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1


def run_study(config, out: str, heads: list[str], seeds: list[int], description: dict) -> int:
    """Trains the runs that have not finished, in order, and writes the summary."""
    from noah_jax.train import checkpoint
    from noah_jax import errors

    start = time.time()
    plan = [(head, seed) for seed in seeds for head in heads]
    os.makedirs(os.path.join(out, RUNS_FOLDER), exist_ok=True)
    durations = [r["seconds"] for r in (load_result(os.path.join(out, RUNS_FOLDER,
                                                                 run_name(h, s)))
                                        for h, s in plan) if r is not None]
    print(f"{len(plan)} runs ({', '.join(heads)} x seeds {', '.join(map(str, seeds))}) "
          f"in {out}", flush=True)
    for i, (head, seed) in enumerate(plan, 1):
        name = run_name(head, seed)
        workdir = os.path.join(out, RUNS_FOLDER, name)
        prefix = f"[{i}/{len(plan)}] {head} seed {seed}"
        result = load_result(workdir)
        if result is not None:
            primary = primary_metric(result["metrics"])
            print(f"{prefix}: finished before, {_metric_text(primary, result)}", flush=True)
            continue
        resumed = checkpoint.latest_step(os.path.join(workdir, "checkpoints"))
        print(f"{prefix}: {'resuming from step %d' % resumed if resumed else 'training'} "
              f"(log: {os.path.join(workdir, run_log.RUN_LOG)})", flush=True)
        run_config = config.copy_and_resolve_references()
        run_config.model.head, run_config.seed = head, seed
        try:
            result = train_run(run_config, workdir)
        except errors.Stopped as e:  # its message says how to resume
            print(f"{prefix}: {e} (the finished runs are kept)", file=sys.stderr, flush=True)
            return e.exit_code
        except errors.UserError as e:  # the trainer keeps it in the run's log.txt
            print(f"error: {head} seed {seed}: {cli.one_line(str(e))}", file=sys.stderr,
                  flush=True)
            return 1
        except KeyboardInterrupt:  # before training began (in training, the run saves)
            print(f"{prefix}: interrupted before training started; the finished runs are "
                  "kept: run the same command to go on", file=sys.stderr, flush=True)
            return 130
        durations.append(result["seconds"])
        left = sum(1 for h, s in plan[i:]
                   if load_result(os.path.join(out, RUNS_FOLDER, run_name(h, s))) is None)
        eta = f"; {left} run{'s' * (left != 1)} left, ETA " + run_log.format_duration(
            float(np.mean(durations)) * left) if left else ""
        primary = primary_metric(result["metrics"])
        print(f"{prefix}: {_metric_text(primary, result)} in "
              f"{run_log.format_duration(result['seconds'])}{eta}", flush=True)
        if i < len(plan) and all(  # (the last one is written once, below)
                load_result(os.path.join(out, RUNS_FOLDER, run_name(h, seed))) is not None
                for h in heads):
            write_summary(out, summarize(out, heads, seeds, description, time.time() - start))
    text = write_summary(out, summarize(out, heads, seeds, description, time.time() - start))
    print("\n" + text + f"\nwritten: {os.path.join(out, 'study.json')}, study.md, curves.png",
          flush=True)
    return 0


def _metric_text(primary: str, result: dict) -> str:
    return (f"{METRIC_NAMES.get(primary, primary)} {100 * result['metrics'][primary]:.2f}% "
            f"(step {result['final_step']})")


if __name__ == "__main__":
    from noah_jax.train import host_memory
    host_memory.use_huge_pages()  # may start this command again (noah_jax/train/host_memory.py)
    flags.FLAGS.mark_as_parsed()  # absl's console handler: no "before flag parsing" notice
    run_log.setup_console()
    sys.exit(main())
