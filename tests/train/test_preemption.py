"""StopRequests: signals become a stop at the next step, never an exception.

The trainer's use of it (a SIGTERM'd run saves its step and resumes to the same
parameters, on one process and on a 2-process cluster) is tested in test_train.py.
"""

import os
import signal

import pytest

from noah_jax.train import preemption


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_becomes_a_stop_request_and_a_second_one_is_ignored(signum):
    before = {s: signal.getsignal(s) for s in preemption.HANDLED}
    with preemption.StopRequests() as stop:
        assert not stop.coordinated  # no jax.distributed runtime in this process
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signum)  # delivered before the next bytecode: no exception
        assert stop.should_stop(2) and stop.should_stop(3)
        assert stop.signum == signum and stop.reason() == signal.Signals(signum).name
        os.kill(os.getpid(), signum)  # while "saving": logged and ignored
        assert stop.signum == signum
    # Leaving restores the handlers found on entry (pytest's own SIGINT handler included).
    assert {s: signal.getsignal(s) for s in preemption.HANDLED} == before


def test_without_a_signal_nothing_stops():
    with preemption.StopRequests() as stop:
        assert not any(stop.should_stop(step) for step in range(1, 100))
        assert stop.signum is None
