"""Tests for sslvit.metrics: JSON lines and TensorBoard event files written, read back, truncated and resumed."""

import json
import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslvit.errors import ConfigError
from sslvit.metrics import METRICS_FILE, TB_DIR, MetricWriter, read_metrics, truncate_after


def tb_scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir / TB_DIR))  # reads every event file in the dir, oldest first
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_jsonl_and_tensorboard_round_trip(tmp_path):
    with MetricWriter(tmp_path / "run") as w:
        w.write(
            10,
            {
                "loss": jnp.float32(2.5),
                "acc": np.float64(0.125),
                "lr": 1e-3,
                "nonfinite_steps": jnp.int32(3),
                "grad_norm": jnp.asarray([0.75], jnp.bfloat16),
                "bad": float("nan"),
            },
        )
        w.write(
            20, {"loss": jnp.asarray(1.5), "acc": 0.25, "lr": 2e-3, "nonfinite_steps": 4, "grad_norm": 0.5, "bad": 1.0}
        )
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[0]["loss"] == 2.5 and rows[0]["acc"] == 0.125 and rows[0]["lr"] == 1e-3
    assert rows[0]["nonfinite_steps"] == 3 and isinstance(rows[0]["nonfinite_steps"], int)
    assert rows[0]["grad_norm"] == 0.75 and math.isnan(rows[0]["bad"])
    assert read_metrics(tmp_path / "run" / METRICS_FILE) == rows  # the file itself is accepted too
    assert tb_scalars(tmp_path / "run", "loss") == [(10, 2.5), (20, 1.5)]
    assert tb_scalars(tmp_path / "run", "nonfinite_steps") == [(10, 3.0), (20, 4.0)]
    assert tb_scalars(tmp_path / "run", "acc") == [(10, 0.125), (20, 0.25)]


def test_rows_are_on_disk_before_close(tmp_path):
    w = MetricWriter(tmp_path)
    w.write(1, {"loss": 1.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]  # flushed per write: a crash keeps it
    assert tb_scalars(tmp_path, "loss") == [(1, 1.0)]
    w.close()


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricWriter(tmp_path / "run", enabled=False, resume_step=5)
    w.write(1, {"loss": 1.0})
    w.flush()
    w.close()
    assert not (tmp_path / "run").exists()


def test_bad_metrics_are_rejected(tmp_path):
    with MetricWriter(tmp_path) as w:
        with pytest.raises(ValueError, match=r"metric 'hist' has shape \(3,\); only scalars"):
            w.write(1, {"hist": np.zeros(3)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            w.write(1, {"step": 3})
    assert (tmp_path / METRICS_FILE).read_text() == ""


def test_truncated_last_line_is_tolerated(tmp_path, caplog):
    with MetricWriter(tmp_path) as w:
        for s in (1, 2, 3):
            w.write(s, {"loss": float(s)})
    path = tmp_path / METRICS_FILE
    path.write_text(path.read_text()[:-9])  # crash in the middle of writing the last row
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    # a corrupt line in the middle is skipped with a warning naming it
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 3.0}\n')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 3]
    assert any(f"{path}:2: skipping corrupt line" in r.getMessage() for r in caplog.records)


def test_appending_after_a_crash_does_not_glue_rows(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with MetricWriter(tmp_path) as w:
        w.write(2, {"loss": 2.5})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.5}]


def test_truncate_after(tmp_path):
    assert truncate_after(tmp_path, 3) == 0  # no file yet: nothing to do
    path = tmp_path / METRICS_FILE
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 8)) + '{"step": 8')
    assert truncate_after(tmp_path, 4) == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert path.read_text().endswith('"loss": 0.4}\n')
    assert truncate_after(tmp_path, 10) == 0 and len(read_metrics(tmp_path)) == 4


def test_resume_drops_the_crashed_runs_later_steps(tmp_path):
    with MetricWriter(tmp_path, resume_step=0) as w:  # first attempt: logs 2..10, "crashes" after step 10
        for s in range(2, 11, 2):
            w.write(s, {"loss": float(s)})
    with MetricWriter(tmp_path, resume_step=6) as w:  # resumed from the checkpoint of step 6
        for s in range(8, 13, 2):
            w.write(s, {"loss": 100.0 + s})
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [
        (2, 2.0),
        (4, 4.0),
        (6, 6.0),
        (8, 108.0),
        (10, 110.0),
        (12, 112.0),
    ]
    assert len(list((tmp_path / TB_DIR).glob("events.out.tfevents.*"))) == 2
    assert tb_scalars(tmp_path, "loss") == [
        (s, v) for s, v in ((2, 2.0), (4, 4.0), (6, 6.0), (8, 108.0), (10, 110.0), (12, 112.0))
    ]


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"no metrics file .*metrics.jsonl: pass the run dir"):
        read_metrics(tmp_path / "nope")


def test_without_the_tensorboard_package_metrics_go_to_jsonl_only(tmp_path):
    """A bare JAX host may lack tensorboard: the writer logs the JSON lines and says it writes no event files."""
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from sslvit.metrics import MetricWriter\n"
        f"w = MetricWriter({str(tmp_path)!r}); w.write(3, {{'loss': 1.5}}); w.close()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tensorboard package is not installed" in proc.stderr
    assert read_metrics(tmp_path) == [{"step": 3, "loss": 1.5}]
    assert not (tmp_path / "tb").exists()
