"""One live run per workdir: refusal naming the holder, and stale locks taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from noah_jax.train import workdir_lock
from noah_jax.errors import WorkdirInUseError


def write_lock(workdir, age_seconds=0.0, **holder):
    path = workdir / workdir_lock.LOCK_NAME
    path.write_text(json.dumps(holder) if holder else "")
    stamp = time.time() - age_seconds
    os.utime(path, (stamp, stamp))
    return path


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_workdir_refuses_a_second_holder_by_name_and_is_released(tmp_path):
    with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
        holder = json.loads((tmp_path / "run.lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert lock.took_over is None
        with pytest.raises(WorkdirInUseError,
                           match=rf"is in use by another run \(pid {os.getpid()} on "
                                 rf"{socket.gethostname()}, started .*delete .*run.lock"):
            workdir_lock.WorkdirLock(str(tmp_path)).__enter__()
    assert not (tmp_path / "run.lock").exists()
    with workdir_lock.WorkdirLock(str(tmp_path)):  # free again
        pass


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, host=socket.gethostname(), pid=pid, started=time.time())
    with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
        assert f"its process (pid {pid} on {socket.gethostname()}" in lock.took_over
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


def test_a_reused_pid_does_not_keep_a_dead_runs_lock(tmp_path):
    # The pid is alive (this process) but started at another time: not the holder.
    me = workdir_lock._start_ticks(os.getpid())
    assert me is not None
    write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), start_ticks=me - 1)
    with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
        assert "no longer running" in lock.took_over


@pytest.mark.parametrize("holder", [{"host": "another-host", "pid": 1, "started": 0.0}, {}],
                         ids=["other_host", "garbled"])
def test_other_hosts_locks_are_judged_by_their_refresh(tmp_path, holder):
    write_lock(tmp_path, age_seconds=workdir_lock.STALE_SECONDS - 60, **holder)
    with pytest.raises(WorkdirInUseError, match="in use by another run"):
        workdir_lock.WorkdirLock(str(tmp_path)).__enter__()
    write_lock(tmp_path, age_seconds=workdir_lock.STALE_SECONDS + 60, **holder)
    with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
        assert "has not refreshed it for 11 minutes" in lock.took_over


def test_the_holder_refreshes_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "REFRESH_SECONDS", 0.05)
    with workdir_lock.WorkdirLock(str(tmp_path)):
        path = tmp_path / "run.lock"
        old = time.time() - 3600
        os.utime(path, (old, old))
        deadline = time.time() + 10
        while path.stat().st_mtime < time.time() - 60 and time.time() < deadline:
            time.sleep(0.05)
        assert path.stat().st_mtime > time.time() - 60


def test_release_leaves_another_runs_lock_alone(tmp_path):
    lock = workdir_lock.WorkdirLock(str(tmp_path)).__enter__()
    write_lock(tmp_path, host="another-host", pid=1, started=0.0)  # replaced under us
    lock.release()
    assert json.loads((tmp_path / "run.lock").read_text())["host"] == "another-host"
