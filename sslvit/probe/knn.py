"""Weighted k-NN classification of frozen features (cosine similarity; votes exp(sim / T), as in InstDisc and
DINO)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, num_classes: int,
                 *, k: int = 20, temperature: float = 0.07, chunk: int = 256) -> np.ndarray:
    """Weighted k-NN top-1 per layer (cosine similarity; votes exp(sim / T), as in DINO): (L,)."""
    k = min(k, train_x.shape[1])

    @jax.jit
    def predict(bank, bank_y, q):
        q = q / (jnp.linalg.norm(q, axis=-1, keepdims=True) + 1e-12)
        sims = q @ bank.T
        top, idx = jax.lax.top_k(sims, k)
        votes = jax.nn.one_hot(bank_y[idx], num_classes) * jnp.exp(top / temperature)[..., None]
        return jnp.argmax(votes.sum(axis=1), -1)

    out = []
    for layer in range(train_x.shape[0]):
        bank = jnp.asarray(train_x[layer])
        bank = bank / (jnp.linalg.norm(bank, axis=-1, keepdims=True) + 1e-12)
        bank_y = jnp.asarray(train_y)
        correct = 0
        for i in range(0, test_x.shape[1], chunk):
            q = test_x[layer, i:i + chunk]
            pad = chunk - q.shape[0]  # fixed chunk shape: one compile
            pred = np.asarray(predict(bank, bank_y, np.pad(q, ((0, pad), (0, 0)))))[: q.shape[0]]
            correct += int((pred == test_y[i:i + chunk]).sum())
        out.append(correct / max(test_x.shape[1], 1))
    return np.asarray(out)
