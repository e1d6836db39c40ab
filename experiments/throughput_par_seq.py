"""Parallel vs sequential throughput at equal parameters, measured interleaved in one process.

On a machine shared with other jobs the images/s a training run logs drifts with the load (the same model logged
90-140 images/s in the CPU protocol). Timing the two models in alternating rounds exposes both to the same load,
and the median over rounds is what is compared.

    python experiments/throughput_par_seq.py                       # the CPU protocol's dim-64 4x2 vs 8x1
    python experiments/throughput_par_seq.py --dim 192 --heads 3 --mlp 768 --depth 6   # the `tiny` preset
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from sslvit.models.build import build_vit, from_flat  # noqa: E402


def make_steps(depth: int, branches: int, args) -> tuple:
    """(train step, inference fn, params, batch_stats) of one classifier ViT."""
    cfg = dict(image_size=32, patch_size=4, dim=args.dim, depth=depth, num_parallel_branches=branches,
               heads=args.heads, mlp_dim=args.mlp, stem=args.stem, layer_scale_init=0.1, drop_path=0.0)
    model = build_vit(from_flat(cfg), num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    params, stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.adamw(1e-3)

    def loss(p, s, x, y):
        logits, upd = model.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(2), "emb_dropout": jax.random.key(3)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

    @jax.jit
    def train(p, o, s, x, y):
        (_, s), g = jax.value_and_grad(loss, has_aux=True)(p, s, x, y)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, s

    infer = jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x))
    return train, infer, params, tx.init(params), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--mlp", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4, help="depth of the parallel model (x2); sequential: 2*depth x1")
    ap.add_argument("--stem", default="hmlp")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5, help="timed calls per round and model")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()

    models = {f"{args.depth}x2": (args.depth, 2), f"{2 * args.depth}x1": (2 * args.depth, 1)}
    built = {k: make_steps(d, b, args) for k, (d, b) in models.items()}
    key = jax.random.key(1)
    x = jax.random.normal(key, (args.batch, 32, 32, 3))
    y = jax.random.randint(key, (args.batch,), 0, 10)
    x1 = x[:1]
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], f"infer_b{args.batch}": [], "infer_b1": []}
                                                for k in models}
    state = {}
    for k, (train, infer, p, o, s) in built.items():  # compile outside the timed rounds
        p, o, s = train(p, o, s, x, y)
        jax.block_until_ready(infer(p, s, x))
        jax.block_until_ready(infer(p, s, x1))
        state[k] = (p, o, s)
    for _ in range(args.rounds):
        for k, (train, infer, *_rest) in built.items():
            p, o, s = state[k]
            t0 = time.perf_counter()
            for _ in range(args.iters):
                p, o, s = train(p, o, s, x, y)
            jax.block_until_ready(p)
            times[k]["train"].append(args.iters * args.batch / (time.perf_counter() - t0))
            state[k] = (p, o, s)
            for name, xb in ((f"infer_b{args.batch}", x), ("infer_b1", x1)):
                n = args.iters * (4 if xb.shape[0] == 1 else 1)
                t0 = time.perf_counter()
                for _ in range(n):
                    out = infer(p, s, xb)
                jax.block_until_ready(out)
                times[k][name].append(n * xb.shape[0] / (time.perf_counter() - t0))
    res = {k: {m: round(statistics.median(v), 1) for m, v in d.items()} for k, d in times.items()}
    params = sum(int(a.size) for a in jax.tree.leaves(built[next(iter(built))][2]))
    out = {"device": str(jax.devices()[0]), "params": params, "batch": args.batch, "rounds": args.rounds,
           "images_per_sec_median": res,
           "ratio_parallel_over_sequential": {m: round(res[f"{args.depth}x2"][m] / res[f"{2 * args.depth}x1"][m], 3)
                                              for m in res[f"{args.depth}x2"]}}
    print(json.dumps(out, indent=2))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
