"""The project's own error types: mistakes and events a user can act on.

`main.py` prints any `UserError` as one line (`error: <message>`; the trainer also
appends it to the run's log.txt once the run has started writing) and exits 1; every
other exception is a bug in this code or a library and keeps its traceback. Each type
also derives from the builtin a caller would expect (a bad config value is still a
ValueError), so library users can catch either.

`Stopped` is not an error: the run stopped on a signal or a preemption notice after
saving a checkpoint, and the exit status tells schedulers it did not finish.
"""

from __future__ import annotations

import signal
from typing import Sequence


class UserError(Exception):
    """Something the person running the code can fix; the message says how."""


class ConfigError(UserError, ValueError):
    """A config field, flag or model setting that cannot work."""


class UnknownSettingError(ConfigError, TypeError):
    """A keyword (a model override, a converter setting) the receiver does not have."""


class DataError(UserError, ValueError):
    """A dataset that is missing, malformed or does not fit the config."""


class ImageFileError(DataError):
    """An image to predict on that is missing, unreadable, undecodable or too large."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used, read or written."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was expected."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint's variables do not fit the model they are loaded into.

    The message is one line: the checkpoint, what to do, and the differences counted
    with a few keys of each kind by name (a model of another depth differs in dozens of
    keys). `problems` lists every difference, a line each."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


# How each kind of key difference is counted in a one-line mismatch message (a
# checkpoint that does not fit, and `python -m noah_jax.convert`'s summary).
_DIFFERENCE_COUNTS = {"missing": "{n} key{s} missing", "unexpected": "{n} unexpected key{s}",
                      "shape": "{n} of another shape", "dtype": "{n} not numeric"}


def count_differences(by_kind: dict[str, Sequence[str]], examples: int = 3) -> str:
    """Key differences by kind ('missing', 'unexpected', 'shape', 'dtype': each a list
    of short texts) in one line, a count per kind with its first few texts:
    '36 keys missing (e.g. a; b; c), 1 of another shape (d)'; '' when there are none."""
    parts = []
    for kind, listed in by_kind.items():
        if listed:
            shown = "; ".join(listed[:examples])
            more = "e.g. " if len(listed) > examples else ""
            count = _DIFFERENCE_COUNTS[kind].format(n=len(listed), s="s" * (len(listed) != 1))
            parts.append(f"{count} ({more}{shown})")
    return ", ".join(parts)


class CheckpointWriteError(CheckpointError, OSError):
    """Saving a checkpoint failed (disk full, no permission, ...); earlier ones are intact."""


class WorkdirError(UserError):
    """A --workdir that cannot hold a run: a file, under a file, not writable."""


class WorkdirInUseError(UserError):
    """Another live run holds the workdir."""


class NonFiniteError(UserError, FloatingPointError):
    """A step produced NaN/Inf; training stopped before it reached a checkpoint."""


class Stopped(Exception):
    """Training stopped early on a signal or preemption notice, with a checkpoint saved.

    `exit_code` follows the shell's convention for a process ended by that signal
    (128 + signal number: 143 for SIGTERM, 130 for SIGINT), so job schedulers and
    retry loops see an unfinished run.
    """

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
