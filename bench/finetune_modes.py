"""Full vs attention-only fine-tuning: trainable parameters, peak memory of the compiled train step (XLA's memory
analysis) and step time, with their ratios (the paper claims ~10% less memory, ~10% faster for attention-only).

The CIFAR-size preset by default: 32 px, patch 4, dim 192, 6 layers x 2 branches, batch 128, hMLP stem, float32,
synthetic images (the step, not the input pipeline, is measured).

Usage: python bench/finetune_modes.py [--modes full attn_only] [--steps 20] [--batch-size 128] [key=value ...]
Extra key=value arguments are Hydra overrides of conf/finetune.yaml (e.g. model=small model.dtype=bfloat16).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(mode: str, batch_size: int, steps: int, overrides: list[str]) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from hydra import compose, initialize_config_dir

    from sslvit.finetune import Finetuning
    from sslvit.stage import count_params
    from sslvit.train import batch_sharding, make_mesh, memory_report

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "finetune",
            overrides=[
                "run=null",
                f"finetune.mode={mode}",
                f"batch_size={batch_size}",
                f"steps={steps + 3}",
                *overrides,
            ],
        )
    ft = Finetuning(cfg, None)
    mesh = make_mesh()
    state, train_step = ft.build(mesh, steps + 3)
    t0 = time.perf_counter()
    compiled = train_step.lower(state, ft.abstract_batch(mesh), None).compile()
    compile_s = time.perf_counter() - t0
    mem = memory_report(compiled)
    rng = np.random.default_rng(0)
    s = ft.image_size
    batch = {
        "image": jnp.asarray(rng.normal(size=(batch_size, s, s, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, ft.num_classes, batch_size), jnp.int32),
    }
    batch = jax.device_put(batch, batch_sharding(mesh))
    for _ in range(3):  # warm-up
        state, metrics = compiled(state, batch, None)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, None)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {
        "mode": mode,
        "trainable": count_params(state.params),
        "total": count_params(state.params) + count_params(state.frozen),
        "opt_state": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state)),
        "peak": mem.get("peak"),
        "temp": mem.get("temp"),
        "argument": mem.get("argument"),
        "step_s": statistics.median(times),
        "compile_s": compile_s,
        "encoder": ft.encoder_cfg,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["full", "attn_only"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode (median reported)")
    parser.add_argument("--batch-size", type=int, default=128)
    args, overrides = parser.parse_known_args()

    import jax

    rows = [measure(m, args.batch_size, args.steps, overrides) for m in args.modes]
    m = rows[0]["model"]
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); model: "
        f"{m['image_size']} px, patch {m['patch_size']}, dim {m['dim']}, {m['depth']}x{m['num_parallel_branches']}, "
        f"stem {m['stem']}, {m['dtype']}; batch {args.batch_size}; median of {args.steps} steps"
    )
    mib = lambda b: f"{b / 2**20:9.1f}" if b is not None else "        ?"  # noqa: E731
    print(
        f"{'mode':<10} {'trainable':>11} {'of total':>11} {'opt state':>11} {'peak MiB':>9} {'temp MiB':>9} "
        f"{'step ms':>8} {'compile s':>9}"
    )
    for r in rows:
        print(
            f"{r['mode']:<10} {r['trainable']:>11,} {r['total']:>11,} {r['opt_state']:>11,} {mib(r['peak'])} "
            f"{mib(r['temp'])} {1e3 * r['step_s']:8.1f} {r['compile_s']:9.1f}"
        )
    base = rows[0]
    for r in rows[1:]:
        ratio = lambda k: (r[k] / base[k]) if r.get(k) and base.get(k) else float("nan")  # noqa: E731
        print(
            f"{r['mode']} / {base['mode']}: trainable params {ratio('trainable'):.3f}, peak memory "
            f"{ratio('peak'):.3f}, step time {ratio('step_s'):.3f}"
        )


if __name__ == "__main__":
    main()
