"""Metric writers: scalars as JSON lines (``<run_dir>/metrics.jsonl``) and TensorBoard event files (``<run_dir>/tb/``).

One JSON object per write, ``{"step": 100, "loss": 2.31, ...}``, appended and flushed at once, so a crash loses at
most the line being written; ``read_metrics`` skips such a truncated line. The event files are written with
TensorBoard's own record format and protos, without importing TensorFlow.

Resuming: ``MetricWriter(run_dir, resume_step=N)`` drops the rows the crashed run logged after step N from the
JSON lines, and writes a TensorBoard "session start" event at step N + 1, on which TensorBoard discards that run's
events from step N + 1 on; so no step appears twice in either.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from itertools import count
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

try:  # TensorBoard's record format and protos only (no TensorFlow); a bare JAX host may lack the package
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
except ImportError:  # then metrics.jsonl alone (MetricWriter says so once)
    event_pb2 = summary_pb2 = RecordWriter = None

from sslvit.errors import ConfigError
from sslvit.rundir import METRICS_FILE, TB_DIR

__all__ = ["METRICS_FILE", "TB_DIR", "MetricWriter", "read_metrics", "truncate_after"]

log = logging.getLogger(__name__)

_file_ids = count()  # keeps event file names unique (and ordered) within a process


def _to_scalar(name: str, value: Any) -> int | float:
    a = np.asarray(value)
    if a.size != 1:
        raise ValueError(f"metric {name!r} has shape {a.shape}; only scalars can be written (reduce it first)")
    x = a.reshape(()).item()
    return x if isinstance(x, int) else float(x)  # bools and ints stay ints; bfloat16 & co become float


def _parse_lines(path: Path) -> tuple[list[dict], list[str]]:
    """(rows, kept raw lines) of a metrics file; unparsable lines are skipped with a warning naming them."""
    text = path.read_text()
    lines = text.split("\n")
    rows, raw = [], []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as e:
            last = i == len(lines)  # no newline after it: cut off by a crash mid-write
            (log.info if last else log.warning)(
                "%s:%d: skipping %s line (%s)", path, i, "truncated last" if last else "corrupt", e
            )
            continue
        rows.append(row)
        raw.append(line)
    return rows, raw


def _metrics_path(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    return path if path.suffix == ".jsonl" else path / METRICS_FILE


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``<run_dir>/metrics.jsonl`` (or of the given ``.jsonl`` file), in file order."""
    path = _metrics_path(run_dir)
    if not path.is_file():
        raise ConfigError(
            f"no metrics file {path}: pass the run dir of a pretrain.py/finetune.py run (it holds {METRICS_FILE})"
        )
    return _parse_lines(path)[0]


def truncate_after(run_dir: str | os.PathLike, step: int) -> int:
    """Drop the rows with ``"step" > step`` (and any unparsable line) from ``metrics.jsonl``; returns how many rows
    went. The file is replaced atomically. For resuming a run from the checkpoint of ``step``."""
    path = _metrics_path(run_dir)
    if not path.is_file():
        return 0
    rows, raw = _parse_lines(path)
    keep = [line for row, line in zip(rows, raw) if row["step"] <= step]
    text = "".join(line + "\n" for line in keep)
    if text != path.read_text():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return len(rows) - len(keep)


class _EventFile:
    """A TensorBoard event file of scalar summaries (the format tf.summary writes), written synchronously."""

    def __init__(self, logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_file_ids):04d}"
        self.path = logdir / name
        self._records = RecordWriter(open(self.path, "wb"))
        # file_version 2 makes TensorBoard honour SessionLog.START for purging a crashed run's later events
        self._add(event_pb2.Event(file_version="brain.Event:2"))

    def _add(self, event: event_pb2.Event) -> None:
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
        )
        self._add(event_pb2.Event(step=step, summary=summary))

    def session_start(self, step: int) -> None:
        self._add(event_pb2.Event(step=step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


class MetricWriter:
    """Append scalar metrics to ``<run_dir>/metrics.jsonl`` and TensorBoard event files in ``<run_dir>/tb/``.

    Args:
      run_dir: the run's output directory (created if missing).
      enabled: False on processes other than 0 (``jax.process_index() != 0``): then every call is a no-op.
      resume_step: the step the run continues after (its checkpoint's step; 0 for a run starting over): rows and
        events a previous attempt logged after it are dropped. None: append to whatever is there.
      tensorboard: also write event files (default True; skipped, with one log line, where the tensorboard
        package is not installed).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ):
        self.run_dir = Path(run_dir).absolute()
        self.enabled = bool(enabled)
        self._jsonl = self._events = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            dropped = truncate_after(path, int(resume_step))
            if dropped:
                log.info("dropped %d metric rows after step %d from %s", dropped, resume_step, path)
        elif path.is_file():
            _cut_partial_last_line(path)  # else our first row would be glued onto it
        self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard and RecordWriter is None:
            log.info("the tensorboard package is not installed: metrics go to %s only", path)
        elif tensorboard:
            self._events = _EventFile(self.run_dir / TB_DIR)
            if resume_step is not None:
                self._events.session_start(int(resume_step) + 1)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write scalars (python/numpy/jax; one device->host transfer for all) for ``step``, flushed to disk."""
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step number; rename that metric")
        host = jax.device_get(dict(metrics))
        values = {str(k): _to_scalar(k, v) for k, v in host.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            self._events.scalars(int(step), values)
            self._events.flush()

    def note(self, step: int, **fields: Any) -> None:
        """A row of facts that are not scalars (e.g. the config changes of a resume), in metrics.jsonl only: read
        back by `read_metrics` like any row; plots and tables skip it (no loss)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": int(step), **fields}, default=str) + "\n")
        self._jsonl.flush()

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cut_partial_last_line(path: Path) -> None:
    """Remove bytes after the last newline (a row cut off by a crash)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.info("%s: dropping a truncated last line (%d bytes)", path, len(data) - cut)
        with open(path, "r+b") as f:
            f.truncate(cut)
