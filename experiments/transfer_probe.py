#!/usr/bin/env python3
"""The transfer probe taken apart: why a pretrained encoder can probe below its own random init on a dataset it
never saw, and what changes that.

    python experiments/transfer_probe.py <pretraining run dir> <arrays dir> [--json out.json]

For the run's encoder and for a random init of the same architecture, one linear classifier per layer on the
transfer set's frozen features (the probe stage's own functions: sslvit/probe), under one change at a time:

- pooling: cls+mean (the probe's default, BEiT's), cls, mean, and two that keep the layout of the patches: the
  means of a 2x2 grid of patch groups, and all patch tokens side by side;
- the features' standardisation with the train statistics (default) or none;
- the hMLP stem's BatchNorm statistics: those fitted during pretraining (CIFAR-10), or re-estimated on the transfer
  set's training images (the weights unchanged);

and two references without an encoder: the normalised pixels themselves, and random Gaussian projections of them
to the encoder's feature width (what a random network can keep of the pixels). The input normalisation is the
encoder's (CIFAR-10 mean/std), as in the evidence run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def spatial_features(model, layers, pool: str):
    """(variables, images) -> (L, B, F): `grid2x2`, the mean patch token of each quarter of the image (4 x dim), or
    `tokens`, every patch token (N x dim): poolings that keep where things are."""
    import jax.numpy as jnp

    index = np.asarray(layers, np.int32) - 1
    gh, gw = model.grid_size

    def fn(variables, images):
        _, feats = model.apply(variables, images, train=False, return_features=True, collect_layers=True)
        tokens = feats["layers"][index][:, :, 1:].astype(jnp.float32)  # (L, B, N, D)
        l, b, _, d = tokens.shape
        if pool == "tokens":
            return tokens.reshape(l, b, -1)
        grid = tokens.reshape(l, b, 2, gh // 2, 2, gw // 2, d).mean(axis=(3, 5))
        return grid.reshape(l, b, -1)

    return fn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("data", help="a folder holding train.npz and test.npz")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from sslvit import data as data_lib
    from sslvit.config.groups import ProbeOptions
    from sslvit.models import build_vit
    from sslvit.probe import (
        LinearProbe,
        extract_features,
        make_feature_fn,
        probe_accuracy,
        standardize,
        train_linear_probes,
    )
    from sslvit.train import make_mesh

    dc = {
        "name": "transfer",
        "source": "arrays",
        "path": args.data,
        "num_classes": None,
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
    }
    opts = ProbeOptions.parse({"epochs": args.epochs})
    mesh = make_mesh()
    info = data_lib.dataset_info(dc)
    t0 = time.time()

    def probe(x_train, y_train, x_test, y_test, standardise=True) -> list[float]:
        if standardise:
            x_train, x_test = standardize(x_train, x_test)
        params = train_linear_probes(x_train, y_train, info.num_classes, opts, seed=0, progress=False)
        return [round(100 * float(a), 2) for a in probe_accuracy(params, x_test, y_test)]

    def images(split, size):
        it = data_lib.make_eval_iterator(dc, split, batch_size=256, image_size=size)
        batches = list(it)
        x = np.concatenate([b["image"][b["valid"]] for b in batches])
        return x, np.concatenate([b["label"][b["valid"]] for b in batches]).astype(np.int32)

    rows = {}
    stage = None
    for random_init in (False, True):
        stage = LinearProbe(
            {
                "run": args.run,
                "data": dc,
                "random_init": random_init,
                "pool": "cls+mean",
                "batch_size": 256,
                "progress": False,
            },
            None,
        )
        layers = list(range(1, stage.model.depth + 1))
        variables = stage.variables()
        who = "random init" if random_init else "pretrained"

        def features(pool, v):
            fn = (
                make_feature_fn(stage.model, layers, pool)
                if pool in ("cls", "mean", "cls+mean")
                else spatial_features(stage.model, layers, pool)
            )
            out = []
            for split in (info.train_split, info.test_split):
                it = data_lib.make_eval_iterator(dc, split, batch_size=256, image_size=stage.image_size)
                out.append(extract_features(fn, v, it, mesh=mesh, progress=False))
            return out

        for pool in ("cls+mean", "cls", "mean", "grid2x2", "tokens"):
            (xtr, ytr), (xte, yte) = features(pool, variables)
            rows[f"{who} | pool {pool}"] = probe(xtr, ytr, xte, yte)
            if pool == "cls+mean":
                rows[f"{who} | pool cls+mean, no standardisation"] = probe(xtr, ytr, xte, yte, standardise=False)
        if variables.get("batch_stats"):
            # Re-estimate the stem's BatchNorm statistics on the transfer training images (train mode, no drop
            # path or dropout): each pass moves the running averages 10% towards the batch's; 60 passes ~ exact.
            model = build_vit(stage.encoder_cfg, num_classes=0, drop_path=0.0, dropout=0.0, emb_dropout=0.0)
            x_train, _ = images(info.train_split, stage.image_size)
            refit = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
            step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"])
            for _ in range(60):
                refit = {"params": refit["params"], "batch_stats": step(refit, jnp.asarray(x_train))}
            (xtr, ytr), (xte, yte) = features("cls+mean", refit)
            rows[f"{who} | pool cls+mean, stem BatchNorm statistics of the transfer set"] = probe(xtr, ytr, xte, yte)
        print(f"{who}: done ({time.time() - t0:.0f} s)", flush=True)

    # References without an encoder: the pixels, and random projections of them to the encoder's feature width.
    (ptr, ytr), (pte, yte) = (images(s, stage.image_size) for s in (info.train_split, info.test_split))
    ptr, pte = ptr.reshape(1, len(ptr), -1), pte.reshape(1, len(pte), -1)
    rows["pixels (32x32x3, normalised)"] = probe(ptr, ytr, pte, yte)
    width = 2 * stage.model.dim
    w = np.random.default_rng(0).normal(size=(ptr.shape[-1], width)).astype(np.float32) / np.sqrt(ptr.shape[-1])
    rows[f"random projection of the pixels to {width} dims"] = probe(ptr @ w, ytr, pte @ w, yte)

    print(
        f"\ntransfer set {args.data}: {info.num_train} train / {info.num_test} test, {info.num_classes} classes; "
        f"encoder {args.run} ({stage.model.depth} layers, dim {stage.model.dim}); linear probe top-1 %, per layer"
    )
    print(f"| features | {' | '.join(f'layer {i}' for i in range(1, stage.model.depth + 1))} | best |")
    print("|---|" + "---:|" * (stage.model.depth + 1))
    for name, acc in rows.items():
        cells = acc + [""] * (stage.model.depth - len(acc)) if len(acc) > 1 else [""] * stage.model.depth
        print(f"| {name} | {' | '.join(str(c) for c in cells)} | {max(acc)} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"run": args.run, "data": args.data, "epochs": args.epochs, "top1_per_layer": rows}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
