"""Tests for sslvit.checkpoint: round trips, retention, template checks, damage fallback, interrupted saves."""

import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sslvit.checkpoint import Checkpointer, find_checkpoint_dir, load_meta, load_params
from sslvit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def make_state(seed: int = 0) -> dict:
    """A small train state like train.py's: params of several dtypes, AdamW state (namedtuples), typed rng key."""
    rng = np.random.default_rng(seed)
    params = {
        "encoder": {
            "layers": {
                "qkv_kernel": jnp.asarray(rng.standard_normal((2, 4, 12)), jnp.float32),
                "scale": jnp.asarray(rng.standard_normal((2, 4)), jnp.bfloat16),
            },
            "pos_embed": jnp.asarray(rng.standard_normal((1, 5, 4)), jnp.float32),
        },
        "head": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)},
    }
    return {
        "step": jnp.int32(seed + 7),
        "params": params,
        "opt_state": optax.adamw(1e-3).init(params),
        "frozen": {},  # empty subtrees (no frozen params, no BatchNorm) must survive too
        "batch_stats": {"count": jnp.asarray([seed, 2, 3], jnp.int8), "flags": jnp.asarray([True, False])},
        "rng": jax.random.key(seed),
        "rng_data": jax.random.key_data(jax.random.key(seed + 1)),  # what callers without typed keys store
        "data_position": np.asarray(123 + seed, np.int32),  # int64 would become int32 in jax.eval_shape
    }


def assert_same_state(got, want) -> None:
    g, w = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in g] == [p for p, _ in w]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), (_, b) in zip(g, w):
        if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            assert jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key), path
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert a.dtype == b.dtype, (path, a.dtype, b.dtype)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def first_data_file(step_dir: Path) -> Path:
    """The largest array-data file of a saved state (OCDBT data files live in .../d/)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, step_dir
    return max(files, key=lambda p: p.stat().st_size)


META = {"model": {"depth": 2, "branches": 2, "stem": "hmlp"}, "data_position": 123, "tokenizer": "tok.npz"}


@pytest.mark.parametrize("template", ["concrete", "abstract"])
def test_round_trip_state_and_meta(tmp_path, template):
    state = make_state(1)
    with Checkpointer(tmp_path / "ck") as ckpt:
        assert ckpt.save(10, state, meta=META)
    ckpt = Checkpointer(tmp_path / "ck")
    target = make_state(0) if template == "concrete" else jax.eval_shape(lambda: make_state(0))
    got, meta = ckpt.restore(target=target)
    assert_same_state(got, state)
    assert isinstance(got["opt_state"][0], optax.ScaleByAdamState)  # template's containers, not dicts
    assert meta == META and ckpt.restored_step == 10
    assert ckpt.restore_meta() == META
    ckpt.close()


def test_directory_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointer("runs/ck")
    assert Path(os.fspath(ckpt.directory)) == tmp_path / "runs" / "ck"
    assert not (tmp_path / "runs").exists()  # nothing is written before the first save
    ckpt.save(0, {"x": jnp.ones(2)})
    ckpt.close()
    assert (tmp_path / "runs" / "ck" / "0").is_dir()


def test_interval_max_to_keep_and_force(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=5)
    wrote = [s for s in range(21) if ckpt.save(s, {"w": jnp.full((3,), s, jnp.float32)}, meta={"s": s})]
    assert wrote == [0, 5, 10, 15, 20]
    assert ckpt.all_steps() == [15, 20] and ckpt.latest_step() == 20
    assert not ckpt.should_save(23) and ckpt.save(23, {"w": jnp.full((3,), 23.0)}, force=True)
    assert ckpt.all_steps() == [20, 23]
    assert not ckpt.save(23, {"w": jnp.zeros(3)}, force=True)  # already saved: left alone, no error
    got, meta = ckpt.restore(target={"w": jnp.zeros(3)})
    np.testing.assert_array_equal(got["w"], np.full(3, 23.0))
    assert meta == {}
    assert ckpt.restore(20, target={"w": jnp.zeros(3)})[1] == {"s": 20}
    ckpt.close()
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [20, 23]


def test_async_save_is_safe_against_donated_buffers(tmp_path):
    ckpt = Checkpointer(tmp_path)
    w = jnp.arange(100_000, dtype=jnp.float32)
    host = np.arange(5)
    ckpt.save(1, {"w": w, "host": host})
    w.delete()  # what buffer donation to the next train step does
    host[:] = -1
    ckpt.wait()
    got, _ = ckpt.restore(target={"w": jnp.zeros(100_000), "host": np.zeros(5, np.int64)})
    np.testing.assert_array_equal(got["w"], np.arange(100_000, dtype=np.float32))
    np.testing.assert_array_equal(got["host"], np.arange(5))
    ckpt.close()


def test_meta_must_be_json(tmp_path):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        ckpt.save(0, {"w": jnp.ones(2)}, meta={"lr": object()})
    assert ckpt.all_steps() == [] and not any(tmp_path.iterdir())


def test_mismatching_template_names_the_leaf(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, {"params": {"layers": {"attn": {"qkv_kernel": jnp.zeros((6, 2, 4))}}, "b": jnp.zeros(4)}})
    ckpt = Checkpointer(tmp_path)
    other = {"params": {"layers": {"attn": {"qkv_kernel": jnp.zeros((12, 1, 4))}}, "b": jnp.zeros(4)}}
    with pytest.raises(ConfigError) as e:
        ckpt.restore(target=other)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "holds a different model" in msg
    assert "params/layers/attn/qkv_kernel has shape (6, 2, 4) but the model expects (12, 1, 4)" in msg
    with pytest.raises(ConfigError, match=r"params/extra \(expected shape \(2,\)\) is missing from the checkpoint"):
        ckpt.restore(
            target={
                "params": {
                    "layers": {"attn": {"qkv_kernel": jnp.zeros((6, 2, 4))}},
                    "b": jnp.zeros(4),
                    "extra": jnp.zeros(2),
                }
            }
        )
    with pytest.raises(ConfigError, match=r"the checkpoint has params/b \(shape \(4,\)\), which the model does not"):
        ckpt.restore(target={"params": {"layers": {"attn": {"qkv_kernel": jnp.zeros((6, 2, 4))}}}})
    # dtype differences are not a mismatch: orbax casts to the template's dtype
    got, _ = ckpt.restore(
        target={"params": {"layers": {"attn": {"qkv_kernel": jnp.ones((6, 2, 4), jnp.bfloat16)}}, "b": jnp.zeros(4)}}
    )
    assert got["params"]["layers"]["attn"]["qkv_kernel"].dtype == jnp.bfloat16


def test_missing_or_empty_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"no checkpoint in .*nope: the directory does not exist; run pretrain.py"):
        Checkpointer(missing).restore(target={"w": jnp.zeros(2)})
    with pytest.raises(ConfigError, match="no checkpoint in .*nope"):
        load_params(missing)
    with pytest.raises(ConfigError, match="no checkpoint in .*nope"):
        load_meta(missing)
    assert not missing.exists()  # readers create nothing
    with pytest.raises(ConfigError, match="holds no finalized checkpoint"):
        Checkpointer(tmp_path).restore_meta()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(4, {"w": jnp.zeros(2)})
        with pytest.raises(ConfigError, match=r"no checkpoint for step 5 .* it holds steps \[4\]"):
            ckpt.restore(5, target={"w": jnp.zeros(2)})


def w_of(step: int) -> np.ndarray:
    # random, so the array data is the largest (incompressible) file of the checkpoint
    return np.random.default_rng(step).standard_normal(1000).astype(np.float32)


def _save_three(directory: Path) -> None:
    with Checkpointer(directory) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, {"w": jnp.asarray(w_of(s)), "step": jnp.int32(s)}, meta={"s": s})


# orbax reads leaves concurrently; when one read fails, the other failed reads' coroutines are never awaited and
# Python reports them when they are garbage-collected. Collect inside the test so that noise stays here.
ORBAX_UNAWAITED = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@ORBAX_UNAWAITED
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_falls_back_with_warning(tmp_path, caplog, damage):
    _save_three(tmp_path)
    victim = first_data_file(tmp_path / "3")
    if damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    else:
        victim.unlink()
    target = {"w": jnp.zeros(1000), "step": jnp.int32(0)}
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 3  # still listed: damage shows only when read
    with caplog.at_level(logging.WARNING, logger="sslvit.checkpoint"):
        got, meta = ckpt.restore(target=target)
    assert int(got["step"]) == 2 and meta == {"s": 2} and ckpt.restored_step == 2
    np.testing.assert_array_equal(got["w"], w_of(2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(tmp_path / "3") in w and "damaged" in w and "falling back to step 2" in w for w in warnings)
    with pytest.raises(
        ConfigError,
        match=r"checkpoint .*3 is damaged .*pass step=2 \(the latest usable one\) or "
        r"step=null",
    ):
        ckpt.restore(3, target=target)
    # the resumed run reaches step 3 again: its new save replaces the damaged one
    assert ckpt.save(3, {"w": jnp.full((1000,), 33.0), "step": jnp.int32(3)}, meta={"s": 33})
    caplog.clear()
    got, meta = ckpt.restore(target=target)
    assert meta == {"s": 33} and not [r for r in caplog.records if r.levelno == logging.WARNING]
    ckpt.close()
    gc.collect()


@ORBAX_UNAWAITED
def test_all_damaged_is_a_config_error(tmp_path):
    _save_three(tmp_path)
    for s in (1, 2, 3):
        (tmp_path / str(s) / "state" / "_METADATA").unlink()
    with pytest.raises(ConfigError, match=r"no usable checkpoint in .*all of steps \[1, 2, 3\] are damaged"):
        Checkpointer(tmp_path).restore(target={"w": jnp.zeros(1000), "step": jnp.int32(0)})
    gc.collect()


@pytest.mark.parametrize("tmp_name", ["4.orbax-checkpoint-tmp", "4.orbax-checkpoint-tmp-1712345678901234"])
def test_unfinalized_checkpoint_is_ignored(tmp_path, tmp_name):
    _save_three(tmp_path)
    # what an interrupted save leaves: the step's tmp dir, partly written (here: a copy missing its metadata)
    shutil.copytree(tmp_path / "3", tmp_path / tmp_name)
    (tmp_path / tmp_name / "state" / "_METADATA").unlink()
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [1, 2, 3]
    assert ckpt.restore(target={"w": jnp.zeros(1000), "step": jnp.int32(0)})[1] == {"s": 3}
    assert ckpt.save(4, {"w": jnp.full((1000,), 4.0), "step": jnp.int32(4)}, meta={"s": 4})
    assert ckpt.restore(target={"w": jnp.zeros(1000), "step": jnp.int32(0)})[1] == {"s": 4}
    ckpt.close()


def test_save_killed_mid_write_is_not_latest(tmp_path):
    """A real SIGKILL while orbax writes step 2 in the background: step 1 stays the latest, step 2 can be redone."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        import jax.numpy as jnp, numpy as np
        sys.path.insert(0, {str(REPO)!r})
        from sslvit.checkpoint import Checkpointer
        c = Checkpointer({str(tmp_path)!r})
        c.save(1, {{"w": jnp.ones(4)}}, meta={{"s": 1}})
        c.wait()
        big = np.random.default_rng(0).standard_normal((32, 1024, 256), dtype=np.float32)  # 32 MiB
        c.save(2, {{"w": jnp.asarray(big)}}, meta={{"s": 2}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    if "2" in names:
        pytest.skip(f"the save finished before the kill ({names}); nothing interrupted to test")
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 1
    assert ckpt.restore(target={"w": jnp.zeros(4)})[1] == {"s": 1}
    assert ckpt.save(2, {"w": jnp.full((4,), 2.0)}, meta={"s": 2})  # replaces the stale tmp dir
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_load_params_without_template(tmp_path):
    state = make_state(2)
    run_dir = tmp_path / "run"
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        ckpt.save(5, make_state(0), meta={"s": 5})
        ckpt.save(9, state, meta=META)
    assert find_checkpoint_dir(run_dir) == find_checkpoint_dir(run_dir / "checkpoints")
    params, meta = load_params(run_dir)  # a run dir is accepted; latest step
    assert meta == META
    assert isinstance(params, dict) and set(params) == {"encoder", "head"}
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
        assert type(got) is np.ndarray and got.dtype == want.dtype
        np.testing.assert_array_equal(got, np.asarray(want))
    old, meta5 = load_params(run_dir / "checkpoints", step=5)
    np.testing.assert_array_equal(old["head"]["kernel"], np.asarray(make_state(0)["params"]["head"]["kernel"]))
    assert meta5 == {"s": 5}
    everything, _ = load_params(run_dir, subtree=None)
    assert set(everything) == set(state)
    np.testing.assert_array_equal(everything["rng"], np.asarray(jax.random.key_data(state["rng"])))  # raw key data
    with pytest.raises(ConfigError, match=r"no 'ema_params' in its state \(it has \['batch_stats'"):
        load_params(run_dir, subtree="ema_params")
    assert load_meta(run_dir) == META and load_meta(run_dir, step=5) == {"s": 5}


@ORBAX_UNAWAITED
def test_load_params_falls_back_past_damage(tmp_path, caplog):
    _save_three(tmp_path)
    first_data_file(tmp_path / "3").unlink()
    with caplog.at_level(logging.WARNING, logger="sslvit.checkpoint"):
        tree, meta = load_params(tmp_path, subtree=None)
    assert meta == {"s": 2} and int(tree["step"]) == 2
    assert any("falling back to step 2" in r.getMessage() for r in caplog.records)
    gc.collect()
