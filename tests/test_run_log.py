"""What a run tells the user: library notices dropped, workdir/log.txt, line formats."""

import logging

from absl import logging as absl_logging

from noah_jax import run_log


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


def test_line_formats():
    assert run_log.format_metrics({"eval/top1": 0.98889, "eval/count": 360.0}) == (
        "eval/top1 0.9889, eval/count 360")
    assert run_log.format_duration(75.4) == "1m15s"
    assert run_log.format_duration(2 * 3600 + 5 * 60 + 59) == "2h05m"
