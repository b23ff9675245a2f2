"""What a run tells the user: library notices dropped, the console's lines,
workdir/log.txt, metrics.jsonl, line formats."""

import json
import logging
import math
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging as absl_logging

from noah_jax.train import run_log


def record(pathname, level, message, name="x"):
    return logging.LogRecord(name, level, pathname, 1, message, None, None)


def test_library_notices_are_dropped_and_everything_else_kept():
    keep = run_log.DropLibraryNotices().filter
    orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not keep(record(orbax, logging.INFO, "Saving checkpoint at step 3"))
    assert not keep(record(orbax, logging.WARNING, "opened in read only mode"))
    assert keep(record(orbax, logging.WARNING, "Checkpoint step 3 is corrupt"))
    bridge = "/site-packages/jax/_src/xla_bridge.py"
    assert not keep(record(bridge, logging.INFO, "Unable to initialize backend 'tpu': ..."))
    assert keep(record(bridge, logging.WARNING, "Unable to initialize backend 'cuda': ..."))
    assert keep(record("/work/noah_jax/train.py", logging.INFO, "step 3: eval/top1 0.5"))


def test_a_failed_saves_repeated_tracebacks_are_dropped_but_other_errors_kept():
    keep = run_log.DropLibraryNotices().filter
    future = "/site-packages/orbax/checkpoint/_src/futures/future.py"
    assert not keep(record(future, logging.ERROR, "[thread=array_type_handler] "
                           "_SignalingThread.run() raised an exception: RESOURCE_EXHAUSTED"))
    manager = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not keep(record(manager, logging.ERROR, "[step=8] Save Finalize thread (save_finalize)"
                           " failed."))
    assert keep(record(manager, logging.ERROR, "Could not delete step 4"))
    loop = "/lib/python3.11/asyncio/base_events.py"
    leftover = ("_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture "
                "exception=ValueError('RESOURCE_EXHAUSTED: ... /w/checkpoints/8.orbax-checkpoint-"
                "tmp/train.orbax-checkpoint-tmp/ocdbt.process_0/')>")
    assert not keep(record(loop, logging.ERROR, leftover, name="asyncio"))
    damaged_read = ("Future exception was never retrieved\nfuture: <Future finished exception="
                    "ValueError('OUT_OF_RANGE: Error reading \"params.head/.zarray\" in OCDBT "
                    "database at local file \"/w/checkpoints/40/model/\"')>")
    assert not keep(record(loop, logging.ERROR, damaged_read, name="asyncio"))
    assert keep(record(loop, logging.ERROR, "Task exception was never retrieved", name="asyncio"))


def test_the_run_log_copies_info_lines_once_and_appends_errors(tmp_path):
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)  # as app.run sets it in main.py
    try:
        write_a_run_log(tmp_path)
    finally:
        absl_logging.set_verbosity(verbosity)
    lines = (tmp_path / run_log.RUN_LOG).read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "INFO step 7: eval/top1 0.5000", "WARNING a warning",
        "ERROR FloatingPointError: non-finite loss at step 9"]
    run_log.append(str(tmp_path / "never_started"), "error")  # no log: nothing created
    assert not (tmp_path / "never_started").exists()


def write_a_run_log(tmp_path):
    run_log.attach(str(tmp_path))
    absl_logging.info("step %d: eval/top1 %.4f", 7, 0.5)
    absl_logging.debug("not for the log")
    run_log.attach(str(tmp_path))  # a second attach replaces the handler: no doubled lines
    absl_logging.warning("a warning")
    run_log.detach()
    absl_logging.info("after the run")
    run_log.append(str(tmp_path), "FloatingPointError: non-finite loss at step 9")


def test_console_lines_are_the_time_and_the_message_and_warnings_say_so():
    def at_06_32_31(level, message, *args, exc_info=None):
        line = logging.LogRecord("absl", level, "/work/noah_jax/train.py", 489, message,
                                 args, exc_info)
        line.created = time.mktime((2025, 12, 2, 6, 32, 31, 0, 0, -1)) + 0.847694
        return line

    console = run_log.ConsoleFormatter()
    assert console.format(at_06_32_31(logging.INFO, "step %d/%d: loss %.4f", 100, 880,
                                      0.5)) == "06:32:31 step 100/880: loss 0.5000"
    assert console.format(at_06_32_31(logging.WARNING, "a warning")) == (
        "06:32:31 WARNING a warning")
    try:
        raise ValueError("bad")
    except ValueError:
        lines = console.format(at_06_32_31(logging.ERROR, "failed", exc_info=sys.exc_info())
                               ).splitlines()
    assert lines[:2] == ["06:32:31 ERROR failed", "Traceback (most recent call last):"]
    assert lines[-1] == "ValueError: bad"

    handler = absl_logging.get_absl_handler()
    formatter = handler.python_handler.formatter
    try:
        run_log.setup_console()  # as main.py and the study do at start-up
        assert handler.format(at_06_32_31(logging.INFO, "written")) == "06:32:31 written"
    finally:
        handler.setFormatter(formatter)


def test_line_formats():
    assert run_log.format_metrics({"eval/top1": 0.98889, "eval/count": 360.0}) == (
        "eval/top1 0.9889, eval/count 360")
    assert run_log.format_duration(75.4) == "1m15s"
    assert run_log.format_duration(2 * 3600 + 5 * 60 + 59) == "2h05m"


def test_metrics_jsonl_is_appended_by_a_resumed_run_and_read_back_last_values(tmp_path):
    writer = run_log.metric_writer(str(tmp_path))
    writer.write_scalars(1, {"train/loss": np.float32(2.5), "train/accuracy": 0.25})
    writer.write_scalars(2, {"train/loss": 2.0})
    writer.write_scalars(2, {"eval/top1": jnp.asarray(0.5), "eval/loss": float("nan")})
    writer.write_images(2, {"picture": np.zeros((1, 2, 2, 3))})  # TensorBoard's only
    writer.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))  # beside the TensorBoard files
    path = tmp_path / run_log.METRICS_FILE
    assert [json.loads(line) for line in path.read_text().splitlines()][:2] == [
        {"step": 1, "train/loss": 2.5, "train/accuracy": 0.25}, {"step": 2, "train/loss": 2.0}]

    with open(path, "a") as f:
        f.write('{"step": 3, "train/lo')  # a run killed in mid-write
    writer = run_log.metric_writer(str(tmp_path))  # the resumed run: the torn line goes
    writer.write_scalars(2, {"train/loss": 1.75})  # it repeats the steps after its checkpoint
    writer.write_scalars(3, {"train/loss": 1.5})
    writer.close()
    metrics = run_log.read_metrics(str(tmp_path))
    [(step, loss)] = metrics.pop("eval/loss")
    assert step == 2 and math.isnan(loss)  # written as JSON's NaN, read back
    assert metrics == {"train/loss": [(1, 2.5), (2, 1.75), (3, 1.5)],
                       "train/accuracy": [(1, 0.25)], "eval/top1": [(2, 0.5)]}
    assert run_log.read_metrics(str(tmp_path / "no_run")) == {}


def test_a_malformed_metrics_line_is_named_by_file_and_line(tmp_path):
    (tmp_path / run_log.METRICS_FILE).write_text('{"step": 1, "a": 2.0}\n{"a": 3.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a metrics record"):
        run_log.read_metrics(str(tmp_path))
