"""The fine-tuning step against timm's supervised train step on the CPU, side by side in one process.

Four steps on the same shape (CIFAR preset: 32 px, patch 4, dim 192, 6 layers x 2 branches, 10 classes), timed in
alternating rounds so that all see the same machine load:

- ours, preset: `bench/common.py`'s fine-tuning step with the preset's drop path 0.1 and LayerScale 0.1;
- ours, no regularisers: drop path 0, no LayerScale;
- timm plain: VisionTransformer + ParallelThingsBlock, no drop path, no LayerScale (timm's defaults);
- timm, regularised: the same with drop path 0.1 and LayerScale 0.1.

All run cross-entropy, backward and AdamW in float32 on the same threads (torch.get_num_threads() = the cores JAX
uses). Reported per step: best wall time over the rounds (the least disturbed run) and the median process CPU time.

    python bench/finetune_vs_timm.py                 # batch 128, 5 rounds
    python bench/finetune_vs_timm.py --torch-compile # timm under torch.compile (inductor) instead of eager
"""

from __future__ import annotations

import argparse
import os

from common import PRESETS, device_line, finetune_step, load_model_yaml, timed

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--torch-compile", action="store_true")
    ap.add_argument("--no-timm", action="store_true", help="only the two JAX steps")
    args = ap.parse_args()

    cfg = load_model_yaml(PRESETS[args.preset])
    size = cfg["image_size"]
    steps = {
        "ours, preset": finetune_step(args.preset, args.batch),
        "ours, no regularisers": finetune_step(args.preset, args.batch, drop_path=0.0, layer_scale_init=None),
    }
    for s in steps.values():
        s.compile()
    flops = steps["ours, preset"].flops
    if not args.no_timm:
        import torch
        from torch_peers import TorchStep, timm_vit

        torch.set_num_threads(os.cpu_count())
        torch.manual_seed(0)
        for name, plain in (("timm plain", True), ("timm, regularised", False)):
            steps[name] = TorchStep(
                timm_vit(cfg, 10, plain=plain), args.batch, compile=args.torch_compile, image_size=size
            )
        print(
            f"{device_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads"
            f"{', torch.compile' if args.torch_compile else ', eager'}"
        )
    else:
        print(device_line())
    for s in steps.values():
        s.run()  # warm-up (and torch.compile)
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, s in steps.items():
            times[k] += timed(s.run, 1)
    print(f"{args.preset} shape, batch {args.batch}, float32, {args.rounds} rounds; load {os.getloadavg()[0]:.1f}")
    best = {k: min(w for w, _ in t) for k, t in times.items()}
    cpu = {k: float(np.median([c for _, c in t])) for k, t in times.items()}
    for k in steps:
        print(
            f"{k:>22}: {args.batch / best[k]:6.1f} img/s (best {best[k] * 1e3:6.0f} ms wall; median {cpu[k]:.2f} "
            f"CPU-s = {args.batch / cpu[k]:6.1f} img/CPU-s), {flops / best[k] / 1e9:5.1f} GFLOP/s"
        )
    if "timm plain" in steps:
        r = best["timm plain"] / best["ours, preset"]
        rc = cpu["timm plain"] / cpu["ours, preset"]
        print(f"ours (preset) / timm plain: x{r:.2f} wall, x{rc:.2f} CPU time")
    print(
        f"ours preset / ours without regularisers: x{best['ours, no regularisers'] / best['ours, preset']:.2f} wall, "
        f"x{cpu['ours, no regularisers'] / cpu['ours, preset']:.2f} CPU time"
    )


if __name__ == "__main__":
    main()
