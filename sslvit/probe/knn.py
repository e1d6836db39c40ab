"""Weighted k-NN classification of frozen features (cosine similarity; votes exp(sim / T), as in InstDisc and
DINO).

The train features are the memory bank. They are streamed past blocks of queries, a chunk at a time, keeping each
query's running top-k (similarity, label): host memory is a block of queries and a chunk of the bank, whatever the
bank's size, and the top-k, hence the prediction, is the one a single pass over the whole bank finds.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sslvit.probe.store import as_source, chunks, fill, rows_per_read

BANK_ROWS = 4096  # bank rows per jitted update


def _unit(x):
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


@partial(jax.jit, static_argnames=("k",))
def _merge_top_k(top_sim, top_label, bank, bank_y, valid, queries, *, k: int):
    """Fold a bank chunk (L, c, F) into the running top-k (L, q, k) of unit-norm queries (L, q, F)."""
    sims = jnp.einsum("lqf,lcf->lqc", queries, _unit(bank))
    sims = jnp.where(valid[None, None], sims, -jnp.inf)
    labels = jnp.broadcast_to(bank_y[None, None], sims.shape)
    sim, idx = jax.lax.top_k(jnp.concatenate([top_sim, sims], -1), k)
    return sim, jnp.take_along_axis(jnp.concatenate([top_label, labels], -1), idx, -1)


@partial(jax.jit, static_argnames=("num_classes",))
def _vote(top_sim, top_label, temperature, *, num_classes: int):
    votes = jax.nn.one_hot(top_label, num_classes) * jnp.exp(top_sim / temperature)[..., None]
    return jnp.argmax(votes.sum(axis=-2), -1)


def knn_accuracy(
    train_x,
    train_y: np.ndarray,
    test_x,
    test_y: np.ndarray,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 256,
    memory_bytes: int | None = None,
) -> np.ndarray:
    """Weighted k-NN top-1 per layer (cosine similarity; votes exp(sim / T), as in DINO): (L,).

    `train_x`, `test_x`: arrays (L, n, F) or feature sources (sslvit/probe/store.py). Queries go `chunk` at a time
    through the bank; `memory_bytes` bounds the queries held at once (None: all of them)."""
    bank, queries = as_source(train_x), as_source(test_x)
    n_layers, n_bank, n_query = bank.num_layers, bank.num_rows, queries.num_rows
    k = min(k, n_bank)
    row_bytes = n_layers * queries.dim * 4
    block = n_query if memory_bytes is None else max(chunk, int(memory_bytes // (2 * row_bytes)) // chunk * chunk)
    step = min(BANK_ROWS, rows_per_read(bank))
    bank_buf = np.zeros((n_layers, step, bank.dim), np.float32)
    correct = np.zeros(n_layers, np.int64)
    for qa, qb in chunks(n_query, block):
        q = np.empty((n_layers, qb - qa, queries.dim), np.float32)
        fill(q, queries, [(qa, qb)])
        pad = -(qb - qa) % chunk  # fixed query shape: one compile
        q = _unit(jnp.asarray(np.pad(q, ((0, 0), (0, pad), (0, 0))))).reshape(n_layers, -1, chunk, queries.dim)
        top = [
            (jnp.full((n_layers, chunk, k), -jnp.inf, jnp.float32), jnp.zeros((n_layers, chunk, k), jnp.int32))
            for _ in range(q.shape[1])
        ]  # per query chunk: the running top-k similarities and their labels
        for ba, bb in chunks(n_bank, step):
            rows = fill(bank_buf, bank, [(ba, bb)])
            bank_dev = jnp.array(bank_buf, copy=True)  # not a view of the buffer the next chunk is read into
            bank_y = jnp.asarray(np.pad(train_y[ba:bb], (0, step - rows)).astype(np.int32))
            valid = jnp.arange(step) < rows
            top = [_merge_top_k(*t, bank_dev, bank_y, valid, q[:, i], k=k) for i, t in enumerate(top)]
        pred = np.concatenate([np.asarray(_vote(*t, temperature, num_classes=num_classes)) for t in top], axis=1)
        pred = pred[:, : qb - qa]
        correct += (pred == test_y[None, qa:qb]).sum(axis=1)
    return correct / max(n_query, 1)


__all__ = ["knn_accuracy"]
