"""Frozen features for the probe: the pooled tokens of chosen layers, extracted once per split (one jitted forward
per batch, data-parallel) and standardised with the train statistics (a parameter-free BatchNorm, as MAE and MoCo v3
put before the classifier, so one learning rate suits every layer)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sslvit.errors import ConfigError
from sslvit.pooling import get_pooling
from sslvit.train import batch_sharding, replicated, to_global


def make_feature_fn(model, layers: Sequence[int], pool: str):
    """`(variables, images) -> (L, B, F)` pooled tokens of `layers` (1-based), float32, deterministic (eval)."""
    pooling = get_pooling(pool)
    index = np.asarray(layers, np.int32) - 1

    def features(variables, images):
        _, feats = model.apply(variables, images, train=False, return_features=True, collect_layers=True)
        tokens = feats["layers"][index]  # (L, B, 1+N, D): the residual stream after each chosen layer
        return pooling(tokens.astype(jnp.float32))

    return features


def extract_features(feature_fn, variables, iterator, *, mesh, desc: str = "features",
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One pass of an eval iterator ({'image', 'label', 'valid'}) -> (features (L, n, F) float32, labels (n,)).

    Images enter sharded over the batch axis; features, labels and the valid mask come back replicated, so every
    process holds all of them (padding rows dropped), in the split's order whatever the number of processes: a
    global batch holds a slice of each process's shard, so each row is tagged with its process and its position
    in that process's shard, and the rows are sorted by the tags (shards are contiguous ranges of the split, in
    process order). The probe's shuffles then draw the same examples as a 1-process run."""
    from tqdm import tqdm  # noqa: PLC0415

    rep, data_sh = replicated(mesh), batch_sharding(mesh)

    def fn(v, batch):
        return feature_fn(v, batch["image"]), batch["label"], batch["valid"], batch["process"], batch["position"]

    step = jax.jit(fn, out_shardings=(rep,) * 5)
    feats, labels, origin = [], [], []
    total = len(iterator) if hasattr(iterator, "__len__") else None
    pi = jax.process_index()
    show = progress and pi == 0
    seen = 0
    for batch in tqdm(iterator, total=total, desc=desc, disable=not show, dynamic_ncols=True):
        n = len(batch["label"])
        tags = {"process": np.full(n, pi, np.int32), "position": np.arange(seen, seen + n, dtype=np.int32)}
        seen += n
        f, y, valid, proc, pos = jax.device_get(step(variables, to_global({**batch, **tags}, data_sh)))
        valid = np.asarray(valid, bool)
        feats.append(np.asarray(f)[:, valid])
        labels.append(np.asarray(y)[valid])
        origin.append(np.stack([np.asarray(proc)[valid], np.asarray(pos)[valid]]))
    if not feats:
        raise ConfigError(f"{desc}: the split yielded no images")
    proc, pos = np.concatenate(origin, axis=1)
    order = np.lexsort((pos, proc))  # by process, then position in its shard
    return np.concatenate(feats, axis=1)[:, order], np.concatenate(labels).astype(np.int32)[order]


def standardize(train: np.ndarray, *others: np.ndarray, eps: float = 1e-6) -> list[np.ndarray]:
    """Parameter-free BatchNorm: per layer and feature, subtract the train mean and divide by the train std."""
    mean = train.mean(axis=1, keepdims=True, dtype=np.float64)
    std = np.sqrt(train.var(axis=1, keepdims=True, dtype=np.float64) + eps)
    return [((x - mean) / std).astype(np.float32) for x in (train, *others)]
