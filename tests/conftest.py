"""Shared fixtures: composing the repo's Hydra configs, one tiny real pretraining run on CIFAR-10, and one
persistent compilation cache for the session (below).

The pretraining run is session-scoped (made once, reused by the probe and fine-tune tests). It needs CIFAR-10
prepared for tfds in $TFDS_DATA_DIR; without it, tests using it are skipped with the reason.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import pytest

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# One persistent compilation cache for the whole session, this process (set before any test module imports JAX)
# and the scripts the tests start: a step compiled by one test is loaded by the next that builds the same program
# (the same executable, so no result changes), ~1/4 off the integration tests' time on 2 cores. A temporary dir, not
# the user's ~/.cache/sslvit/jax; a JAX_COMPILATION_CACHE_DIR of the shell is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sslvit_tests_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# A pretraining run small enough for 2 CPU cores (~40 s): 64-d, 2 layers x 2 branches, hMLP stem (BatchNorm),
# 60 steps of batch 64 on 2048 CIFAR-10 images, 64-code k-means tokenizer fitted on 20k patches, the online k-NN
# monitor at steps 30 and 60 (512 train images against 256 test images).
TINY_PRETRAIN = [
    "model.dim=64",
    "model.depth=2",
    "model.heads=2",
    "model.mlp_dim=128",
    "steps=60",
    "log_every=10",
    "ckpt_every=30",
    "optim.warmup_steps=5",
    "optim.lr=3e-3",
    "data.train_split='train[:2048]'",
    "target.vocab_size=64",
    "target.num_samples=20000",
    "eval_batches=4",
    "batch_size=64",
    "progress=false",
    "monitor.every=30",
    "monitor.num_train=512",
    "monitor.num_test=256",
]


def compose_config(config_name: str, overrides: Sequence[str] = ()):
    """The repo's Hydra config `conf/<config_name>.yaml` with command-line style overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def run_without_tensorflow(data_overrides: Sequence[str], out_dir: Path) -> dict:
    """Pretraining, probe and fine-tuning on the given data in a fresh interpreter with TensorFlow blocked from import
    (tests/workers/no_tensorflow.py): {'results': {stage: results}, 'tensorflow_modules': [those loaded]}."""
    workers = Path(__file__).resolve().parent / "workers"
    env = dict(
        os.environ,
        PYTHONPATH=f"{workers.parent}{os.pathsep}{workers.parents[1]}",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    proc = subprocess.run(
        [sys.executable, str(workers / "no_tensorflow.py"), json.dumps(list(data_overrides)), str(out_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([s for s in proc.stdout.splitlines() if s.startswith("RESULT ")][-1][len("RESULT ") :])


@pytest.fixture(scope="session")
def hydra_compose() -> Callable:
    """`hydra_compose(config_name, overrides)` -> the composed DictConfig."""
    return compose_config


def cifar10_dir() -> str | None:
    """The tfds data dir holding CIFAR-10 ($TFDS_DATA_DIR), or None."""
    d = os.environ.get("TFDS_DATA_DIR")
    return d if d and (Path(d) / "cifar10").is_dir() else None


NO_CIFAR10 = (
    "CIFAR-10 not prepared: set TFDS_DATA_DIR to a tfds data dir holding cifar10 "
    "(e.g. ../shared/tensorflow_datasets); no internet here"
)
# The one availability check of the integration tests: `@requires_cifar10`, or the `tfds_cifar10` fixture.
requires_cifar10 = pytest.mark.skipif(cifar10_dir() is None, reason=NO_CIFAR10)


@pytest.fixture(scope="session")
def tfds_cifar10() -> str:
    """The tfds data dir holding CIFAR-10 (skips the test when there is none)."""
    d = cifar10_dir()
    if d is None:
        pytest.skip(NO_CIFAR10)
    return d


@pytest.fixture(scope="session")
def cifar10_arrays(tfds_cifar10, tmp_path_factory) -> Path:
    """A folder with train.npz (the first 2048 CIFAR-10 training images) and test.npz (the first 512 test images),
    written by the arrays source's own tool (`python -m sslvit.data.materialize`)."""
    from sslvit.data.materialize import materialize

    out = tmp_path_factory.mktemp("cifar10_arrays")
    materialize("cifar10", out, ["train[:2048]=train", "test[:512]=test"], data_dir=tfds_cifar10)
    return out


@pytest.fixture(scope="session")
def pretrain_run(tfds_cifar10, tmp_path_factory) -> Path:
    """The run dir of a tiny real pretraining run on CIFAR-10 (checkpoints at steps 30 and 60, tokenizer, results)."""
    from sslvit.pretraining import pretrain

    run_dir = tmp_path_factory.mktemp("pretrain_run")
    pretrain(compose_config("pretrain", TINY_PRETRAIN), run_dir)
    return run_dir


@pytest.fixture
def compiles():
    """A list that collects every XLA compile while the test runs ("before any compile" made checkable), also one
    served from a persistent compilation cache (JAX_COMPILATION_CACHE_DIR set in the shell running the tests)."""
    import jax

    seen: list[str] = []

    def on_duration(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    def on_event(event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    yield seen
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)
