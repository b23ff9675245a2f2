"""Stopping a run cleanly on SIGTERM, Ctrl-C (SIGINT) or a platform's preemption notice.

A preempted TPU VM, a spot GPU VM or a SLURM job at its time limit gets SIGTERM and a
short grace period. Either signal becomes a request to stop: the trainer asks
`should_stop(step)` after every step, and at the first step where the answer is yes,
every process saves a checkpoint of that step, waits for the write and exits
(`errors.Stopped`). A restart with the same command resumes there.

One process: Python handlers note the signal, and the next step stops.

Several processes: the signal may reach only some of them, and all must save the same
step. JAX's distributed runtime already listens for SIGTERM (its preemption notifier,
which platform notices feed too) and agrees on a step through its coordination
service; `should_stop` is then `multihost_utils.reached_preemption_sync_point(step)`,
and SIGINT is handed to that notifier as a SIGTERM to this process. No Python SIGTERM
handler is installed there: it would replace the runtime's.

A second signal while stopping is logged and ignored, so the save in progress
completes. (Even a kill -9 during the save loses only that save: Orbax writes into a
temporary folder and renames it when complete.)
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

HANDLED = (signal.SIGTERM, signal.SIGINT)


def _coordinated() -> bool:
    """Whether JAX's distributed runtime, with its preemption service, runs here."""
    return jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service


class StopRequests:
    """A context manager that turns SIGTERM/SIGINT into `should_stop(step)`.

    Handlers are only installed in the main thread (Python delivers signals there);
    elsewhere, e.g. a trainer called from a worker thread, signals keep their defaults.
    """

    def __init__(self):
        self.signum: int | None = None
        self.coordinated = _coordinated()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                if signum == signal.SIGTERM and self.coordinated:
                    continue  # the distributed runtime's notifier handles it
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self.uninstall()

    def uninstall(self) -> None:
        """Gives the signals back to the handlers found on entry (idempotent)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            logging.warning("%s received again while stopping: ignored, so that the "
                            "checkpoint being written completes", name)
            return
        self.signum = signum
        logging.warning("%s received: training stops after this step, once a checkpoint "
                        "of it is saved", name)
        if self.coordinated and signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # to the runtime's preemption notifier

    def should_stop(self, step: int) -> bool:
        """Whether to save `step` and stop; call it after every step, with every process."""
        if self.coordinated:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signum is not None

    def reason(self) -> str:
        if self.signum is not None:
            return signal.Signals(self.signum).name
        return "a preemption notice (SIGTERM to one of the processes, or the platform's)"
