"""Throughput and model FLOPs utilisation (MFU) of the pretraining and fine-tuning steps.

MFU = (FLOPs of one step, from XLA's cost analysis of the compiled step) x steps/s / matmul peak, where the peak
is measured in the same run: a large jitted matmul of the same dtype on the same device.

    python bench/throughput.py                         # CIFAR-size preset, fp32 (and bf16 where supported)
    python bench/throughput.py --preset vit_s18x2 --batch 8
    python bench/throughput.py --latency               # parallel vs sequential inference at batch 1-8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from sslvit import masking, optim, targets  # noqa: E402
from sslvit.config import build_vit  # noqa: E402
from sslvit.flops import forward_flops, train_flops  # noqa: E402
from sslvit.models.mim import MaskedImageModel  # noqa: E402
from sslvit.train import TrainState, make_train_step  # noqa: E402

PRESETS = {
    "cifar": dict(image_size=32, patch_size=4, dim=192, depth=6, num_parallel_branches=2, heads=3, mlp_dim=768),
    "cifar_seq": dict(image_size=32, patch_size=4, dim=192, depth=12, num_parallel_branches=1, heads=3, mlp_dim=768),
    "vit_s18x2": dict(image_size=224, patch_size=16, dim=384, depth=18, num_parallel_branches=2, heads=6,
                      mlp_dim=1536),
    "vit_s36x1": dict(image_size=224, patch_size=16, dim=384, depth=36, num_parallel_branches=1, heads=6,
                      mlp_dim=1536),
}
OPTIM = dict(lr=1e-3, min_lr=0.0, warmup_steps=10, weight_decay=0.05, clip_grad_norm=3.0, accum_steps=1)


def timeit(fn, *, min_time: float = 3.0, min_iters: int = 3) -> float:
    """Seconds per call of `fn` (which must block), after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < min_time:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def matmul_peak(dtype, n: int | None = None) -> float:
    """FLOP/s of a large square matmul on the default device: the achievable peak MFU is measured against.
    Random operands (zeros or ones run faster on GPUs)."""
    n = n or (8192 if jax.default_backend() == "gpu" else 2048)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    sec = timeit(lambda: f(a, b).block_until_ready(), min_time=2.0)
    return 2 * n**3 / sec


def pretrain_step_bench(preset: str, batch: int, dtype: str, stem: str = "hmlp", vocab: int = 512):
    model_cfg = dict(PRESETS[preset], dtype=dtype, stem=stem, stem_norm="batch", drop_path=0.1,
                     layer_scale_init=0.1)
    enc = build_vit(model_cfg, num_classes=0, use_mask_token=True)
    target = targets.make_target("kmeans", patch_size=enc.patch_size, vocab_size=vocab)
    model = MaskedImageModel(enc, target.num_outputs)
    size = enc.grid_size[0] * enc.patch_size
    sampler = masking.make_mask_sampler("block", enc.grid_size, 0.4)
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    mask = jnp.asarray(sampler(np.random.default_rng(0), batch))
    codebook = {"codebook": jax.random.normal(jax.random.key(1), (vocab, target.patch_dim)),
                "counts": jnp.ones((vocab,), jnp.int32)}
    variables = jax.jit(model.init)(jax.random.key(0), images[:1], mask[:1])
    opt, sched = optim.make_optimizer(OmegaConf.create(OPTIM), variables["params"], total_steps=1000)
    state = TrainState.create(variables["params"], {}, variables.get("batch_stats", {}), opt)

    def loss_fn(params, batch_stats, b, rng, consts):
        tokens = target.compute(consts, b["image"])
        v = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
        preds, upd = model.apply(v, b["image"], b["mask"], train=True, mutable=["batch_stats"],
                                 rngs={"dropout": rng, "emb_dropout": rng})
        loss, metrics = target.loss(preds, tokens, b["mask"])
        return loss, (metrics, upd.get("batch_stats", batch_stats))

    step = jax.jit(make_train_step(loss_fn, opt, seed=0), donate_argnums=(0,))
    b = {"image": images, "mask": mask}
    t0 = time.perf_counter()
    # Model FLOPs (analytic; XLA's cost analysis counts a scanned layer once) + the tokenizer's assignment matmul.
    flops = batch * (train_flops(enc, head_outputs_per_patch=vocab) + 2 * enc.num_patches * target.patch_dim * vocab)
    compiled = step.lower(state, b, codebook).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run():
        holder[0], m = compiled(holder[0], b, codebook)
        m["loss"].block_until_ready()

    sec = timeit(run)
    return dict(step="pretrain", preset=preset, batch=batch, dtype=dtype, sec_per_step=sec,
                images_per_sec=batch / sec, flops_per_step=flops, compile_s=compile_s)


def finetune_step_bench(preset: str, batch: int, dtype: str, mode: str = "full"):
    from sslvit.finetune_modes import FINETUNE_MODES, partition  # noqa: PLC0415

    model = build_vit(dict(PRESETS[preset], dtype=dtype, stem="linear", drop_path=0.1, layer_scale_init=0.1),
                      num_classes=10)
    size = model.grid_size[0] * model.patch_size
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    labels = jnp.arange(batch) % 10
    params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
    trainable, frozen = partition(params, FINETUNE_MODES[mode])
    opt, _ = optim.make_optimizer(OmegaConf.create(dict(OPTIM, layer_decay=0.65)), trainable, total_steps=1000,
                                  depth=model.depth)
    state = TrainState.create(trainable, frozen, {}, opt)

    def loss_fn(p, bs, b, rng, consts):
        logits = model.apply({"params": p}, b["image"], train=True, rngs={"dropout": rng, "emb_dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean(), ({}, bs)

    step = jax.jit(make_train_step(loss_fn, opt, seed=0), donate_argnums=(0,))
    b = {"image": images, "label": labels}
    flops = batch * train_flops(model)  # the 3x-forward convention, also for frozen-weight modes
    compiled = step.lower(state, b, None).compile()
    holder = [state]

    def run():
        holder[0], m = compiled(holder[0], b, None)
        m["loss"].block_until_ready()

    sec = timeit(run)
    return dict(step=f"finetune_{mode}", preset=preset, batch=batch, dtype=dtype, sec_per_step=sec,
                images_per_sec=batch / sec, flops_per_step=flops)


def inference_latency(preset: str, batch: int, dtype: str = "float32") -> float:
    model = build_vit(dict(PRESETS[preset], dtype=dtype), num_classes=1000)
    size = model.grid_size[0] * model.patch_size
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    params = jax.jit(model.init)(jax.random.key(0), x[:1])
    f = jax.jit(model.apply)
    return timeit(lambda: f(params, x).block_until_ready(), min_time=2.0), batch * forward_flops(model)


def bf16_supported() -> bool:
    return jax.default_backend() in ("gpu", "tpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtypes", default=None, help="comma list; default float32 (+bfloat16 on GPU/TPU)")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--latency", action="store_true", help="parallel (S18x2) vs sequential (S36x1) at batch 1-8")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()

    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()})")
    rows = []
    if args.latency:
        for batch in (1, 2, 4, 8):
            (par, _), (seq, _) = inference_latency("vit_s18x2", batch), inference_latency("vit_s36x1", batch)
            row = dict(step="inference", batch=batch, s18x2_ms=par * 1e3, s36x1_ms=seq * 1e3, speedup=seq / par)
            print(f"inference batch {batch}: ViT-S18x2 {par * 1e3:.1f} ms, ViT-S36x1 {seq * 1e3:.1f} ms, "
                  f"parallel speed-up x{seq / par:.2f}")
            rows.append(row)
    else:
        dtypes = args.dtypes.split(",") if args.dtypes else ["float32"] + (["bfloat16"] if bf16_supported() else [])
        for dtype in dtypes:
            peak = matmul_peak(jnp.float32 if dtype == "float32" else jnp.bfloat16)
            print(f"{dtype} matmul peak (square matmul, measured): {peak / 1e9:.1f} GFLOP/s")
            results = [pretrain_step_bench(args.preset, args.batch, dtype)]
            if not args.no_finetune:
                results += [finetune_step_bench(args.preset, args.batch, dtype, m) for m in ("full", "attn_only")]
            for r in results:
                r["peak_flops"] = peak
                r["mfu"] = r["flops_per_step"] / r["sec_per_step"] / peak if r["flops_per_step"] else None
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                extra = f", compile {r['compile_s']:.1f}s" if "compile_s" in r else ""
                print(f"{r['step']:>16} {args.preset} batch {args.batch} {dtype}: {r['images_per_sec']:.1f} img/s, "
                      f"{r['sec_per_step'] * 1e3:.0f} ms/step, {r['flops_per_step'] / 1e9:.1f} GFLOP/step, "
                      f"MFU {mfu}{extra}")
                rows.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
