"""Compile time vs depth (scan over layers), and what remat / gradient accumulation / bfloat16 do to the pretraining
step: XLA's memory analysis of the compiled step (temporary buffers = activations kept for the backward pass),
the loss of a few real steps (finite, and close to the float32 / no-remat / one-batch step), and the step time.

    python bench/compile_memory.py                     # CIFAR-size preset, batch 128 (+ depth 12 vs 36 compile)
    python bench/compile_memory.py --preset vit_s18x2 --batch 16 --no-compile-depth

Synthetic images, the k-means target with a random 512-code codebook (as bench/throughput.py).
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
from omegaconf import OmegaConf  # noqa: E402

from sslvit import masking, optim, targets  # noqa: E402
from sslvit.config import build_vit  # noqa: E402
from sslvit.models.mim import MaskedImageModel  # noqa: E402
from sslvit.train import TrainState, make_train_step  # noqa: E402
from throughput import OPTIM, PRESETS  # noqa: E402

MiB = 2**20


def build(preset: str, batch: int, *, dtype: str = "float32", remat: bool = False, accum_steps: int = 1,
          vocab: int = 512, **model_overrides):
    """The jitted pretraining step and its arguments (as pretraining builds it, synthetic data)."""
    model_cfg = dict(PRESETS[preset], dtype=dtype, stem="hmlp", stem_norm="batch", drop_path=0.1,
                     layer_scale_init=0.1, remat=remat)
    model_cfg.update(model_overrides)
    enc = build_vit(model_cfg, num_classes=0, use_mask_token=True)
    target = targets.make_target("kmeans", patch_size=enc.patch_size, vocab_size=vocab)
    model = MaskedImageModel(enc, target.num_outputs)
    size = enc.grid_size[0] * enc.patch_size
    sampler = masking.make_mask_sampler("block", enc.grid_size, 0.4)
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    mask = jnp.asarray(sampler(np.random.default_rng(0), batch))
    consts = {"codebook": jax.random.normal(jax.random.key(1), (vocab, target.patch_dim)),
              "counts": jnp.ones((vocab,), jnp.int32)}
    variables = jax.jit(model.init)(jax.random.key(0), images[:1], mask[:1])
    opt, _ = optim.make_optimizer(OmegaConf.create(dict(OPTIM, accum_steps=accum_steps)), variables["params"],
                                  total_steps=1000)
    state = TrainState.create(variables["params"], {}, variables.get("batch_stats", {}), opt)

    def loss_fn(params, batch_stats, b, rng, c):
        tokens = target.compute(c, b["image"])
        v = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
        preds, upd = model.apply(v, b["image"], b["mask"], train=True, mutable=["batch_stats"],
                                 rngs={"dropout": rng, "emb_dropout": rng})
        loss, metrics = target.loss(preds, tokens, b["mask"])
        return loss, (metrics, upd.get("batch_stats", batch_stats))

    step = jax.jit(make_train_step(loss_fn, opt, seed=0, accum_steps=accum_steps), donate_argnums=(0,))
    return step, state, {"image": images, "mask": mask}, consts


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
    variants = [("float32", dict()), ("remat", dict(remat=True)), ("accum_steps=4", dict(accum_steps=4)),
                ("bfloat16", dict(dtype="bfloat16")), ("bfloat16 + remat", dict(dtype="bfloat16", remat=True))]
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
        print(f"{name:>18} | {temp:9.1f} | {args:8.1f} | {comp_s:9.1f} | {sec * 1e3:8.0f} | "
              f"{' '.join(f'{x:.4f}' for x in losses)}  (finite: {ok}; max |diff| vs float32 {diff:.1e}; "
              f"temp x{temp / base[0]:.2f})", flush=True)


def compile_depth_rows(depths):
    print("\ncompile time of the pretraining step vs depth (ViT-S width, 224 px, batch 8; scan over layers)")
    for depth in depths:
        for p in (1, 2):
            step, state, b, c = build("vit_s18x2", 8, depth=depth, num_parallel_branches=p)
            _, lower_s, comp_s = compile_step(step, state, b, c)
            print(f"  depth {depth:3d} x {p} branch{'es' if p > 1 else '  '}: trace+lower {lower_s:5.1f}s, "
                  f"XLA compile {comp_s:5.1f}s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--depths", default="12,36")
    ap.add_argument("--no-compile-depth", action="store_true")
    ap.add_argument("--no-variants", action="store_true")
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()}), "
          f"jax {jax.__version__}")
    if not args.no_compile_depth:
        compile_depth_rows([int(d) for d in args.depths.split(",")])
    if not args.no_variants:
        variant_rows(args.preset, args.batch, args.steps)


if __name__ == "__main__":
    main()
