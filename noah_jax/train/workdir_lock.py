"""One live run per workdir: a lock file that names its holder (and the checks a workdir
path must pass before a run writes there: `check_workdir_path`).

Two runs writing one workdir would interleave checkpoints and overwrite each other's
config and logs, each reporting success. So a run holds `<workdir>/run.lock` from its
first write to its exit: a JSON line with the host, pid and start time of the holder.
A second run refuses, naming the holder.

A run that dies without cleaning up (kill -9, a lost machine) leaves its lock behind.
Such a lock is taken over, with a warning, when it is provably stale:
  * on the same host, when no process with that pid and start time is alive;
  * from any host, when the holder stopped refreshing it: a live holder touches the
    file every `REFRESH_SECONDS`, so one untouched for `STALE_SECONDS` belongs to a
    run that is gone (the case of a preempted pod whose new VMs have new host names).

Multi-host: process 0 takes the lock and tells the others whether it got it; they
follow (they never touch the file).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from noah_jax import cli
from noah_jax.errors import WorkdirError, WorkdirInUseError

LOCK_NAME = "run.lock"
REFRESH_SECONDS = 60.0
STALE_SECONDS = 600.0


def check_workdir_path(workdir: str) -> None:
    """Refuses a workdir that is a file, lies under one, or cannot be written."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"workdir {workdir} is a file, not a folder: give a folder (a new "
                           "path, or the workdir of a run to resume)")
    existing = cli.nearest_existing(path)
    if not os.path.isdir(existing):
        raise WorkdirError(f"workdir {workdir}: {existing} is a file, so no folder can be made "
                           "under it; give a path whose folders are folders")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {workdir}: {existing} is not writable by this user; give "
                           "a workdir you can write to")


def _start_ticks(pid: int) -> Optional[int]:
    """A process's start time in clock ticks since boot (Linux), which tells a live
    process from a later one that reused its pid; None where /proc has no such entry."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22; the command name (field 2) may contain spaces, so count from ')'.
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start_ticks: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return start_ticks is None or _start_ticks(pid) in (None, start_ticks)


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {started}"


class WorkdirLock:
    """Holds `<workdir>/run.lock` while in use (`with WorkdirLock(workdir): ...`).

    `took_over` says why a stale lock was replaced (for the run's log), else None."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._stop = threading.Event()
        self._refresher: Optional[threading.Thread] = None
        self._held = False
        self.took_over: Optional[str] = None  # why a stale lock was taken over, if one was

    # -------------------------------------------------------------- single process
    def _read_holder(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written or garbled: judged by its age alone

    def _stale_reason(self, holder: dict) -> Optional[str]:
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return "it is gone"
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _alive(holder["pid"], holder.get("start_ticks")):
                return f"its process ({_describe(holder)}) is no longer running"
        if age > STALE_SECONDS:
            return (f"its holder ({_describe(holder)}) has not refreshed it for "
                    f"{age / 60:.0f} minutes")
        return None

    def _acquire_local(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "start_ticks": _start_ticks(os.getpid()), "started": time.time()}
        for _ in range(10):  # retried only when racing another starter over a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is None:
                    continue  # released meanwhile
                stale = self._stale_reason(holder)
                if stale is None:
                    raise WorkdirInUseError(
                        f"workdir {os.path.dirname(self.path)} is in use by another run "
                        f"({_describe(holder)}): wait for it to finish, or use another "
                        f"--workdir; if that run is surely gone, delete {self.path}")
                # Moving it away is atomic: of two starters, one wins, the other retries.
                aside = f"{self.path}.stale.{os.getpid()}"
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                os.remove(aside)
                self.took_over = stale
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self._held = True
            return
        raise WorkdirInUseError(f"could not take the lock {self.path}: other runs keep "
                                "starting on this workdir")

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                os.utime(self.path)
            except OSError as e:
                logging.warning("cannot refresh the workdir lock %s: %s", self.path, e)

    # -------------------------------------------------------------- every process
    def __enter__(self) -> "WorkdirLock":
        error = None
        if jax.process_index() == 0:
            try:
                self._acquire_local()
            except WorkdirInUseError as e:
                error = e
        if jax.process_count() > 1:
            got_it = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not int(got_it) and error is None:
                error = WorkdirInUseError(
                    f"workdir {os.path.dirname(self.path)} is in use by another run "
                    "(process 0 says which)")
        if error is not None:
            raise error
        if self._held:
            self._refresher = threading.Thread(target=self._refresh, daemon=True,
                                               name="workdir-lock-refresh")
            self._refresher.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        if not self._held:
            return
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
        holder = self._read_holder() or {}
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            os.remove(self.path)
        self._held = False
