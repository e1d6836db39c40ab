"""Parallel vs sequential ViT inference latency at small batch, measured robustly on a shared machine.

ViT-S 18x2 and ViT-S 36x1 (equal parameters and FLOPs) are timed in alternation, several rounds, so both see the
same load; reported per model: the best wall time (the least disturbed run) and the median process CPU time
(robust to other jobs taking cores, but it also counts the thread pool's spinning). The speed-up of the parallel
model is printed from both.

    python bench/latency.py                        # batch 1, 2, 4, 8; float32
    python bench/latency.py --batches 1 --rounds 10 --dtype bfloat16

bench/throughput.py --latency measures the same with one mean per model (fine on an idle machine or a GPU).
"""

from __future__ import annotations

import argparse

from common import PRESETS, device_line, inference_forward, parse_overrides, timed

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=6, help="alternations of the two models")
    ap.add_argument("--reps", type=int, default=3, help="calls per model per round")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--parallel", default="vit_s18x2", choices=sorted(PRESETS))
    ap.add_argument("--sequential", default="vit_s36x1", choices=sorted(PRESETS))
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides (both)")
    args = ap.parse_args()
    over = parse_overrides(args.model)
    print(device_line() + f", {args.dtype}" + (f"; model overrides {over}" if over else ""))
    for batch in (int(b) for b in args.batches.split(",")):
        fns = {
            name: inference_forward(name, batch, dtype=args.dtype, **over) for name in (args.parallel, args.sequential)
        }
        times = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, (fn, _, _) in fns.items():
                times[name] += timed(fn, args.reps)
        best = {n: min(w for w, _ in t) for n, t in times.items()}
        cpu = {n: float(np.median([c for _, c in t])) for n, t in times.items()}
        par, seq = args.parallel, args.sequential
        flops = fns[par][1]
        print(
            f"batch {batch}: {par} {best[par] * 1e3:7.1f} ms (cpu {cpu[par] * 1e3:7.1f} ms, compile "
            f"{fns[par][2]:.1f}s) | {seq} {best[seq] * 1e3:7.1f} ms (cpu {cpu[seq] * 1e3:7.1f} ms, compile "
            f"{fns[seq][2]:.1f}s) | parallel speed-up x{best[seq] / best[par]:.2f} wall, "
            f"x{cpu[seq] / cpu[par]:.2f} cpu | {flops / best[par] / 1e9:.0f} GFLOP/s",
            flush=True,
        )


if __name__ == "__main__":
    main()
