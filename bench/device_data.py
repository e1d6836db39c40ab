"""What the in-memory data path costs: the pretraining step fed example indices, with the gather, random-resized
crop, flip and normalisation inside the jitted step (data.source=arrays, sslvit/data/ondevice.py), against

- `synthetic`: the same step on ready-made images (no input work at all; bench/common.py), and
- `separate`: the augmentation as its own jitted function before the step (two dispatches per step).

All three are timed in alternation (each first, second and last in turn), several rounds, so that they see the
same load; wall and process-CPU time, medians.

    python bench/device_data.py                                   # CIFAR-size preset, batch 128, float32 (CPU)
    python bench/device_data.py --batch 1024 --dtype bfloat16     # GPU
    python bench/device_data.py --data <dir holding train.npz>    # real CIFAR-10 arrays (default: random uint8)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from common import PRESETS, device_line, parse_overrides, pretrain_step, timed

import jax
import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--data", default=None, help="a folder holding train.npz (default: 50,000 random uint8 images)")
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    over = parse_overrides(args.model)
    print(device_line() + (f"; model overrides {over}" if over else ""))

    from sslvit.data.arrays import load_npz
    from sslvit.data.ondevice import DeviceData

    size = 32 if args.preset.startswith("cifar") else 224
    if args.data:
        images = load_npz(Path(args.data) / "train.npz")["image"]
        what = f"{len(images)} images from {args.data}"
    else:
        images = np.random.default_rng(0).integers(0, 256, (50_000, size, size, 3), dtype=np.uint8)
        what = f"{len(images)} random uint8 images"
    dd = DeviceData(
        images,
        np.zeros(len(images), np.int32),
        batch_size=args.batch,
        image_size=size,
        crop_scale=(0.2, 1.0),
        flip=True,
        mean=(0.49, 0.48, 0.45),
        std=(0.25, 0.24, 0.26),
        seed=0,
        with_labels=False,
    )

    steps = {
        "synthetic": pretrain_step(args.preset, args.batch, dtype=args.dtype, **over),
        "in_step": pretrain_step(args.preset, args.batch, dtype=args.dtype, device_data=dd, **over),
        "separate": pretrain_step(args.preset, args.batch, dtype=args.dtype, **over),
    }
    for name, s in steps.items():
        s.compile()
        print(f"{name}: compiled in {s.compile_s:.1f} s", flush=True)

    data = jax.device_put(dd.arrays())
    index = jax.device_put(next(dd.index_batches(0))["index"])
    mask = steps["separate"].batch["mask"]
    augment = jax.jit(dd.transform)
    sep = steps["separate"]

    def run_separate():
        batch = augment(data, {"index": index, "mask": mask}, jax.random.key(sep.state.step))
        sep.state, metrics = sep.compiled(sep.state, batch, sep.consts)
        metrics["loss"].block_until_ready()

    runs = {"synthetic": steps["synthetic"].run, "in_step": steps["in_step"].run, "separate": run_separate}
    for fn in runs.values():  # warm-up (first touch of memory, the augmentation's compile)
        fn()
    times: dict[str, list] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % 3 :] + names[: r % 3]:  # each variant first, second and last in turn
            times[name] += timed(runs[name], args.reps)
        line = ", ".join(f"{k} {1e3 * v[-1][0]:.1f} ms" for k, v in times.items())
        print(f"round {r}: {line}", flush=True)

    out = {
        "device": device_line(),
        "preset": args.preset,
        "batch": args.batch,
        "dtype": args.dtype,
        "data": what,
        "rounds": args.rounds,
        "reps": args.reps,
        "load_before": os.getloadavg()[0],
        "variants": {},
    }
    base_w = float(np.median([w for w, _ in times["synthetic"]]))
    base_c = float(np.median([c for _, c in times["synthetic"]]))
    for name, t in times.items():
        w, c = float(np.median([w for w, _ in t])), float(np.median([c for _, c in t]))
        best = min(w for w, _ in t)
        out["variants"][name] = {
            "median_wall_ms": 1e3 * w,
            "best_wall_ms": 1e3 * best,
            "median_cpu_s": c,
            "images_per_sec": args.batch / w,
            "wall_vs_synthetic": w / base_w,
            "cpu_vs_synthetic": c / base_c if base_c > 0 else None,
        }
        print(
            f"{name:>9}: median {1e3 * w:8.1f} ms wall (best {1e3 * best:.1f}), {c:6.2f} CPU-s, "
            f"{args.batch / w:9.1f} img/s; vs synthetic x{w / base_w:.3f} wall, x{c / base_c:.3f} CPU"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
