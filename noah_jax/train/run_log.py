"""What a run tells the user: the console, workdir/log.txt, TensorBoard and metrics.jsonl.

Process 0 logs readable lines (absl, to the console as `06:32:31 message`) and copies
them into the workdir's `log.txt`; the metrics also go to TensorBoard event files and,
as JSON lines that any script can read (`read_metrics`), to `metrics.jsonl`. Library
notices that would read like errors or bury the run's own lines are dropped.
"""

from __future__ import annotations

import json
import logging as logging_lib
import os
import sys
import time

import jax
from absl import logging


# How Orbax's background threads log one failed save, several times over with
# tracebacks; `checkpoint.check_saves` raises it once as a CheckpointWriteError.
_ORBAX_SAVE_FAILURE = ("raised an exception", "in background save thread",
                       "Save Finalize thread")
# What asyncio's "exception was never retrieved" records of checkpoint reads and writes
# mention (a damaged checkpoint's read is reported by restore_or_init, a failed write
# by check_saves).
_CHECKPOINT_IO = ("orbax-checkpoint-tmp", "OCDBT", "zarr", "/orbax/")


class DropLibraryNotices(logging_lib.Filter):
    """Keeps the console and the run log to what the user needs to read.

    Dropped: Orbax's several INFO lines per checkpoint and its warning each time a
    checkpoint is opened read-only on purpose; the repeated tracebacks of a failed
    save (from Orbax's threads, and asyncio's "exception was never retrieved" at
    exit), which `checkpoint.check_saves` reports once; JAX's INFO notice that a
    platform it probes is absent ("Unable to initialize backend 'tpu'" on every
    CPU/GPU machine; the devices actually used are logged instead). Other warnings
    and errors stay."""

    def filter(self, record):
        if record.name == "asyncio" and any(part in record.getMessage()
                                            for part in _CHECKPOINT_IO):
            return False  # leftover futures of a failed save or read, reported already
        if "/orbax/" in record.pathname:
            message = record.getMessage()
            if any(part in message for part in _ORBAX_SAVE_FAILURE):
                return False  # the trainer reports a failed save itself, in one line
            return record.levelno >= logging_lib.WARNING and "read only" not in message
        if record.pathname.endswith("xla_bridge.py") and record.levelno < logging_lib.WARNING:
            return "Unable to initialize backend" not in record.getMessage()
        return True


def quiet_library_notices():
    """Installs DropLibraryNotices on absl's handler (main.py) and on the "absl" logger
    itself, through which Orbax's notices reach stderr in commands that do not run
    under absl's app (predict, visualize)."""
    for target in (logging.get_absl_handler(), logging_lib.getLogger("absl")):
        if not any(isinstance(f, DropLibraryNotices) for f in target.filters):
            target.addFilter(DropLibraryNotices())
    if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


def _drop_closed_loop_callbacks(default):
    """After a failed checkpoint read or write, TensorStore still delivers callbacks
    to the asyncio loop Orbax has closed; Python prints each one's "Event loop is
    closed" traceback (dozens), burying the one-line error the run reports."""
    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        default(unraisable)
    hook.drops_closed_loop_callbacks = True
    return hook


class ConsoleFormatter(logging_lib.Formatter):
    """The console's lines: the local time and the message (`06:32:31 step 100/880:
    ...`), with the level after the time for warnings and errors (`06:32:31 WARNING
    ...`). absl's own prefix (`I1202 06:32:31.847694 140559977057152 train.py:489] `)
    gives the date, microseconds, thread id and source line of every line, some 50
    characters that only a bug hunt reads; log.txt keeps the date and the level."""

    def format(self, record):
        level = f"{record.levelname} " if record.levelno >= logging_lib.WARNING else ""
        line = f"{self.formatTime(record, '%H:%M:%S')} {level}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def setup_console():
    """Gives absl's console handler, through which every log line of a command reaches
    stderr, the ConsoleFormatter; called once at start-up by the commands that log
    (main.py, python -m noah_jax.study)."""
    logging.get_absl_handler().setFormatter(ConsoleFormatter())


RUN_LOG = "log.txt"
_run_log_handler: logging_lib.Handler | None = None


def attach(workdir: str) -> None:
    """Copies the log lines (INFO and up) of process 0 into workdir/log.txt, appending
    across restarts. A handler left by an earlier run in this process is replaced."""
    global _run_log_handler
    detach()
    if jax.process_index() > 0:
        return
    handler = logging_lib.FileHandler(os.path.join(workdir, RUN_LOG))
    handler.setLevel(logging_lib.INFO)
    handler.setFormatter(logging_lib.Formatter("%(asctime)s %(levelname)s %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
    handler.addFilter(DropLibraryNotices())
    logging_lib.getLogger().addHandler(handler)
    _run_log_handler = handler


def detach() -> None:
    global _run_log_handler
    if _run_log_handler is not None:
        logging_lib.getLogger().removeHandler(_run_log_handler)
        _run_log_handler.close()
        _run_log_handler = None


def append(workdir: str, line: str, level: str = "ERROR") -> None:
    """Adds `line` to workdir/log.txt if the run got as far as creating it (main.py
    records what ended a run there, and prints it once on the console)."""
    path = os.path.join(workdir, RUN_LOG)
    if jax.process_index() == 0 and os.path.exists(path):
        with open(path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {level} {line}\n")


# The run's scalars as JSON lines: one object per `write_scalars` call of the trainer,
# the step and every scalar of that call, e.g.
#   {"step": 100, "train/loss": 0.51, "train/accuracy": 0.87, ...}
#   {"step": 110, "eval/loss": 0.32, "eval/top1": 0.95, ...}
# A resumed run appends, repeating the steps after the checkpoint it resumed from, so
# readers keep the last value of each (step, key) (`read_metrics`).
METRICS_FILE = "metrics.jsonl"


def metric_writer(workdir: str):
    """TensorBoard event files and WORKDIR/metrics.jsonl on process 0 (nothing on the
    others); the readable lines are logged separately."""
    # Imported here: CLU's writers import TensorFlow (about 3 s), which the other users
    # of this module (prediction, figures) do not need.
    from clu import metric_writers

    from noah_jax.train import jsonl_writer
    if jax.process_index() > 0:
        return metric_writers.MultiWriter([])
    return metric_writers.AsyncMultiWriter([
        metric_writers.SummaryWriter(workdir),
        jsonl_writer.JsonLinesWriter(os.path.join(workdir, METRICS_FILE))])


def read_metrics(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """WORKDIR/metrics.jsonl as {key: [(step, value), ...] in increasing step order},
    keeping the last value written for each (step, key) (a resumed run rewrites the
    steps after its checkpoint). {} when the file does not exist."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return {}
    latest: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record.pop("step"))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number} is not a metrics record "
                                 f"({type(e).__name__}: {e}): {line[:100]!r}") from None
            for key, value in record.items():
                latest.setdefault(key, {})[step] = float(value)
    return {key: sorted(values.items()) for key, values in latest.items()}


class StepTrace:
    """A profiler trace of training steps first .. first + count - 1 (process 0), written
    where TensorBoard looks for it: WORKDIR/plugins/profile/<time>/. count 0: none."""

    def __init__(self, workdir: str, first: int, count: int):
        self.workdir, self.first, self.last = workdir, first, first + count - 1
        self.enabled = count > 0 and jax.process_index() == 0
        self.running = False

    def before(self, step: int) -> None:
        if self.enabled and step == self.first:
            jax.profiler.start_trace(self.workdir)
            self.running = True

    def after(self, step: int, state) -> None:
        if self.running and step >= self.last:
            jax.block_until_ready(state)  # the traced steps run to their end in the trace
            self.stop()
            logging.info("profile of steps %d-%d written to %s; view it with: tensorboard "
                         "--logdir %s (Profile tab, needs tensorboard-plugin-profile)",
                         self.first, self.last, os.path.join(self.workdir, "plugins",
                                                             "profile"), self.workdir)

    def stop(self) -> None:
        if self.running:
            self.running = False
            jax.profiler.stop_trace()


def format_metrics(results: dict[str, float]) -> str:
    return ", ".join(f"{k} {int(v)}" if k.endswith(("count", "_step")) else f"{k} {v:.4f}"
                     for k, v in results.items())


def format_duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes >= 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    return f"{minutes}m{int(seconds % 60):02d}s"
