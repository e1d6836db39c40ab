"""Hostile input: bad command lines, paths, run dirs, concurrent runs, stage mix-ups, resume edges, damaged files and
stop signals outside the training loop. Every case asserts the exit status, one line on stderr (no traceback) and,
where something already lies on disk, that it is byte for byte unchanged (`digest` before and after).

Processes are started where the process is what is tested (the scripts' exit status and stderr, Hydra's own files,
signals, locks); the rest calls the stages in-process. Runs are micro (32-d, 1 layer) on 256 CIFAR-10 images, with
JAX's compilation cache shared by this file's processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF_DIR, TINY_PRETRAIN, compose_config, requires_cifar10

from sslvit.errors import ConfigError
from sslvit.rundir import RUN_FILES, RunDir

REPO = CONF_DIR.parent
MICRO = [
    "model.dim=32",
    "model.depth=1",
    "model.heads=2",
    "model.mlp_dim=64",
    "batch_size=16",
    "log_every=1",
    "data.train_split='train[:256]'",
    "data.test_split='test[:256]'",
    "progress=false",
    "target=pixel",
]


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """The scripts' environment: JAX's persistent compilation cache shared by this file's processes."""
    return dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )


def script(env: dict, name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / f"{name}.py"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(proc, status: int, *expected: str) -> str:
    """The process ended with `status` and wrote exactly one line to stderr, holding every `expected` text."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == status and len(lines) == 1 and "Traceback" not in proc.stderr, (
        f"status {proc.returncode}\n{proc.stderr[-3000:]}"
    )
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def digest(root: Path) -> dict[str, str]:
    """Every entry under `root`: files by the sha256 of their bytes, directories as such."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def run_copy(pretrain_run, tmp_path) -> Path:
    """A copy of the tiny pretraining run (checkpoints 30 and 60, k-means tokenizer) that a test may damage."""
    return Path(shutil.copytree(pretrain_run, tmp_path / "run"))


def damage_step(run: Path, step: int) -> None:
    """Truncate every array file of a checkpoint step (what a full disk or a bad copy leaves)."""
    for f in (run / "checkpoints" / str(step) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)


def probe_dir(path: Path) -> Path:
    """A finished linear probe's run dir, made by the run-dir code a probe uses."""
    rd = RunDir(path, "linear_probe")
    rd.claim(resume=None)
    rd.commit()
    rd.write_results({"stage": "linear_probe", "best_top1": 0.5})
    rd.close()
    return path


# ------------------------------------------------------------------------------------------------ command line
@pytest.mark.parametrize(
    "name,args,expected",
    [
        ("pretrain", ["model.dimm=64"], ["model.dimm is not a key of model: the keys are", "dim, dim_head"]),
        ("pretrain", ["stem=mlp"], ["stem=mlp is not an option of stem: choose one of conv, hmlp, linear"]),
        ("pretrain", ["foo=1"], ["foo is not a key of this config: the keys are", "batch_size"]),
        ("pretrain", ["model.dim=[1"], ["model.dim=[1 is not a valid override"]),
        ("pretrain", ["-m", "stem=linear,mlp"], ["stem=mlp is not an option of stem"]),
        ("pretrain", ["seed=1", "-m"], ["unrecognized arguments: ", "options such as -m and --cfg go before"]),
        (
            "finetune",
            ["run=null", "finetune/mode=fast"],
            [
                "finetune/mode=fast is not an option of finetune/mode: choose one of attn_only, full, head_only, "
                "mlp_only"
            ],
        ),
        ("linear_probe", ["run=/x", "probe.epochz=3"], ["probe.epochz is not a key of probe: the keys are"]),
    ],
    ids=[
        "unknown-key",
        "unknown-option",
        "unknown-top-key",
        "bad-syntax",
        "sweep-option",
        "flag-after-overrides",
        "finetune-mode",
        "probe-key",
    ],
)
def test_hydra_level_mistakes_are_one_line_and_write_nothing(env, tmp_path, name, args, expected):
    out = tmp_path / "run"
    proc = script(env, name, *args, f"hydra.run.dir={out}", f"hydra.sweep.dir={out}")
    one_line(proc, 2, "error: ", *expected)
    assert not out.exists()


def test_help_and_cfg_still_reach_hydra(env):
    assert "pretrain is powered by Hydra" in script(env, "pretrain", "--help").stdout
    shown = script(env, "pretrain", "--cfg", "job", "model.dim=48")
    assert shown.returncode == 0 and "dim: 48" in shown.stdout


@pytest.mark.parametrize(
    "override,expected",
    [
        ("data.mean=[nan,0.5,0.5]", "data.mean=[nan, 0.5, 0.5] must be a list of 3 numbers"),
        ("data.std=[0.2,inf,0.2]", "data.std=[0.2, inf, 0.2] must be a list of 3 numbers"),
        ("data.eval_crop_pct=0.01", "data.eval_crop_pct=0.01 must be a number in [0.25, 1]"),
        ("data.mean=[0.1,${nope},0.3]", "data.mean[1]=${nope} cannot be resolved"),
        ("seed=${oc.env:SSLVIT_NO_SUCH_VARIABLE}", "seed=${oc.env:SSLVIT_NO_SUCH_VARIABLE} cannot be resolved"),
        ("resume_changes=maybe", "resume_changes='maybe' must be true or false"),
    ],
)
def test_values_that_used_to_fail_late_are_rejected_up_front(override, expected, tmp_path, compiles):
    from sslvit.pretraining import Pretraining

    with pytest.raises(ConfigError) as err:
        Pretraining(compose_config("pretrain", [*TINY_PRETRAIN, override]), tmp_path / "run")
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert compiles == [] and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ paths
def _unwritable(tmp_path: Path) -> Path:
    """A path whose directory cannot be created: under a read-only dir (as root, permissions do not stop us:
    /sys refuses new entries to everyone)."""
    if os.geteuid() == 0:
        return Path("/sys") / f"sslvit-{os.getpid()}" / "run"
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d / "run"


@pytest.mark.parametrize("kind", ["file", "under-file", "unwritable", "sweep-dir-file"])
def test_bad_run_dir_paths_are_one_line(env, tmp_path, kind):
    f = tmp_path / "afile"
    f.write_text("mine")
    args, expected = {
        "file": ([f"hydra.run.dir={f}"], "is a file, not a directory"),
        "under-file": ([f"hydra.run.dir={f}/run"], f"lies under {f}, which is a file"),
        "unwritable": ([f"hydra.run.dir={_unwritable(tmp_path)}"], "cannot be created"),
        "sweep-dir-file": (["seed=1,2", f"hydra.sweep.dir={f}"], "hydra.sweep.dir="),
    }[kind]
    flags = ["-m"] if kind.startswith("sweep") else []
    one_line(script(env, "pretrain", *flags, *MICRO, *args), 2, "error: ", expected)
    assert f.read_text() == "mine"


def test_read_only_file_system_is_one_line(env, tmp_path):
    """A run dir on a read-only mount (a private one: user and mount namespaces, where the kernel allows them)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = (
        f"mount -t tmpfs -o ro tmpfs {shlex.quote(str(mnt))} && exec {shlex.quote(sys.executable)} "
        f"{shlex.quote(str(REPO / 'pretrain.py'))} {' '.join(map(shlex.quote, MICRO))} hydra.run.dir={mnt}/run"
    )
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", cmd],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "mount" in proc.stderr and proc.returncode != 2 or proc.returncode == 1 and "unshare" in proc.stderr:
        pytest.skip(f"no private read-only mount here: {proc.stderr.strip()[:200]}")
    one_line(proc, 2, "error: ", "read-only file system")


# ------------------------------------------------------------------------------------------------ run dirs
@requires_cifar10
def test_a_rerun_without_resume_leaves_the_run_untouched(env, run_copy):
    """The run's checkpoints, tokenizer, log and config stay byte for byte: the check comes before any write,
    Hydra's included."""
    before = digest(run_copy)
    one_line(
        script(env, "pretrain", *TINY_PRETRAIN, f"hydra.run.dir={run_copy}"),
        2,
        f"error: {run_copy} already holds checkpoints: pass resume=true",
    )
    assert digest(run_copy) == before


@requires_cifar10
@pytest.mark.parametrize(
    "name,args",
    [("linear_probe", []), ("finetune", ["resume=true"])],
    ids=["probe-into-pretraining", "finetune-into-pretraining"],
)
def test_another_stage_cannot_use_a_pretraining_run_dir(env, run_copy, pretrain_run, name, args):
    before = digest(run_copy)
    one_line(
        script(env, name, f"run={pretrain_run}", *args, f"hydra.run.dir={run_copy}"),
        2,
        f"holds a pretrain run: a run dir belongs to one stage; choose another hydra.run.dir for this {name} run",
    )
    assert digest(run_copy) == before


def test_pretraining_cannot_resume_in_a_probe_dir_nor_a_probe_rerun_over_it(env, tmp_path):
    d = probe_dir(tmp_path / "probe")
    before = digest(d)
    one_line(
        script(env, "pretrain", *MICRO, "resume=true", f"hydra.run.dir={d}"),
        2,
        "holds a linear_probe run: a run dir belongs to one stage",
    )
    one_line(
        script(env, "linear_probe", "run=/any", f"hydra.run.dir={d}"),
        2,
        "holds a finished linear_probe run (results.json): choose another hydra.run.dir",
    )
    assert digest(d) == before


def test_a_run_dir_in_use_is_refused_and_a_dead_holder_lock_is_stale(env, tmp_path):
    """A live process holds the lock: a second run is refused, naming it. kill -9 the holder: the kernel released
    its lock, and the next run takes the dir."""
    d = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from sslvit.rundir import RunDir; "
            f"RunDir({str(d)!r}, 'pretrain').claim(resume=False); print('locked', flush=True); time.sleep(600)",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = digest(d)
        one_line(
            script(env, "pretrain", *MICRO, f"hydra.run.dir={d}"),
            2,
            f"hydra.run.dir={d} is in use by another run (pid {holder.pid} on {socket.gethostname()}",
        )
        assert digest(d) == before
    finally:
        holder.kill()
        holder.wait()
    rd = RunDir(d, "pretrain")
    rd.claim(resume=False)  # the dead holder's lock is gone
    rd.close()


@requires_cifar10
def test_resume_below_the_step_reached_is_refused(run_copy, compiles):
    from sslvit.pretraining import Pretraining

    before = digest(run_copy)
    with pytest.raises(
        ConfigError,
        match=r"steps=30 is below step 60, which the run in .* already reached: pass "
        r"steps=60 or more",
    ):
        Pretraining(compose_config("pretrain", [*TINY_PRETRAIN, "resume=true", "steps=30"]), run_copy).run()
    assert digest(run_copy) == before and compiles == []


@requires_cifar10
def test_resume_with_another_seed_is_refused_before_hydra_writes(env, run_copy):
    before = digest(run_copy)
    one_line(
        script(env, "pretrain", *TINY_PRETRAIN, "resume=true", "seed=1", f"hydra.run.dir={run_copy}"),
        2,
        "error: resume=true with seed=1, but the run in",
        "was trained with seed=0",
        "resume_changes=true",
    )
    assert digest(run_copy) == before  # .hydra/ and the log included


@requires_cifar10
def test_resume_changes_true_continues_and_records_the_change(run_copy):
    from sslvit.metrics import read_metrics
    from sslvit.pretraining import pretrain

    results = pretrain(
        compose_config("pretrain", [*TINY_PRETRAIN, "resume=true", "seed=1", "resume_changes=true", "eval_batches=1"]),
        run_copy,
    )
    assert results["resume_changes"] == {"seed": [0, 1]}
    notes = [r for r in read_metrics(run_copy) if "resume_changes" in r]
    assert notes == [{"step": 60, "resume_changes": {"seed": [0, 1]}}]


@requires_cifar10
@pytest.mark.parametrize(
    "damage,expected",
    [
        ("truncate", "the run's tokenizer {path} is not a readable tokenizer file"),
        ("delete", "{path} is missing, but the run's checkpoints were trained against it"),
    ],
)
def test_a_resume_with_a_damaged_tokenizer_stops_before_writing(run_copy, damage, expected):
    from sslvit.pretraining import Pretraining

    tok = run_copy / "tokenizer.npz"
    if damage == "truncate":
        tok.write_bytes(tok.read_bytes()[:100])
    else:
        tok.unlink()
    before = digest(run_copy)
    with pytest.raises(ConfigError) as err:
        Pretraining(compose_config("pretrain", [*TINY_PRETRAIN, "resume=true"]), run_copy).run()
    assert expected.format(path=tok) in str(err.value) and "\n" not in str(err.value)
    assert digest(run_copy) == before


@requires_cifar10
@pytest.mark.parametrize("content", [b"PK\x03\x04 cut short", b"codebook = [1, 2, 3]\n"], ids=["truncated", "text"])
def test_a_target_path_that_is_not_a_tokenizer_is_one_line(tmp_path, content, compiles):
    from sslvit.pretraining import Pretraining

    bad = tmp_path / "tokenizer.npz"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=r"target.path='.*tokenizer.npz' is not a readable tokenizer file"):
        Pretraining(compose_config("pretrain", [*TINY_PRETRAIN, f"target.path={bad}"]), tmp_path / "run")
    assert compiles == []


# ------------------------------------------------------------------------------------------------ checkpoints
@requires_cifar10
def test_probe_finetune_and_visualize_fall_back_past_a_damaged_latest_checkpoint(run_copy, tmp_path, caplog):
    from sslvit.finetune import Finetuning
    from sslvit.pretrained import load_encoder
    from sslvit.probe import LinearProbe
    from sslvit.visualize import load_run

    damage_step(run_copy, 60)
    probe = LinearProbe(compose_config("linear_probe", [f"run={run_copy}", "progress=false"]), tmp_path / "p")
    ft = Finetuning(compose_config("finetune", [f"run={run_copy}", "progress=false"]), tmp_path / "f")
    assert probe.trained.step == ft.trained.step == load_run(run_copy).step == 30
    assert any(
        "checkpoints/60 is damaged" in r.getMessage() and "falling back to step 30" in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(
        ConfigError,
        match=r"checkpoints/60 is damaged .*; pass step=30 \(the latest usable one\) or "
        r"step=null",
    ):
        load_encoder(run_copy, 60)


def test_all_checkpoints_damaged_is_one_line_without_the_checkpoint_library_noise(env, tmp_path):
    """Orbax reports a closed event loop once per pending array read when a read fails: hundreds of tracebacks for
    a model of 400 arrays, around the one line that matters."""
    from sslvit.checkpoint import Checkpointer

    run = tmp_path / "run"
    state = {"params": {f"w{i}": np.random.default_rng(i).random((128, 128), np.float32) for i in range(400)}}
    with Checkpointer(run / "checkpoints") as ckpt:
        for step in (1, 2):
            ckpt.save(step, state, meta={"stage": "pretrain"}, force=True)
    for step in (1, 2):
        for i, f in enumerate(sorted((run / "checkpoints" / str(step) / "state").rglob("d/*"))):
            if i % 3 == 0:
                f.unlink()
    proc = script(env, "linear_probe", f"run={run}", f"hydra.run.dir={tmp_path / 'probe'}")
    assert "Event loop is closed" not in proc.stderr
    one_line(proc, 2, "error: no usable checkpoint in", "all of steps [1, 2] are damaged")


# ------------------------------------------------------------------------------------------------ data
@requires_cifar10
def test_a_small_split_fits_the_tokenizer(tmp_path):
    """12 images at batch_size 8: the tokenizer's batches never ask for more images than the split holds."""
    from sslvit.pretraining import Pretraining

    p = Pretraining(
        compose_config(
            "pretrain",
            [
                *TINY_PRETRAIN,
                "data.train_split='train[:12]'",
                "batch_size=8",
                "target.vocab_size=16",
                "target.num_samples=200",
            ],
        ),
        tmp_path / "run",
    )
    p.info = p.prepare()
    consts = p.setup()
    assert consts["codebook"].shape == (16, 48) and (tmp_path / "run" / "tokenizer.npz").is_file()


def _folder(root: Path, classes: list[str], n: int = 12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(root / split / c / f"{i}.png")
    return root


@requires_cifar10
def test_a_one_class_folder_dataset_is_refused_by_the_probe(pretrain_run, tmp_path):
    from sslvit.probe import LinearProbe

    data = _folder(tmp_path / "images", ["cats"])
    cfg = compose_config("linear_probe", [f"run={pretrain_run}", "data=folder", f"data.path={data}", "progress=false"])
    with pytest.raises(ConfigError, match=r"has 1 class \(cats\): a linear probe needs at least 2"):
        LinearProbe(cfg, tmp_path / "out").run()
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ visualize, report
@requires_cifar10
def test_visualize_checks_its_output_before_computing(pretrain_run, tmp_path, compiles):
    from sslvit.visualize import visualize

    f = tmp_path / "afile"
    f.write_text("mine")
    cases = [
        ({"out": str(f / "grid.png")}, f"lies under {f}, which is a file"),
        ({"out": str(tmp_path)}, "is a directory: name a file"),
        ({"scale": 100_000}, "scale=100000 must be an integer in [1, 64]"),
        ({"scale": 64, "num_images": 16}, "px PNG, over the 64 Mpx limit: use scale="),
    ]
    for extra, expected in cases:
        with pytest.raises(ConfigError) as err:
            visualize({"run": str(pretrain_run), **extra})
        assert expected in str(err.value) and "\n" not in str(err.value), err.value
    assert compiles == [] and f.read_text() == "mine"


@requires_cifar10
def test_report_survives_damaged_run_files_and_refuses_a_file_as_out(run_copy, tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    import report as report_script
    from sslvit.report import make_report

    (run_copy / ".hydra").mkdir()
    (run_copy / ".hydra" / "config.yaml").write_bytes(b"\x00\xff: [unclosed\n\t- {")
    (run_copy / "metrics.jsonl").write_bytes(bytes(range(256)) * 4)
    report = make_report([run_copy], tmp_path / "out")
    assert "pretrain (1 run)" in report.markdown
    assert report_script.main([str(run_copy), "--out", str(run_copy / "results.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out=") and "is a file, not a directory" in err and "\n" not in err


# ------------------------------------------------------------------------------------------------ processes
def test_a_missing_peer_is_one_line_naming_the_coordinator_and_the_timeout(env, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = script(
        env,
        "pretrain",
        *MICRO,
        f"distributed.coordinator_address=127.0.0.1:{port}",
        "distributed.num_processes=2",
        "distributed.process_id=1",
        "distributed.initialization_timeout=3",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    one_line(proc, 2, f"not all processes joined the coordinator at 127.0.0.1:{port} within 3 s")


# ------------------------------------------------------------------------------------------------ signals
class Watched:
    """A script started in the background; its stdout lines are collected as they come."""

    def __init__(self, env: dict, name: str, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / f"{name}.py"), *args],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, cond, timeout: float = 240) -> None:
        t0 = time.time()
        while not cond():
            assert self.proc.poll() is None, f"ended early ({self.proc.returncode}): {self.proc.stderr.read()[-3000:]}"
            assert time.time() - t0 < timeout, "timed out"
            time.sleep(0.01)

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def finish(self, timeout: float = 240) -> subprocess.CompletedProcess:
        self.proc.wait(timeout)
        return subprocess.CompletedProcess(
            self.proc.args, self.proc.returncode, "".join(self.lines), self.proc.stderr.read()
        )


def _continue_with(line: str) -> list[str]:
    return shlex.split(line.split("continue with: ", 1)[1])[2:]  # the arguments after `python <script>`


def test_sigterm_during_start_up_is_a_clean_stop(env, tmp_path):
    d = tmp_path / "run"
    w = Watched(env, "pretrain", *MICRO, "steps=5", f"hydra.run.dir={d}")
    w.wait_for(lambda: (d / ".lock").exists())  # the run claimed its dir: it is starting up
    w.proc.send_signal(signal.SIGTERM)
    line = one_line(
        w.finish(),
        75,
        "preempted: SIGTERM during the start-up",
        "nothing half-written",
        f"resume=true hydra.run.dir={d}",
    )
    assert _continue_with(line)[-2:] == ["resume=true", f"hydra.run.dir={d}"]
    assert not [name for name in RUN_FILES if (d / name).exists()]


@requires_cifar10
def test_signals_in_the_tokenizer_fit_the_loop_and_the_final_evaluation_stop_cleanly(env, tmp_path):
    """Ctrl-C during the tokenizer fit, then Ctrl-C twice in the training loop, then SIGTERM during the final
    evaluation: each run stops with status 75 and one line whose command continues it; the last command finishes
    the run."""
    d = tmp_path / "run"
    args = [
        *MICRO,
        "target=kmeans",
        "target.vocab_size=16",
        "target.num_samples=20000",
        "target.iters=3",
        "steps=100",
        "ckpt_every=10",
        "eval_batches=null",
        f"hydra.run.dir={d}",
    ]
    w = Watched(env, "pretrain", *args)
    w.wait_for(lambda: w.said("k-means tokenizer: sampling"))
    w.proc.send_signal(signal.SIGINT)
    line = one_line(w.finish(), 75, "preempted: SIGINT during the tokenizer fit", "no checkpoint was saved yet")
    assert not (d / "tokenizer.npz").exists() and not list(d.glob(".*tmp*"))

    w = Watched(env, "pretrain", *_continue_with(line))
    w.wait_for(lambda: (d / "metrics.jsonl").is_file() and len((d / "metrics.jsonl").read_text().splitlines()) >= 3)
    w.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    w.proc.send_signal(signal.SIGINT)
    line = one_line(w.finish(), 75, "preempted: ")

    w = Watched(env, "pretrain", *_continue_with(line))
    w.wait_for(lambda: w.said("final evaluation"))
    w.proc.send_signal(signal.SIGTERM)
    line = one_line(
        w.finish(),
        75,
        "preempted: SIGTERM during the final evaluation",
        f"its latest checkpoint is step 100 in {d / 'checkpoints'}",
    )
    assert not (d / "results.json").exists()

    done = script(env, "pretrain", *_continue_with(line))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((d / "results.json").read_text())["steps"] == 100
