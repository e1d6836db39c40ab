"""Reliability: kill -9 and resume bit-for-bit, SIGTERM, non-finite steps, bad input, sweeps.

The subprocess tests run `pretrain.py` exactly as a user does, on a micro model (32-d, 1 layer x 2 branches) and
256 CIFAR-10 images; each process costs ~20 s on 2 cores, nearly all start-up (imports, data, compile).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import CONF_DIR, TINY_PRETRAIN, compose_config, requires_cifar10

from sslvit import ConfigError
from sslvit.checkpoint import load_params
from sslvit.metrics import read_metrics

REPO = CONF_DIR.parent

# A micro run; drop path on so the rng stream matters for bit-identity; 256 images of batch 16 = 16 steps per
# epoch, so a 40-step run crosses epoch boundaries (the data order must resume too). PIXEL skips the tokenizer fit.
PIXEL = [
    "model.dim=32",
    "model.depth=1",
    "model.heads=2",
    "model.mlp_dim=64",
    "model.drop_path=0.2",
    "batch_size=16",
    "log_every=1",
    "ckpt_every=3",
    "keep_checkpoints=2",
    "optim.warmup_steps=2",
    "optim.lr=1e-3",
    "data.train_split='train[:256]'",
    "eval_batches=0",
    "progress=false",
    "target=pixel",
]
MICRO = [*PIXEL[:-1], "target.vocab_size=16", "target.num_samples=2000", "target.iters=3"]  # k-means tokens


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """The subprocesses' environment: JAX's persistent compilation cache shared by this file's runs (a process
    that finds its train step there starts ~10 s sooner; results are the same executables' either way)."""
    return dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )


def _start(env: dict, run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "pretrain.py"), *overrides, f"hydra.run.dir={run_dir}"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _finalized_steps(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _logged_step(run_dir: Path) -> int:
    try:
        rows = read_metrics(run_dir)
    except Exception:
        return 0
    return rows[-1]["step"] if rows else 0


def _wait_for(proc: subprocess.Popen, cond, timeout: float = 180, poll: float = 0.005) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def _assert_same_state(a_dir: Path, b_dir: Path) -> None:
    """The latest checkpoints hold the same train state, bit for bit: params, optimizer moments, BatchNorm
    statistics, step and non-finite counters."""
    a, _ = load_params(a_dir, subtree=None)
    b, _ = load_params(b_dir, subtree=None)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------------ kill -9, SIGTERM
@requires_cifar10
def test_kill_9_then_sigterm_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, env):
    """kill -9 at a random step after the first checkpoint; resume=true; SIGTERM at a later random step (exit 75,
    a checkpoint of that very step, a printed resume command); run that command: the final train state equals an
    uninterrupted run's bit for bit, and metrics.jsonl holds each step once. SSLVIT_KILL_SEED=<n> replays a draw."""
    steps = 40
    seed = int(os.environ.get("SSLVIT_KILL_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    kill_at = rng.randint(4, 16)  # after the first checkpoint (step 3)
    overrides = [*MICRO, f"steps={steps}"]
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = _start(env, full_dir, *overrides)  # the uninterrupted run, concurrently (2 cores)
    cut = _start(env, cut_dir, *overrides)
    reached = _wait_for(cut, lambda: _finalized_steps(cut_dir) and _logged_step(cut_dir) >= kill_at)
    cut.send_signal(signal.SIGKILL)
    rc, _, err = _finish(cut)
    assert reached, f"(seed {seed}) the run ended before step {kill_at}: rc {rc}\n{err[-3000:]}"
    assert rc == -signal.SIGKILL
    killed_at = _logged_step(cut_dir)
    assert killed_at <= steps - 10, f"(seed {seed}) the kill came too late ({killed_at}) to test anything"
    pending = [p.name for p in (cut_dir / "checkpoints").iterdir() if not p.name.isdigit()]

    # Resume, then SIGTERM (what SLURM and cloud schedulers send) at a later step.
    resumed = _start(env, cut_dir, *overrides, "resume=true")
    term_at = rng.randint(killed_at + 2, steps - 6)
    assert _wait_for(resumed, lambda: _logged_step(cut_dir) >= term_at), _finish(resumed)[2][-3000:]
    resumed.send_signal(signal.SIGTERM)
    rc, _, err = _finish(resumed)
    assert rc == 75, err[-3000:]  # EX_TEMPFAIL: checkpoint saved, run again (sslvit/cli.py)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("preempted:")]
    assert len(lines) == 1, err[-3000:]
    stopped = int(lines[0].split("stopped at step ")[1].split()[0])
    assert term_at <= stopped < steps
    assert _finalized_steps(cut_dir)[-1] == stopped  # the current step, not only the last periodic checkpoint
    command = shlex.split(lines[0].split("continue with: ")[1])
    assert command[-2:] == ["resume=true", f"hydra.run.dir={cut_dir}"]

    rc, _, err = _finish(
        subprocess.Popen(
            [sys.executable, *command[1:]], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    )
    assert rc == 0, err[-3000:]
    log = (cut_dir / "pretrain.log").read_text()
    starts = [
        int(line.split("resumed from step ")[1].split()[0]) for line in log.splitlines() if "resumed from step" in line
    ]
    assert len(starts) == 2 and 3 <= starts[0] <= killed_at and starts[1] == stopped, (starts, killed_at)
    rc, _, err = _finish(full)
    assert rc == 0, err[-3000:]

    _assert_same_state(full_dir, cut_dir)
    assert [r["step"] for r in read_metrics(cut_dir)] == list(range(1, steps + 1))
    print(
        f"seed {seed}: killed at step {killed_at} (pending saves {pending}), resumed from {starts[0]}, "
        f"SIGTERM at {stopped}"
    )


# ------------------------------------------------------------------------------------------------ non-finite
@requires_cifar10
def test_nonfinite_steps_are_skipped_counted_and_a_streak_stops_the_run_naming_the_checkpoint(tmp_path, env):
    run_dir = tmp_path / "never_created"  # resume=true on a dir that does not exist: starts fresh and says so
    worker = REPO / "tests" / "workers" / "poisoned_pretrain.py"  # NaN images at steps 4, 7, 8, ... (1-based)
    out = subprocess.run(
        [
            sys.executable,
            str(worker),
            *PIXEL,
            "steps=40",
            "max_nonfinite_streak=3",
            "resume=true",
            f"hydra.run.dir={run_dir}",
        ],
        env=dict(env, PYTHONPATH=str(REPO)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 3, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    # Steps (1-based) 4 and 7, 8, 9 saw NaN images; 3 in a row at step 9 -> stop. Checkpoints every 3 steps:
    # step 9's is not written (the guard runs first), so step 6 is the last good one.
    assert "3 consecutive steps" in errors[0] and "up to step 9, 4 in all" in errors[0]
    assert f"last good checkpoint is step 6 in {run_dir / 'checkpoints'}" in errors[0]
    assert "resume=true but no checkpoint" in (run_dir / "pretrain.log").read_text()

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 3, 4]
    assert [not np.isfinite(r["loss"]) for r in rows] == [False] * 3 + [True] + [False] * 2 + [True] * 3
    assert _finalized_steps(run_dir) == [3, 6]
    params, _ = load_params(run_dir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------------------------------ bad input

# Every numeric key of conf/pretrain.yaml and its groups, out of range or mistyped as on a command line. Each must
# be one line naming the key (the expected text) and what is allowed, raised before any compile.
BAD_INPUT = [
    ("seed=-1", "seed=-1 must be an integer >= 0"),
    ("seed=abc", "seed='abc'"),
    ("seed=true", "seed=True"),
    ("mask_ratio=0", "mask_ratio=0 must be a number in (0, 1)"),
    ("mask_ratio=1", "mask_ratio=1 must be"),
    ("mask_ratio=[0.4]", "mask_ratio=[0.4] must be a number in (0, 1)"),
    ("mask_ratio=nan", "mask_ratio=nan"),
    ("batch_size=0", "batch_size=0 must be an integer >= 1"),
    ("batch_size=ten", "batch_size='ten'"),
    ("batch_size=16.0", "batch_size=16.0"),
    ("steps=ten", "steps='ten' must be an integer >= 1"),
    ("steps=0", "steps=0"),
    ("steps=[10]", "steps=[10]"),
    ("log_every=0", "log_every=0 must be an integer >= 1"),
    ("ckpt_every=2.5", "ckpt_every=2.5"),
    ("keep_checkpoints=0", "keep_checkpoints=0 must be an integer >= 1"),
    ("keep_checkpoints=two", "keep_checkpoints='two'"),
    ("eval_batches=-1", "eval_batches=-1 must be an integer >= 0, or null"),
    ("eval_batches=x", "eval_batches='x'"),
    ("resume=maybe", "resume='maybe' must be true or false"),
    ("resume=1", "resume=1 must be true or false"),
    ("progress=maybe", "progress='maybe' must be true or false"),
    ("max_nonfinite_streak=0", "max_nonfinite_streak=0 must be an integer >= 1"),
    ("optim.name=sgd", "optim.name='sgd'"),
    ("optim.lr=0", "optim.lr=0 must be a number in (0, 10)"),
    ("optim.lr=inf", "optim.lr=inf"),
    ("optim.lr=1e30", "optim.lr=1e+30"),
    ("optim.lr=fast", "optim.lr='fast'"),
    ("optim.min_lr=-1", "optim.min_lr=-1"),
    ("optim.min_lr=1.0", "optim.min_lr=1 must be a number in [0, optim.lr="),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1"),
    ("optim.warmup_steps=1.5", "optim.warmup_steps=1.5"),
    ("optim.b1=1", "optim.b1=1"),
    ("optim.b2=-0.1", "optim.b2=-0.1"),
    ("optim.eps=0", "optim.eps=0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1"),
    ("optim.clip_grad_norm=0", "optim.clip_grad_norm=0"),
    ("optim.layer_decay=1.5", "optim.layer_decay=1.5"),
    ("optim.accum_steps=0", "optim.accum_steps=0"),
    ("optim.accum_steps=3", "batch_size=64 is not divisible by 1 devices x 3 accumulation steps"),
    ("model.image_size=0", "model.image_size=0 must be a positive integer"),
    ("model.image_size=30", "model.image_size=30 is not divisible by model.patch_size=4"),
    ("model.patch_size=0", "model.patch_size=0"),
    ("model.patch_size=x", "model.patch_size='x'"),
    ("model.dim=0", "model.dim=0"),
    ("model.dim=x", "model.dim='x'"),
    ("model.heads=0", "model.heads=0"),
    ("model.heads=5", "model.dim=64 is not divisible by model.heads=5"),
    ("model.depth=-1", "model.depth=-1"),
    ("model.num_parallel_branches=0", "model.num_parallel_branches=0"),
    ("model.mlp_dim=-5", "model.mlp_dim=-5"),
    ("model.dim_head=x", "model.dim_head='x'"),
    ("model.channels=0", "model.channels=0"),
    ("model.drop_path=1.0", "model.drop_path=1.0 must be a number in [0, 1)"),
    ("model.dropout=1.5", "model.dropout=1.5"),
    ("model.drop_path=x", "model.drop_path='x'"),
    ("model.layer_scale_init=0", "model.layer_scale_init=0 must be a number > 0"),
    ("model.layer_scale_init=x", "model.layer_scale_init='x'"),
    ("model.pool=max", "model.pool='max' must be one of cls, mean"),
    ("model.pos_embedding=rope", "model.pos_embedding='rope' must be one of learned, sincos"),
    ("model.dtype=float16", "model.dtype='float16'"),
    ("model.remat=maybe", "model.remat='maybe' must be true or false"),
    ("model.unroll_layers=2", "model.unroll_layers=2 must be true or false"),
    ("stem.name=resnet", "stem.name='resnet' is not a stem: choose one of conv, hmlp, linear"),
    ("stem.norm=group", "stem.norm='group' must be one of batch, layer"),
    ("mask.min_patches=0", "mask.min_patches=0 must be an integer >= 1"),
    ("mask.max_patches=x", "mask.max_patches='x'"),
    ("mask.min_aspect=2", "mask.min_aspect=2 must be a number in (0, 1]"),
    ("target.vocab_size=1", "target.vocab_size=1 must be an integer in [2, 65536]"),
    ("target.vocab_size=100000", "target.vocab_size=100000"),
    ("target.num_samples=10", "target.num_samples=10"),
    ("target.iters=0", "target.iters=0"),
    ("target.path=/nonexistent/tokenizer.npz", "target.path='/nonexistent/tokenizer.npz': no such file"),
    ("data.num_classes=0", "data.num_classes=0"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer=0"),
    ("data.mean=[1,2]", "data.mean=[1, 2] must be a list of 3 numbers"),
    ("data.std=[0,0,0]", "data.std="),
    ("data.crop_scale=[0.5,0.2]", "data.crop_scale="),
    ("data.eval_crop_pct=0", "data.eval_crop_pct=0"),
    ("data.flip=maybe", "data.flip='maybe' must be true or false"),
    ("data.on_corrupt=ignore", "data.on_corrupt="),
    ("data.train_split=5", "data.train_split=5"),
]


@pytest.mark.parametrize("override,expected", BAD_INPUT, ids=[o for o, _ in BAD_INPUT])
def test_bad_input_is_one_line_naming_the_key_before_any_compile(override, expected, compiles, tmp_path):
    from sslvit.pretraining import Pretraining

    cfg = compose_config("pretrain", [*TINY_PRETRAIN, override])
    with pytest.raises(ConfigError) as err:
        Pretraining(cfg, tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert expected in message, message
    assert compiles == []


@requires_cifar10
@pytest.mark.parametrize(
    "override,expected",
    [
        ("data.train_split='train[:x]'", "data.train_split='train[:x]' is not a valid split of cifar10"),
        ("data.test_split=tst", "data.test_split='tst' is not a valid split"),
        ("data.name=cifar11", "data.name='cifar11' is not a tfds dataset"),
    ],
)
def test_bad_dataset_keys_fail_when_the_run_starts_before_any_compile(override, expected, compiles, tmp_path):
    from sslvit.pretraining import Pretraining

    with pytest.raises(ConfigError) as err:
        Pretraining(compose_config("pretrain", [*TINY_PRETRAIN, override]), tmp_path).run()
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert compiles == [] and not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------ sweeps
@requires_cifar10
def test_a_failing_sweep_job_neither_stops_the_sweep_nor_hides_its_error(tmp_path, env):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "pretrain.py"),
            "-m",
            "mask_ratio=1.5,0.4",
            *PIXEL,
            "steps=40",
            f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=${hydra.job.num}",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 1, out.stderr[-3000:]  # the sweep ran both jobs, then reports the failure
    assert "error: 1 of 2 sweep jobs failed, e.g. job 0: mask_ratio=1.5" in out.stderr

    rows = {r["job"]: r for r in map(json.loads, (sweep / "summary.jsonl").read_text().splitlines())}
    assert rows[0]["status"] == "failed" and "mask_ratio=1.5 must be a number in (0, 1)" in rows[0]["error"]
    assert "mask_ratio=1.5" in rows[0]["overrides"] and rows[0]["results"] is None
    assert rows[1]["status"] == "ok" and rows[1]["error"] is None
    assert json.loads(Path(rows[1]["results"]).read_text())["steps"] == 40  # the valid job trained after the failure
    failed = sweep / "0"
    assert "mask_ratio=1.5 must be a number" in (failed / "pretrain.log").read_text()  # in the job's own log
    error = (failed / "error.txt").read_text()
    assert error.startswith("error: mask_ratio=1.5") and "Traceback" in error
    assert not (sweep / "1" / "error.txt").exists()
