"""MFU of the pretraining step on a machine shared with other jobs: the matmul peak and the step are timed in
alternation, several rounds, so that both see the same load. Two estimates:

- wall: the best step time over the best peak time (each the least disturbed run);
- CPU: FLOPs per process-CPU-second of the step over those of the peak matmul. Insensitive to other jobs taking
  cores; slightly pessimistic, since idle thread-pool workers spinning between the step's many small ops count.

    python bench/mfu_interleaved.py                       # CIFAR-size preset, batch 128, float32
    python bench/mfu_interleaved.py --preset vit_s18x2 --batch 16 --rounds 3
    python bench/mfu_interleaved.py --accum-steps 4      # 4 micro-batches of 32: cache-friendlier on CPU

bench/throughput.py measures the same once (fine on an idle machine or a GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from compile_memory import build  # noqa: E402
from sslvit import targets  # noqa: E402
from sslvit.config import build_vit  # noqa: E402
from sslvit.flops import train_flops  # noqa: E402
from throughput import PRESETS  # noqa: E402


def timed(fn, reps: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - w0, time.process_time() - c0))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-batches")
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPU cores, jax {jax.__version__}")

    n = 2048
    dt = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    b = jax.random.normal(jax.random.key(1), (n, n), dt)
    mm = jax.jit(lambda a, b: a @ b)
    peak_fn = lambda: mm(a, b).block_until_ready()  # noqa: E731
    peak_flops = 2 * n**3

    step, state, batch, consts = build(args.preset, args.batch, dtype=args.dtype, vocab=args.vocab,
                                        accum_steps=args.accum_steps)
    compiled = step.lower(state, batch, consts).compile()
    holder = [state]

    def step_fn():
        holder[0], m = compiled(holder[0], batch, consts)
        m["loss"].block_until_ready()

    enc = build_vit(dict(PRESETS[args.preset], stem="hmlp"), num_classes=0, use_mask_token=True)
    patch_dim = targets.make_target("kmeans", patch_size=enc.patch_size, vocab_size=args.vocab).patch_dim
    step_flops = args.batch * (train_flops(enc, head_outputs_per_patch=args.vocab)
                               + 2 * enc.num_patches * patch_dim * args.vocab)  # as bench/throughput.py

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
    print(f"matmul peak ({n}^3, {args.dtype}): {peak_w / 1e9:.1f} GFLOP/s (best wall), {peak_c / 1e9:.1f} GFLOP "
          f"per CPU-s")
    accum = f" (accum_steps={args.accum_steps})" if args.accum_steps > 1 else ""
    print(f"pretraining step {args.preset} batch {args.batch}{accum} {args.dtype}: {step_flops / 1e9:.1f} GFLOP, "
          f"best {step_w * 1e3:.0f} ms = {args.batch / step_w:.1f} img/s; MFU {100 * step_flops / step_w / peak_w:.1f}% "
          f"(wall), {100 * step_flops / step_c / peak_c:.1f}% (CPU time)")


if __name__ == "__main__":
    main()
