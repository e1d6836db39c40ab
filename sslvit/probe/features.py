"""Frozen features for the probe: the pooled tokens of chosen layers, extracted once per split (one jitted forward
per batch, data-parallel) and standardised with the train statistics (a parameter-free BatchNorm, as MAE and MoCo v3
put before the classifier, so one learning rate suits every layer).

`extract_to_disk` streams them into files as they come (sslvit/probe/store.py): host memory stays one batch, whatever
the split's size. `extract_features` keeps them in memory (small subsets: the online k-NN monitor, tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sslvit.errors import ConfigError
from sslvit.pooling import get_pooling
from sslvit.probe.store import ArrayFeatures, DiskFeatures, FeatureWriter, feature_stats
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


def feature_step(feature_fn, mesh):
    """The jitted step of an extraction pass: a sharded batch in, its features, labels, valid mask and tags out,
    replicated. Build it once for repeated passes (the online monitor): a new one compiles again."""

    def fn(v, batch):
        return feature_fn(v, batch["image"]), batch["label"], batch["valid"], batch["process"], batch["position"]

    return jax.jit(fn, out_shardings=(replicated(mesh),) * 5)


def _batches(
    feature_fn, variables, iterator, *, mesh, desc: str, progress: bool, max_batches: int | None = None, step=None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per batch of an eval iterator ({'image', 'label', 'valid'}): (features (L, b, F), labels, process, position) of
    its valid rows, the rows of every process (replicated)."""
    from tqdm import tqdm  # noqa: PLC0415

    data_sh = batch_sharding(mesh)
    step = step or feature_step(feature_fn, mesh)
    total = len(iterator) if hasattr(iterator, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    pi = jax.process_index()
    seen = 0
    for i, batch in enumerate(
        tqdm(iterator, total=total, desc=desc, disable=not (progress and pi == 0), dynamic_ncols=True)
    ):
        if max_batches is not None and i >= max_batches:
            break
        n = len(batch["label"])
        tags = {"process": np.full(n, pi, np.int32), "position": np.arange(seen, seen + n, dtype=np.int32)}
        seen += n
        f, y, valid, proc, pos = jax.device_get(step(variables, to_global({**batch, **tags}, data_sh)))
        valid = np.asarray(valid, bool)
        yield np.asarray(f)[:, valid], np.asarray(y)[valid], np.asarray(proc)[valid], np.asarray(pos)[valid]


def extract_features(
    feature_fn,
    variables,
    iterator,
    *,
    mesh,
    desc: str = "features",
    progress: bool = True,
    max_batches: int | None = None,
    step=None,
) -> tuple[np.ndarray, np.ndarray]:
    """One pass of an eval iterator (or its first `max_batches` batches) -> (features (L, n, F) float32, labels (n,)),
    in memory. `step`: a `feature_step` of `feature_fn` to reuse.

    Images enter sharded over the batch axis; features, labels and the valid mask come back replicated, so every
    process holds all of them (padding rows dropped), in the split's order whatever the number of processes: a
    global batch holds a slice of each process's shard, so each row is tagged with its process and its position
    in that process's shard, and the rows are sorted by the tags (shards are contiguous ranges of the split, in
    process order). The probe's shuffles then draw the same examples as a 1-process run."""
    feats, labels, origin = [], [], []
    for f, y, proc, pos in _batches(
        feature_fn, variables, iterator, mesh=mesh, desc=desc, progress=progress, max_batches=max_batches, step=step
    ):
        feats.append(f)
        labels.append(y)
        origin.append(np.stack([proc, pos]))
    if not feats:
        raise ConfigError(f"{desc}: the split yielded no images")
    proc, pos = np.concatenate(origin, axis=1)
    order = np.lexsort((pos, proc))  # by process, then position in its shard
    return np.concatenate(feats, axis=1)[:, order], np.concatenate(labels).astype(np.int32)[order]


def extract_to_disk(
    feature_fn, variables, iterator, directory: Path, *, mesh, desc: str = "features", progress: bool = True
) -> tuple[DiskFeatures, np.ndarray]:
    """One pass of an eval iterator -> (the features on disk under `directory`, labels (n,) in memory), in the split's
    order (see `extract_features`). Each process writes the rows of its own shard into its own file as they come, and
    waits for the others before reading theirs: in a multi-process run `directory` must be on a file system every
    process sees (the run dir is: checkpoints need it too)."""
    pi, pc = jax.process_index(), jax.process_count()
    writer = FeatureWriter(directory, pi)
    labels: list[list[np.ndarray]] = [[] for _ in range(pc)]  # per process: (position, label) pairs
    shape = None
    try:
        for f, y, proc, pos in _batches(feature_fn, variables, iterator, mesh=mesh, desc=desc, progress=progress):
            shape = f.shape
            for p in np.unique(proc):
                rows = proc == p
                labels[p].append(np.stack([pos[rows], y[rows]]))
                if p == pi:  # rows of a shard are contiguous positions within a global batch
                    writer.write(int(pos[rows][0]), f[:, rows].transpose(1, 0, 2))
    finally:
        writer.close()
    if shape is None:
        raise ConfigError(f"{desc}: the split yielded no images")
    if pc > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(f"probe features written: {directory}")
    part_labels = []
    for p in range(pc):
        pairs = np.concatenate(labels[p], axis=1) if labels[p] else np.zeros((2, 0), np.int64)
        part_labels.append(pairs[1][np.argsort(pairs[0], kind="stable")])
    store = DiskFeatures(directory, [len(y) for y in part_labels], shape[0], shape[2])
    return store, np.concatenate(part_labels).astype(np.int32)


def standardize(train: np.ndarray, *others: np.ndarray, eps: float = 1e-6) -> list[np.ndarray]:
    """Parameter-free BatchNorm: per layer and feature, subtract the train mean and divide by the train std (the
    statistics of `feature_stats`, which the streamed probe uses too)."""
    mean, std = feature_stats(ArrayFeatures(train), eps)
    return [((x - mean) / std).astype(np.float32) for x in (train, *others)]
