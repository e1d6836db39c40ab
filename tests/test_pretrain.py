"""Pretraining end to end on real CIFAR-10 (tiny model), resume, data parallelism and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import CONF_DIR, TINY_PRETRAIN, requires_cifar10
from conftest import compose_config as compose

from sslvit import ConfigError
from sslvit.checkpoint import load_params
from sslvit.metrics import read_metrics
from sslvit.pretraining import Pretraining, pretrain
from sslvit.train import Preempted

REPO = CONF_DIR.parent
TINY = TINY_PRETRAIN


@requires_cifar10
def test_pretraining_run_learns_and_writes_its_run_dir(pretrain_run):
    run_dir = pretrain_run
    results = json.loads((run_dir / "results.json").read_text())
    for name in ("results.json", "tokenizer.npz", "metrics.jsonl", "checkpoints", "tb"):
        assert (run_dir / name).exists(), name
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert rows[-1]["loss"] < rows[0]["loss"]
    # The online k-NN monitor, in the rows of steps 30 and 60 (one row per step), TensorBoard and the results.
    knn = [(r["step"], r["monitor/knn_top1"]) for r in rows if "monitor/knn_top1" in r]
    assert [s for s, _ in knn] == [30, 60] and all(0.15 < v <= 1 for _, v in knn), knn  # chance: 0.1
    assert results["monitor/knn_top1"] == knn[-1][1] and results["monitor_seconds"] > 0
    from test_metrics import tb_scalars

    assert tb_scalars(run_dir, "monitor/knn_top1") == [(s, pytest.approx(v)) for s, v in knn]
    assert 0 < rows[0]["lr"] and rows[-1]["lr"] < max(r["lr"] for r in rows)  # warmup then decay
    assert results["nonfinite_steps"] == 0
    # Held-out masked-token accuracy clearly above chance (always the most frequent code).
    assert results["test_accuracy"] > 1.4 * results["chance_accuracy"], results
    params, meta = load_params(run_dir)
    assert meta["stage"] == "pretrain" and meta["encoder"]["model"]["dim"] == 64
    assert meta["encoder"]["stem"] == {"name": "hmlp", "norm": "batch"}
    assert params["encoder"]["layers"]["attn"]["qkv_kernel"].shape == (2, 64, 2, 3, 2, 32)


def _kill_when_step_logged(run_dir, step: int, timeout: float = 300):
    """SIGTERM this process once metrics.jsonl shows `step` (what a scheduler's preemption does)."""

    def watch():
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if any(r["step"] >= step for r in read_metrics(run_dir)):
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            except Exception:
                pass
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


@requires_cifar10
@pytest.mark.parametrize("source", ["tfds", "arrays"])
def test_sigterm_saves_and_resume_matches_uninterrupted_run_bitwise(tmp_path, source, request):
    """Also on the device path (data.source=arrays: index batches, images made inside the step from its key), with
    a per-layer drop-path schedule: every random draw follows from (seed, step)."""
    overrides = TINY + [
        "steps=16",
        "log_every=2",
        "ckpt_every=100",
        "eval_batches=0",
        "model.drop_path=0.2",
        "batch_size=32",
    ]
    if source == "arrays":
        overrides += [
            "data=cifar10_arrays",
            f"data.path={request.getfixturevalue('cifar10_arrays')}",
            "model.drop_path_schedule=linear",
            "target.num_samples=5000",
        ]
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    pretrain(compose("pretrain", overrides), full_dir)

    _kill_when_step_logged(cut_dir, 6)
    with pytest.raises(Preempted) as stopped:
        pretrain(compose("pretrain", overrides), cut_dir)
    assert 6 <= stopped.value.step < 16
    with pytest.raises(ConfigError, match="resume=true"):  # a second plain start must not clobber the run
        Pretraining(compose("pretrain", overrides), cut_dir).run()
    pretrain(compose("pretrain", overrides + ["resume=true"]), cut_dir)

    a, _ = load_params(full_dir)
    b, _ = load_params(cut_dir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    steps = [r["step"] for r in read_metrics(cut_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # no duplicated rows after resume


def _run_dp(n_devices: int) -> dict:
    """Three steps of global batch 64 in one process over `n_devices` CPU devices (tests/workers)."""
    from test_distributed import finish_worker, start_worker

    return finish_worker(start_worker("synthetic_steps", 0, 1, 0, "-", 64, devices=n_devices), timeout=600)[0]


def test_data_parallel_on_8_devices_matches_one_device():
    one, eight = _run_dp(1), _run_dp(8)
    assert one["devices"] == 1 and eight["devices"] == 8 and eight["sharded"] == 8
    # Same global batch, BatchNorm statistics over the global batch (hMLP stem): same losses step after step.
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)
    assert eight["losses"][-1] != eight["losses"][0]


@pytest.mark.parametrize(
    "override,match",
    [
        ("mask_ratio=1.5", "mask_ratio=1.5"),
        ("mask_ratio=0.001", "masks 0 of 64 patches"),
        ("mask_ratio=abc", "mask_ratio='abc'"),
        ("target.vocab_size=1", "vocab_size"),
        ("model.image_size=30", "model.image_size=30 is not divisible by model.patch_size=4"),
        ("model.heads=5", "model.dim=64 is not divisible by model.heads=5"),
        ("model.depth=two", "model.depth='two'"),
        ("optim.lr=0", "optim.lr=0"),
        ("steps=0", "steps=0"),
        ("batch_size=-4", "batch_size=-4"),
    ],
)
def test_bad_config_values_fail_at_construction(override, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        Pretraining(compose("pretrain", TINY + [override]), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_dataset_is_one_clear_error(tmp_path):
    cfg = compose("pretrain", TINY + [f"data.data_dir={tmp_path}", "data.download=false"])
    with pytest.raises(ConfigError, match=r"cifar10.*not"):
        Pretraining(cfg, tmp_path / "run").run()
    assert not (tmp_path / "run" / "checkpoints").exists()


def _cli(run_dir, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, str(REPO / "pretrain.py"), *args, f"hydra.run.dir={run_dir}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_cli_prints_one_line_for_bad_input(tmp_path):
    out = _cli(tmp_path, "mask_ratio=1.5")
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "mask_ratio=1.5" in errors[0]
    assert "Traceback" not in out.stderr
    unknown = _cli(tmp_path, "stem=resnet")
    assert unknown.returncode != 0 and "stem" in unknown.stderr and "hmlp" in unknown.stderr
