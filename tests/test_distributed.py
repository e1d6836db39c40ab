"""Multi-process JAX: two processes on localhost (CPU collectives) train in lockstep, match one process with the
same global batch, and run the real pretraining stage together (one tokenizer, one set of checkpoints, logs and
results from process 0 only). Plus the pure config/environment resolution of `sslvit.distributed`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import CONF_DIR

from sslvit import ConfigError
from sslvit.distributed import resolve, slurm_num_tasks

REPO = CONF_DIR.parent

WORKER = r"""
import json, logging, sys
pid, n, port, run_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from sslvit.distributed import maybe_initialize
assert maybe_initialize({"coordinator_address": f"127.0.0.1:{port}", "num_processes": n, "process_id": pid}) == (n > 1)
import jax.numpy as jnp, numpy as np
from conftest import TINY_PRETRAIN, compose_config as compose
from sslvit import optim
from sslvit.pretraining import Pretraining
from sslvit.train import batch_sharding, make_mesh, make_train_step, replicated, to_global

# (a) Synthetic data, global batch 16: each process feeds its own 16/n rows.
cfg = compose("pretrain", TINY_PRETRAIN + ["model.drop_path=0.0", "batch_size=16"])
p = Pretraining(cfg, "/tmp/unused")
mesh = make_mesh()
opt, _ = optim.make_optimizer(cfg.optim, jax.eval_shape(p.init_state_params), total_steps=10)
state = jax.jit(lambda: p.init_state(opt), out_shardings=replicated(mesh))()
rng = np.random.default_rng(0)
images = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
consts = {"codebook": jnp.asarray(rng.normal(size=(64, 48)).astype(np.float32)), "counts": jnp.ones(64, jnp.int32)}
step = jax.jit(make_train_step(p.loss_fn, opt, seed=0), donate_argnums=(0,),
               out_shardings=(replicated(mesh), replicated(mesh)))
rows = slice(pid * 16 // n, (pid + 1) * 16 // n)
losses = []
for i in range(3):
    mask = p.sampler(np.random.default_rng(i), 16)
    batch = to_global({"image": images[rows], "mask": mask[rows]}, batch_sharding(mesh))
    state, m = step(state, batch, consts)
    losses.append(float(m["loss"]))
out = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
       "losses": losses, "local_rows": int(batch["image"].addressable_shards[0].data.shape[0])}

# (b) The real stage on CIFAR-10, both processes into one run dir: 4 steps and the test-set evaluation, then a
# resumed run to step 12 that only process 1 is told to stop (SIGTERM) once step 6 is logged.
if run_dir != "-":
    import os, signal, threading, time
    from sslvit.metrics import read_metrics
    from sslvit.pretraining import pretrain
    from sslvit.train import Preempted
    common = TINY_PRETRAIN + ["log_every=1", "ckpt_every=2", "batch_size=16", "target.num_samples=1000",
                              "eval_batches=1", "data.train_split='train[:512]'"]
    res = pretrain(compose("pretrain", common + ["steps=4"]), run_dir)
    out["stage"] = {k: res.get(k) for k in ("train_loss", "test_accuracy", "test_batches")}
    if pid == 1:
        def watch():
            while not any(r["step"] >= 6 for r in read_metrics(run_dir)):
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=watch, daemon=True).start()
    try:
        pretrain(compose("pretrain", common + ["steps=12", "ckpt_every=100", "resume=true"]), run_dir)
        out["stopped_at"] = None
    except Preempted as e:
        out["stopped_at"] = e.step
print("RESULT " + json.dumps(out), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(pid: int, n: int, port: int, run_dir: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{REPO}", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-c", WORKER, str(pid), str(n), str(port), run_dir], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[dict, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    line = [s for s in stdout.splitlines() if s.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), stderr


def _has_cifar10() -> bool:
    d = os.environ.get("TFDS_DATA_DIR")
    return bool(d and os.path.isdir(os.path.join(d, "cifar10")))


@pytest.mark.slow
def test_two_processes_train_in_lockstep_and_match_one_process(tmp_path):
    real = _has_cifar10()
    run_dir = tmp_path / "run"
    port = _free_port()
    # All three at once: the reference run overlaps the pair's start-up.
    procs = [_start(i, 2, port, str(run_dir) if real else "-") for i in range(2)] + [_start(0, 1, 0, "-")]
    (p0, err0), (p1, err1), (one, _) = [_finish(p) for p in procs]

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


# ------------------------------------------------------------------------------------------- resolution (pure)
SLURM_2 = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
           "SLURM_LOCALID": "0"}


def test_single_process_unless_asked():
    assert resolve(None, {}) is None
    assert resolve({"enabled": "auto", "coordinator_address": None, "num_processes": None, "process_id": None},
                   {}) is None
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


@pytest.mark.parametrize("cfg,env,match", [
    ({"coordinator_address": "h:1", "num_processes": 2}, {}, "distributed.process_id not set"),
    (None, {"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "process_id=2 must be < "),
    ({"coordinator_address": "h", "num_processes": 2, "process_id": 0}, {}, "must be host:port"),
    ({"coordinator_address": "h:1", "num_processes": "two", "process_id": 0}, {}, "num_processes='two'"),
    ({"enabled": "yes"}, {}, "distributed.enabled='yes' must be auto, true or false"),
    ({"enabled": True}, {}, "no cluster found"),
    ({"coordinator": "h:1"}, {}, "distributed.coordinator is not a distributed key"),
])
def test_bad_settings_are_one_line_errors(cfg, env, match):
    with pytest.raises(ConfigError, match=match) as e:
        resolve(cfg, env)
    assert "\n" not in str(e.value)


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
        cfg = compose("pretrain", ["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu",
                                   "hydra.launcher.nodes=2", "resume=true"], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = launcher.params
    assert params["tasks_per_node"] == params["gpus_per_node"] == 4  # one process per GPU

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    # The same mapping as the plugin's launch(): executor-specific keys get the "slurm_" prefix.
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm",
                                     slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{(k if k in base else f"slurm_{k}"): v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python pretrain.py", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--requeue",
                 "--signal=USR2@300", "--time=1440"):
        assert f"#SBATCH {line}\n" in script, (line, script)
    assert "\nsrun " in script  # every task is a process of one srun step: what sslvit.distributed detects
