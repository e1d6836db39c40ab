"""Compile time vs depth (scan over layers), and what unrolling the layers, remat / gradient accumulation / bfloat16
do to the pretraining step: XLA's memory analysis of the compiled step (temporary buffers = activations kept for the
backward pass), the loss of a few real steps (finite, and close to the float32 / no-remat / one-batch step), and the
step time.

    python bench/compile_memory.py                     # CIFAR-size preset, batch 128 (+ depth 12 vs 36 compile)
    python bench/compile_memory.py --preset vit_s18x2 --batch 16 --no-compile-depth

Synthetic images, the k-means target with a random 512-code codebook (as bench/throughput.py).
"""

from __future__ import annotations

import argparse
import time

from common import PRESETS, device_line, pretrain_step

import numpy as np

MiB = 2**20


def build(
    preset,
    batch: int,
    *,
    dtype: str = "float32",
    remat: bool = False,
    accum_steps: int = 1,
    vocab: int = 512,
    **model_overrides,
):
    """The jitted pretraining step and its arguments (bench/common.py's pretrain_step)."""
    s = pretrain_step(preset, batch, dtype=dtype, remat=remat, accum_steps=accum_steps, vocab=vocab, **model_overrides)
    return s.step, s.state, s.batch, s.consts


def compile_step(step, state, batch, consts):
    t0 = time.perf_counter()
    lowered = step.lower(state, batch, consts)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def run_steps(compiled, state, batch, consts, n: int):
    """Losses of `n` steps and the best time of one (the first run is a warm-up)."""
    losses, times = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        state, m = compiled(state, batch, consts)
        losses.append(float(m["loss"]))
        times.append(time.perf_counter() - t0)
    return losses, min(times[1:]) if n > 1 else times[0]


def variant_rows(preset: str, batch: int, steps: int):
    variants = [
        ("float32", dict()),
        ("layers as a loop", dict(unroll_layers=False)),
        ("remat", dict(remat=True)),
        ("accum_steps=4", dict(accum_steps=4)),
        ("bfloat16", dict(dtype="bfloat16")),
        ("bfloat16 + remat", dict(dtype="bfloat16", remat=True)),
    ]
    base = None
    print(f"\npretraining step, preset {preset}, batch {batch}: XLA memory analysis + {steps} steps on one batch")
    print(f"{'variant':>18} | {'temp MiB':>9} | {'args MiB':>8} | {'compile s':>9} | {'step ms':>8} | losses")
    for name, kw in variants:
        step, state, b, c = build(preset, batch, **kw)
        compiled, _, comp_s = compile_step(step, state, b, c)
        mem = compiled.memory_analysis()
        temp, args = mem.temp_size_in_bytes / MiB, mem.argument_size_in_bytes / MiB
        losses, sec = run_steps(compiled, state, b, c, steps)
        if base is None:
            base = (temp, losses)
        ok = all(np.isfinite(losses))
        diff = max(abs(a - b_) for a, b_ in zip(losses, base[1]))
        print(
            f"{name:>18} | {temp:9.1f} | {args:8.1f} | {comp_s:9.1f} | {sec * 1e3:8.0f} | "
            f"{' '.join(f'{x:.4f}' for x in losses)}  (finite: {ok}; max |diff| vs float32 {diff:.1e}; "
            f"temp x{temp / base[0]:.2f})",
            flush=True,
        )


def compile_depth_rows(depths):
    print("\ncompile time of the pretraining step vs depth (ViT-S width, 224 px, batch 8; scan over layers)")
    for depth in depths:
        for p in (1, 2):
            step, state, b, c = build("vit_s18x2", 8, depth=depth, num_parallel_branches=p)
            _, lower_s, comp_s = compile_step(step, state, b, c)
            print(
                f"  depth {depth:3d} x {p} branch{'es' if p > 1 else '  '}: trace+lower {lower_s:5.1f}s, "
                f"XLA compile {comp_s:5.1f}s",
                flush=True,
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--depths", default="12,36")
    ap.add_argument("--no-compile-depth", action="store_true")
    ap.add_argument("--no-variants", action="store_true")
    args = ap.parse_args()
    print(device_line())
    if not args.no_compile_depth:
        compile_depth_rows([int(d) for d in args.depths.split(",")])
    if not args.no_variants:
        variant_rows(args.preset, args.batch, args.steps)


if __name__ == "__main__":
    main()
