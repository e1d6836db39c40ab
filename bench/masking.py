"""Throughput of the mask samplers (masks/s), to check they never bottleneck the input pipeline.

Usage: python bench/masking.py [--batch-size 256] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import time

# Run from a checkout without installing the package.
from sslvit.masking import MASK_SAMPLERS, make_mask_sampler, mask_rng

CASES = [((14, 14), 0.4), ((8, 8), 0.4)]


def masks_per_second(name: str, grid: tuple[int, int], ratio: float, batch_size: int, seconds: float) -> float:
    """Best-of-3 throughput, each run calling the sampler for ~seconds/3 (best-of damps noise from shared CPUs)."""
    sampler = make_mask_sampler(name, grid, ratio)
    sampler(mask_rng(0, 0), batch_size)  # warm-up
    best, step = 0.0, 0
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3:
            sampler(mask_rng(0, step), batch_size)  # a fresh Generator per step, as in training
            calls, step = calls + 1, step + 1
        best = max(best, calls * batch_size / elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per (sampler, grid) case")
    args = parser.parse_args()
    print(f"batch_size={args.batch_size}")
    for grid, ratio in CASES:
        for name in sorted(MASK_SAMPLERS):
            rate = masks_per_second(name, grid, ratio, args.batch_size, args.seconds)
            print(f"{name:>6}  grid {grid[0]}x{grid[1]}  ratio {ratio}: {rate:12,.0f} masks/s")


if __name__ == "__main__":
    main()
