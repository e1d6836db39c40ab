"""MFU of the pretraining step on a machine shared with other jobs: the matmul peak and the step are timed in
alternation, several rounds, so that both see the same load. Two estimates:

- wall: the best step time over the best peak time (each the least disturbed run);
- CPU: FLOPs per process-CPU-second of the step over those of the peak matmul. Insensitive to other jobs taking
  cores; slightly pessimistic, since idle thread-pool workers spinning between the step's many small ops count.

    python bench/mfu_interleaved.py                       # CIFAR-size preset, batch 128, float32
    python bench/mfu_interleaved.py --preset vit_s18x2 --batch 16 --rounds 3
    python bench/mfu_interleaved.py --model unroll_layers=false   # the layers as a compiled loop

bench/throughput.py measures the same once (fine on an idle machine or a GPU).
"""

from __future__ import annotations

import argparse

from common import PRESETS, device_line, parse_overrides, peak_matmul, pretrain_step, timed

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-batches")
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides")
    args = ap.parse_args()
    over = parse_overrides(args.model)
    print(device_line() + (f"; model overrides {over}" if over else ""))

    import jax.numpy as jnp

    peak_fn, peak_flops = peak_matmul(jnp.float32 if args.dtype == "float32" else jnp.bfloat16)
    step = pretrain_step(
        args.preset, args.batch, dtype=args.dtype, vocab=args.vocab, accum_steps=args.accum_steps, **over
    )
    step.compile()
    step_fn, step_flops = step.run, step.flops

    peak_fn(), step_fn()  # warm-up
    peaks, steps = [], []
    for r in range(args.rounds):
        peaks += timed(peak_fn, 5)
        steps += timed(step_fn, 1)
        w, c = steps[-1]
        print(f"round {r}: step {w * 1e3:.0f} ms wall, {c:.2f} CPU-s", flush=True)
    peak_w = peak_flops / min(w for w, _ in peaks)
    peak_c = peak_flops / float(np.median([c for _, c in peaks]))
    step_w = min(w for w, _ in steps)
    step_c = float(np.median([c for _, c in steps]))
    print(f"matmul peak ({args.dtype}): {peak_w / 1e9:.1f} GFLOP/s (best wall), {peak_c / 1e9:.1f} GFLOP per CPU-s")
    accum = f" (accum_steps={args.accum_steps})" if args.accum_steps > 1 else ""
    print(
        f"pretraining step {args.preset} batch {args.batch}{accum} {args.dtype}: {step_flops / 1e9:.1f} GFLOP, "
        f"best {step_w * 1e3:.0f} ms = {args.batch / step_w:.1f} img/s; MFU {100 * step_flops / step_w / peak_w:.1f}% "
        f"(wall), {100 * step_flops / step_c / peak_c:.1f}% (CPU time)"
    )


if __name__ == "__main__":
    main()
