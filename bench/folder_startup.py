"""Start-up of `pretrain.py` on a large image folder: the time from launching the script to its first training step,
first start (no verification manifest yet: every image is checked) and second start (the manifest is there), plus
what the folder source itself logs (listing and checking times per split).

    python bench/folder_startup.py                                  # makes /tmp/sslvit_folder200k once (~minutes)
    python bench/folder_startup.py --root /data/imagenet --classes 0 # an existing folder
    python bench/folder_startup.py --code /path/to/other/checkout --no-monitor-key   # another version of the code
    python bench/folder_startup.py --scan-only       # the dataset scan alone (`data.dataset_info`), fresh processes
    python bench/folder_startup.py --classes 0 --keep-manifest --starts 3 --override data.pipeline=tf   # tf.data

Each start is `python pretrain.py data=folder data.path=<root> steps=3 log_every=1 ...` in a fresh run dir, with the
default model, the folder's default pipeline (Pillow's) and `target=pixel`, so the figure is not a tokenizer fit;
the time to the first step is when metrics.jsonl gets its first row (the first step done); "ready to train" is when
the run logs its summary line, right before it makes the input iterator and starts the loop. Also printed: the step's
own time (steady state, from the rows of steps 2 and 3), the machine load, the compile time the run reports
(results.json; a load from JAX's persistent compilation cache on later starts), and the CPU time of the run. The
starts share a compile cache of their own (JAX_COMPILATION_CACHE_DIR in a temporary dir: the scripts'
~/.cache/sslvit/jax, empty at first).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import synthetic_folder

from sslvit.paths import user_cache_dir

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "data=folder",
    "steps=3",
    "log_every=1",
    "ckpt_every=100",
    "eval_batches=0",
    "target=pixel",
    "batch_size=64",
    "progress=false",
]


def start_once(code: Path, root: Path, run_dir: Path, extra: list[str], jax_cache: Path) -> dict:
    """One start: seconds to the first metrics row and to exit, the folder source's log lines, results."""
    cmd = [
        sys.executable,
        str(code / "pretrain.py"),
        *OVERRIDES,
        f"data.path={root}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=str(code), JAX_COMPILATION_CACHE_DIR=str(jax_cache))
    launched = datetime.datetime.now()
    t0 = time.perf_counter()
    c0 = os.times()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if first is None and metrics.is_file() and metrics.stat().st_size > 0:
            first = time.perf_counter() - t0
        time.sleep(0.02)
    total = time.perf_counter() - t0
    c1 = os.times()
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"pretrain.py failed ({proc.returncode}):\n{out[-3000:]}")
    log = (run_dir / "pretrain.log").read_text() if (run_dir / "pretrain.log").is_file() else out
    results = json.loads((run_dir / "results.json").read_text())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    ips = [r["images_per_sec"] for r in rows if r.get("step", 0) >= 2 and "images_per_sec" in r]
    folder_lines = [line.split(" - ")[-1] for line in log.splitlines() if re.search(r"folder split|checking \d+", line)]
    ready = [
        line
        for line in log.splitlines()
        if re.search(r"\]\[sslvit\.pretraining\]\[INFO\] - pretraining .*from step", line)
    ]
    stamp = datetime.datetime.strptime(ready[0][1:24], "%Y-%m-%d %H:%M:%S,%f") if ready else None
    return {
        "ready_s": (stamp - launched).total_seconds() if stamp else None,
        "first_step_s": first,
        "exit_s": total,
        "cpu_s": (c1.children_user + c1.children_system) - (c0.children_user + c0.children_system),
        "compile_s": results.get("compile_seconds"),
        "step_s": results["batch_size"] / (sum(ips) / len(ips)) if ips else None,
        "folder_log": folder_lines,
    }


SCAN = """
import sys, time
from omegaconf import OmegaConf
t0 = time.perf_counter()
from sslvit import data
cfg = OmegaConf.load(sys.argv[1] + "/conf/data/folder.yaml")
cfg.path = sys.argv[2]
t1 = time.perf_counter()
info = data.dataset_info(cfg)
print(f"{time.perf_counter() - t1:.3f} {t1 - t0:.3f} {info.num_train} {info.num_test}")
"""


def scan_once(code: Path, root: Path) -> tuple[float, float]:
    """The dataset scan alone (what the stage's `prepare` does: `data.dataset_info`) in a fresh process:
    (seconds, CPU seconds)."""
    c0 = os.times()
    out = subprocess.run(
        [sys.executable, "-c", SCAN, str(code), str(root)],
        cwd=code,  # cwd: `-c` imports from it
        env=dict(os.environ, PYTHONPATH=str(code)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    c1 = os.times()
    return float(out[0]), (c1.children_user + c1.children_system) - (c0.children_user + c0.children_system)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/sslvit_folder200k", help="the image folder (made when missing)")
    ap.add_argument("--classes", type=int, default=1000, help="for making the folder; 0: never make one")
    ap.add_argument("--train", type=int, default=200, help="images per class (making the folder)")
    ap.add_argument("--test", type=int, default=10, help="test images per class (making the folder)")
    ap.add_argument("--code", default=str(ROOT), help="the checkout whose pretrain.py runs")
    ap.add_argument("--starts", type=int, default=2, help="starts in a row (the first without a manifest)")
    ap.add_argument("--no-monitor-key", action="store_true", help="code without the `monitor` config group")
    ap.add_argument("--keep-manifest", action="store_true", help="do not delete the manifest before the first start")
    ap.add_argument("--override", nargs="*", default=[], help="more pretrain.py overrides")
    ap.add_argument("--scan-only", action="store_true", help="time `data.dataset_info` alone, not pretrain.py")
    args = ap.parse_args()

    root = Path(args.root)
    if args.classes and not (root / ".complete").exists():
        synthetic_folder.make_folder(root, classes=args.classes, train=args.train, test=args.test, size=(40, 80))
    if not args.keep_manifest:
        shutil.rmtree(root / ".sslvit", ignore_errors=True)
        shutil.rmtree(user_cache_dir("folders"), ignore_errors=True)  # a manifest of a read-only copy would live there
    n_train = sum(1 for _ in (root / "train").rglob("*.jpg"))
    print(f"folder {root}: {n_train} train JPEGs in {len(os.listdir(root / 'train'))} classes; code {args.code}")
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores; python {sys.version.split()[0]}")
    if args.scan_only:
        for i in range(args.starts):
            sec, cpu = scan_once(Path(args.code), root)
            print(
                f"scan {i + 1} (data.dataset_info, train + test): {sec:.1f}s ({cpu:.1f} CPU-s of the process, "
                f"load {os.getloadavg()[0]:.2f})"
            )
        return
    extra = list(args.override) + ([] if args.no_monitor_key else ["monitor.every=0"])
    with tempfile.TemporaryDirectory(prefix="sslvit_startup_") as tmp:
        for i in range(args.starts):
            r = start_once(Path(args.code), root, Path(tmp) / f"run{i}", extra, Path(tmp) / "jax_cache")
            print(
                f"start {i + 1}: ready to train after {r['ready_s']:.1f}s, first step done after "
                f"{r['first_step_s']:.1f}s (the step itself {r['step_s']:.1f}s; "
                f"exit {r['exit_s']:.1f}s, {r['cpu_s']:.1f} CPU-s, step compile {r['compile_s']}s, "
                f"load {os.getloadavg()[0]:.2f})"
            )
            for line in r["folder_log"]:
                print(f"    {line}")


if __name__ == "__main__":
    main()
