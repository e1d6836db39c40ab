"""Multi-process JAX: two processes on localhost (CPU collectives) train in lockstep, match one process with the
same global batch, and run the real pretraining stage together (one tokenizer, one set of checkpoints, logs and
results from process 0 only); the same for fine-tuning, and a 2-process linear probe equal to a 1-process one.
Plus the pure config/environment resolution of `sslvit.distributed`, and every script starting from it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import CONF_DIR, cifar10_dir, compose_config

from sslvit import ConfigError
from sslvit.distributed import KEYS, resolve, slurm_num_tasks

REPO = CONF_DIR.parent
RESULTS = "results.json"
STAGE_FILE = ".stage"  # sslvit/rundir.py

# Worker scripts (tests/workers/): process `pid` of `n` (n=1: a plain single-process run), CPU collectives over
# gloo; each prints one RESULT line.
WORKERS = REPO / "tests" / "workers"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(worker: str, pid: int, n: int, port: int, *args: str, devices: int = 1) -> subprocess.Popen:
    """Process `pid` of `n` running tests/workers/<worker>.py with `args`; `devices` CPU devices per process."""
    env = dict(
        os.environ,
        PYTHONPATH=f"{WORKERS}{os.pathsep}{REPO / 'tests'}{os.pathsep}{REPO}",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    return subprocess.Popen(
        [sys.executable, str(WORKERS / f"{worker}.py"), str(pid), str(n), str(port), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_worker(proc: subprocess.Popen, timeout: float = 240) -> tuple[dict, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    line = [s for s in stdout.splitlines() if s.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :]), stderr


@pytest.mark.slow
def test_two_processes_train_in_lockstep_and_match_one_process(tmp_path):
    real = cifar10_dir() is not None
    run_dir = tmp_path / "run"
    port = _free_port()
    # All three at once: the reference run overlaps the pair's start-up.
    procs = [start_worker("synthetic_steps", i, 2, port, run_dir if real else "-", 16) for i in range(2)]
    procs.append(start_worker("synthetic_steps", 0, 1, 0, "-", 16))
    (p0, err0), (p1, err1), (one, _) = [finish_worker(p) for p in procs]

    assert (p0["process"], p1["process"]) == (0, 1)
    assert p0["processes"] == p1["processes"] == 2 and p0["devices"] == 2 and p0["local_rows"] == 8
    assert one["processes"] == 1 and one["local_rows"] == 16
    # Lockstep: the replicated loss is the same number on both processes, step after step.
    assert p0["losses"] == p1["losses"]
    # The same global batch over 2 processes trains like 1 process (BatchNorm statistics are global).
    np.testing.assert_allclose(p0["losses"], one["losses"], rtol=2e-5)
    assert p0["losses"][-1] != p0["losses"][0]

    if not real:
        pytest.skip("stage part needs CIFAR-10 in TFDS_DATA_DIR (see ../shared/README.md)")
    assert p0["stage"] == p1["stage"] and p0["stage"]["test_batches"] == 1
    assert 0 <= p0["stage"]["monitor/knn_top1"] <= 1  # computed by both processes together, the same on both
    assert np.isfinite(p0["stage"]["train_loss"])
    assert json.loads((run_dir / "results.json").read_text())["train_loss"] == p0["stage"]["train_loss"]
    assert (run_dir / "tokenizer.npz").exists()
    # SIGTERM on process 1 only: both stop after the same step and save it together.
    stop = p1["stopped_at"]
    assert stop is not None and p0["stopped_at"] == stop and 6 <= stop < 12, (p0, p1)
    # Checkpoints written once, collectively: the finalized steps only, no leftover temporary dirs.
    ckpts = sorted(os.listdir(run_dir / "checkpoints"), key=int)
    assert ckpts == ["2", "4", str(stop)], ckpts
    # Metrics from process 0 only: one row per step, not two.
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stop + 1)), steps
    # Logs: INFO from process 0 only; process 1 stays quiet unless something is wrong.
    assert "INFO sslvit.pretraining: pretraining" in err0
    assert "INFO sslvit" not in err1, err1[-2000:]


def _stage_pair_and_reference(stage: str, run, tmp_path, overrides: list[str]):
    """Process 0 and 1 of a 2-process run into tmp_path/pair and the 1-process reference into tmp_path/one, all
    three at once."""
    port = _free_port()
    procs = [start_worker("stage_pair", i, 2, port, stage, run, tmp_path / "pair", *overrides) for i in range(2)]
    procs.append(start_worker("stage_pair", 0, 1, 0, stage, run, tmp_path / "one", *overrides))
    (p0, err0), (p1, err1), (one, _) = [finish_worker(p) for p in procs]
    assert (p0["process"], p1["process"], p0["processes"], p1["processes"], one["processes"]) == (0, 1, 2, 2, 1)
    # Results, the run dir's stage marker and logs from process 0 only.
    assert p0["written"] == [STAGE_FILE, RESULTS] and p1["written"] == [], (p0["written"], p1["written"])
    assert "INFO sslvit" in err0 and "INFO sslvit" not in err1, err1[-2000:]
    return p0, p1, one


@pytest.mark.slow
def test_two_processes_finetune_in_lockstep_and_match_one_process(pretrain_run, tmp_path):
    """Fine-tuning the tiny pretraining run on 2 processes (Mixup + CutMix, drop-path and label smoothing on: every
    random draw spans the global batch) steps like 1 process fed the same global batches; the test split is
    counted once (250 images: uneven padded shards)."""
    steps = 4
    p0, p1, one = _stage_pair_and_reference(
        "finetune",
        pretrain_run,
        tmp_path,
        [
            "data.train_split='train[:256]'",
            "data.test_split='test[:250]'",
            "batch_size=32",
            f"steps={steps}",
            "log_every=1",
            "ckpt_every=2",
            "optim.warmup_steps=1",
            "finetune.mixup_alpha=0.8",
            "finetune.cutmix_alpha=1.0",
        ],
    )
    # Each process reads its own rows: distinct shards, together the reference's global batch.
    assert len(p0["first_labels"]) == len(p1["first_labels"]) == 16 and p0["first_labels"] != p1["first_labels"]
    assert p0["first_labels"] + p1["first_labels"] == one["first_labels"]
    # Lockstep: the same replicated loss on both processes at every step, and the 1-process loss.
    assert len(p0["losses"]) == steps and p0["losses"] == p1["losses"]
    np.testing.assert_allclose(p0["losses"], one["losses"], rtol=2e-5)
    assert p0["losses"][-1] != p0["losses"][0]
    r0, r1, ref = p0["results"], p1["results"], one["results"]
    for key in ("train_loss", "test_top1", "test_examples"):
        assert r0[key] == r1[key], key
    assert r0["test_examples"] == ref["test_examples"] == 250
    assert r0["test_top1"] == ref["test_top1"]
    run_dir = tmp_path / "pair"
    assert json.loads((run_dir / RESULTS).read_text())["test_top1"] == r0["test_top1"]
    # Metrics once (process 0), checkpoints once (collectively).
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    np.testing.assert_allclose([r["loss"] for r in rows], p0["losses"], rtol=1e-6)
    assert sorted(os.listdir(run_dir / "checkpoints"), key=int) == ["2", "4"]


@pytest.mark.slow
def test_two_processes_probe_like_one_process(pretrain_run, tmp_path):
    """Both processes hold every feature in the split's order and train identical classifiers: the results are
    those of 1 process."""
    p0, p1, one = _stage_pair_and_reference(
        "linear_probe",
        pretrain_run,
        tmp_path,
        [
            "data.train_split='train[:512]'",
            "data.test_split='test[:250]'",
            "batch_size=64",
            "probe.epochs=5",
            "probe.batch_size=128",
            "knn.k=5",
        ],
    )
    assert p0["classifiers_sha256"] == p1["classifiers_sha256"]
    np.testing.assert_allclose(p0["w"], one["w"], rtol=1e-5, atol=1e-7)
    keys = ("num_train", "num_test", "layers", "top1", "train_top1", "knn_top1", "best_layer", "best_top1")
    r0, r1, ref = p0["results"], p1["results"], one["results"]
    assert (r0["num_train"], r0["num_test"]) == (512, 250)
    assert {k: r0[k] for k in keys} == {k: r1[k] for k in keys} == {k: ref[k] for k in keys}
    assert json.loads((tmp_path / "pair" / RESULTS).read_text())["top1"] == r0["top1"]


def test_two_processes_share_the_check_of_a_folder_dataset(tmp_path):
    """Each process of a run checks half of a folder's images (not all of them), both see the same dataset and the
    same corrupt files, and the manifest written once spares every process the check at the next start."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    (tmp_path / "train" / "a" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "train" / "b" / "worse.png").write_bytes(b"")
    port = _free_port()
    (p0, _), (p1, _) = [finish_worker(p) for p in [start_worker("folder_pair", i, 2, port, tmp_path) for i in range(2)]]
    # 26 train files (2 corrupt) and 8 test files: 13 + 13 and 4 + 4 checked.
    assert p0["checked"] == p1["checked"] == [[13, 26], [4, 8]], (p0, p1)
    assert p0["checked_again"] == p1["checked_again"] == []
    assert p0["same_again"] and p1["same_again"]
    assert (p0["num_train"], p0["num_test"]) == (p1["num_train"], p1["num_test"]) == (24, 8)
    assert (
        p0["skipped"]
        == p1["skipped"]
        == [str(tmp_path / "train" / "a" / "bad.jpg"), str(tmp_path / "train" / "b" / "worse.png")]
    )


# ------------------------------------------------------------------------------------------- resolution (pure)
SLURM_2 = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "node[001-002]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}


def test_single_process_unless_asked():
    assert resolve(None, {}) is None
    assert (
        resolve({"enabled": "auto", "coordinator_address": None, "num_processes": None, "process_id": None}, {}) is None
    )
    # One SLURM task (or a batch script outside srun) is a plain single-process run.
    assert resolve(None, dict(SLURM_2, SLURM_NTASKS="1")) is None
    assert resolve(None, {k: v for k, v in SLURM_2.items() if k != "SLURM_STEP_NODELIST"}) is None
    assert resolve({"enabled": False}, SLURM_2) is None


def test_slurm_and_explicit_settings():
    assert slurm_num_tasks(SLURM_2) == 2
    assert resolve(None, SLURM_2) == {}  # JAX's own SLURM detection fills in address, count and id
    assert resolve({"initialization_timeout": 60}, SLURM_2) == {"initialization_timeout": 60}
    kw = resolve({"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}, SLURM_2)
    assert kw == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert resolve(None, env) == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}


@pytest.mark.parametrize(
    "cfg,env,match",
    [
        ({"coordinator_address": "h:1", "num_processes": 2}, {}, "distributed.process_id not set"),
        (None, {"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "process_id=2 must be < "),
        ({"coordinator_address": "h", "num_processes": 2, "process_id": 0}, {}, "must be host:port"),
        ({"coordinator_address": "h:1", "num_processes": "two", "process_id": 0}, {}, "num_processes='two'"),
        ({"enabled": "yes"}, {}, "distributed.enabled='yes' must be one of auto, true, false"),
        ({"enabled": True}, {}, "no cluster found"),
        ({"coordinator": "h:1"}, {}, "distributed.coordinator is not a key of distributed: the keys are"),
    ],
)
def test_bad_settings_are_one_line_errors(cfg, env, match):
    with pytest.raises(ConfigError, match=match) as e:
        resolve(cfg, env)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("script", ["pretrain", "finetune", "linear_probe"])
def test_every_script_initializes_from_its_distributed_block_first(script, tmp_path, monkeypatch):
    """Each entry script hands its config's `distributed` block (the same keys in every config) to
    maybe_initialize before it starts the stage."""
    import importlib.util

    import sslvit.distributed

    class Initialized(Exception):
        pass

    calls = []

    def initialize(cfg):
        calls.append(cfg)
        raise Initialized

    monkeypatch.setattr(sslvit.distributed, "maybe_initialize", initialize)
    cfg = compose_config(script, [] if script == "pretrain" else ["run=null"])
    assert set(cfg.distributed) == set(KEYS)
    assert resolve(cfg.distributed, {}) is None  # the defaults: a plain single-process run
    spec = importlib.util.spec_from_file_location(f"script_{script}", REPO / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(Initialized):
        module._main(cfg, tmp_path)
    assert calls == [cfg.distributed]


# ------------------------------------------------------------------------------------------- SLURM launcher config
def test_slurm_launcher_config_builds_the_expected_sbatch_script(tmp_path, monkeypatch):
    """conf/hydra/launcher/slurm_gpu.yaml through the real plugin and submitit, up to the sbatch script (no SLURM
    here: a stand-in `srun` on PATH only satisfies submitit's check that it runs on a cluster)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[slurm]")
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "pretrain",
            ["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2", "resume=true"],
            return_hydra_config=True,
        )
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = launcher.params
    assert params["tasks_per_node"] == params["gpus_per_node"] == 4  # one process per GPU

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    # The same mapping as the plugin's launch(): executor-specific keys get the "slurm_" prefix.
    executor = submitit.AutoExecutor(
        folder=tmp_path / "jobs", cluster="slurm", slurm_max_num_timeout=params["max_num_timeout"]
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{
            (k if k in base else f"slurm_{k}"): v
            for k, v in params.items()
            if k not in ("submitit_folder", "max_num_timeout")
        }
    )
    script = executor._executor._make_submission_file_text("python pretrain.py", "uid")
    for line in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--requeue",
        "--signal=USR2@300",
        "--time=1440",
    ):
        assert f"#SBATCH {line}\n" in script, (line, script)
    assert "\nsrun " in script  # every task is a process of one srun step: what sslvit.distributed detects
