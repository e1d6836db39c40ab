"""Throughput and model FLOPs utilisation (MFU) of the pretraining and fine-tuning steps.

MFU = model FLOPs of one step (analytic, sslvit/flops.py: matmuls and attention, backward = 2x forward) x steps/s
/ matmul peak, where the peak is measured in the same run: a large jitted matmul of the same dtype on the same
device. Presets are the shipped model configs (bench/common.py: cifar = conf/model/tiny.yaml, vit_s18x2 = small,
vit_s36x1 = small_seq); `--model key=value` overrides them.

    python bench/throughput.py                         # CIFAR-size preset, fp32 (and bf16 where supported)
    python bench/throughput.py --preset vit_s18x2 --batch 8
    python bench/throughput.py --model unroll_layers=false   # the layers as a compiled loop
    python bench/throughput.py --latency               # parallel vs sequential inference at batch 1-8
"""

from __future__ import annotations

import argparse
import json

from common import (
    PRESETS,
    device_line,
    finetune_step,
    inference_forward,
    matmul_peak,
    parse_overrides,
    pretrain_step,
    timeit,
)

import jax
import jax.numpy as jnp


def pretrain_step_bench(preset, batch: int, dtype: str, stem: str = "hmlp", vocab: int = 512, **model_overrides):
    s = pretrain_step(preset, batch, dtype=dtype, stem=stem, vocab=vocab, **model_overrides)
    s.compile()
    sec = timeit(s.run)
    return dict(
        step="pretrain",
        preset=preset if isinstance(preset, str) else "config",
        batch=batch,
        dtype=dtype,
        sec_per_step=sec,
        images_per_sec=batch / sec,
        flops_per_step=s.flops,
        compile_s=s.compile_s,
    )


def finetune_step_bench(preset, batch: int, dtype: str, mode: str = "full", **model_overrides):
    s = finetune_step(preset, batch, dtype=dtype, mode=mode, **model_overrides)
    s.compile()
    sec = timeit(s.run)
    return dict(
        step=f"finetune_{mode}",
        preset=preset,
        batch=batch,
        dtype=dtype,
        sec_per_step=sec,
        images_per_sec=batch / sec,
        flops_per_step=s.flops,
        compile_s=s.compile_s,
    )


def inference_latency(preset: str, batch: int, dtype: str = "float32", **model_overrides):
    fn, flops, _ = inference_forward(preset, batch, dtype=dtype, **model_overrides)
    return timeit(fn, min_time=2.0, warmup=1), flops


def bf16_supported() -> bool:
    return jax.default_backend() in ("gpu", "tpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtypes", default=None, help="comma list; default float32 (+bfloat16 on GPU/TPU)")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--latency", action="store_true", help="parallel (S18x2) vs sequential (S36x1) at batch 1-8")
    ap.add_argument("--latency-batches", default="1,2,4,8")
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    over = parse_overrides(args.model)

    print(device_line() + (f"; model overrides {over}" if over else ""))
    rows = []
    if args.latency:
        for dtype in (args.dtypes or "float32").split(","):
            for batch in (int(b) for b in args.latency_batches.split(",")):
                (par, _), (seq, _) = (inference_latency(p, batch, dtype, **over) for p in ("vit_s18x2", "vit_s36x1"))
                row = dict(
                    step="inference",
                    batch=batch,
                    dtype=dtype,
                    s18x2_ms=par * 1e3,
                    s36x1_ms=seq * 1e3,
                    speedup=seq / par,
                )
                print(
                    f"inference batch {batch} {dtype}: ViT-S18x2 {par * 1e3:.1f} ms, ViT-S36x1 {seq * 1e3:.1f} ms, "
                    f"parallel speed-up x{seq / par:.2f}",
                    flush=True,
                )
                rows.append(row)
    else:
        dtypes = args.dtypes.split(",") if args.dtypes else ["float32"] + (["bfloat16"] if bf16_supported() else [])
        for dtype in dtypes:
            peak = matmul_peak(jnp.float32 if dtype == "float32" else jnp.bfloat16)
            print(f"{dtype} matmul peak (square matmul, measured): {peak / 1e9:.1f} GFLOP/s")
            results = [pretrain_step_bench(args.preset, args.batch, dtype, **over)]
            if not args.no_finetune:
                results += [
                    finetune_step_bench(args.preset, args.batch, dtype, m, **over) for m in ("full", "attn_only")
                ]
            for r in results:
                r["peak_flops"] = peak
                r["mfu"] = r["flops_per_step"] / r["sec_per_step"] / peak if r["flops_per_step"] else None
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                extra = f", compile {r['compile_s']:.1f}s" if "compile_s" in r else ""
                print(
                    f"{r['step']:>16} {args.preset} batch {args.batch} {dtype}: {r['images_per_sec']:.1f} img/s, "
                    f"{r['sec_per_step'] * 1e3:.0f} ms/step, {r['flops_per_step'] / 1e9:.1f} GFLOP/step, "
                    f"MFU {mfu}{extra}",
                    flush=True,
                )
                rows.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
