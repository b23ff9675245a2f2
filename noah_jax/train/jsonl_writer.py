"""The CLU metric writer behind WORKDIR/metrics.jsonl (`run_log.METRICS_FILE`).

`run_log.metric_writer` adds it beside TensorBoard's writer; `run_log.read_metrics`
reads the file back. It lives in its own module because importing CLU's writers
imports TensorFlow, which the other users of `run_log` do not need.
"""

from __future__ import annotations

import json
import os

from clu.metric_writers import interface


class JsonLinesWriter(interface.MetricWriter):
    """Scalars as JSON lines: one object per `write_scalars` call, the step and every
    scalar of that call: {"step": 100, "train/loss": 0.51, "train/accuracy": 0.87}.

    The file is appended to (a resumed run adds to it). Each line is written out when
    it is complete, and a line torn by a killed process is cut off when the file is
    opened again, so the file stays one valid record per line. Values are written as
    floats, a NaN or infinite one as JSON's (non-standard) NaN / Infinity, which
    Python's json reads back. Images, texts, histograms and the other kinds of summary
    are left to TensorBoard.
    """

    def __init__(self, path: str):
        _cut_torn_last_line(path)
        self._file = open(path, "a", buffering=1)  # line-buffered

    def write_scalars(self, step, scalars):
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


def _cut_torn_last_line(path: str) -> None:
    """Drops a last line without its newline (a write cut short by a killed process)."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
