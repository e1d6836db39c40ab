"""Linear classifiers on frozen features: one per layer, all trained together (AdamW, warmup + cosine; one jitted
scan per epoch), and their top-1."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sslvit.config.groups import ProbeOptions


def train_linear_probes(x: np.ndarray, y: np.ndarray, num_classes: int, cfg: ProbeOptions, *, seed: int = 0,
                        progress: bool = True) -> dict:
    """One linear classifier per layer on features x (L, n, F), labels y (n,); all trained together.

    Returns {'w': (L, F, C), 'b': (L, C)}. The summed loss keeps the layers independent (disjoint parameters)."""
    from tqdm import tqdm  # noqa: PLC0415

    n_layers, n, f = x.shape
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    schedule = optax.warmup_cosine_decay_schedule(cfg.lr / max(warmup, 1) if warmup else cfg.lr, cfg.lr, warmup,
                                                  max(total, warmup + 1), 0.0)
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay, mask={"w": True, "b": False})
    params = {"w": jnp.zeros((n_layers, f, num_classes), jnp.float32),
              "b": jnp.zeros((n_layers, num_classes), jnp.float32)}
    opt_state = tx.init(params)
    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y)

    def loss_fn(p, xb, yb):
        logits = jnp.einsum("lbf,lfc->lbc", xb, p["w"]) + p["b"][:, None]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.broadcast_to(yb, logits.shape[:2]))
        return ce.mean(axis=1).sum()

    @jax.jit
    def epoch(p, s, key, xs, ys):
        order = jax.random.permutation(key, xs.shape[1])[: steps_per_epoch * bs].reshape(steps_per_epoch, bs)

        def body(carry, idx):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p, xs[:, idx], ys[idx])
            updates, s = tx.update(g, s, p)
            return (optax.apply_updates(p, updates), s), loss

        (p, s), losses = jax.lax.scan(body, (p, s), order)
        return p, s, losses.mean()

    key = jax.random.key(seed)
    show = progress and jax.process_index() == 0
    bar = tqdm(range(cfg.epochs), desc="linear probe", disable=not show, dynamic_ncols=True)
    for e in bar:
        params, opt_state, loss = epoch(params, opt_state, jax.random.fold_in(key, e), x_dev, y_dev)
        if e == cfg.epochs - 1 or e % 5 == 0:
            bar.set_postfix(loss=f"{float(loss) / n_layers:.4f}")
    return jax.device_get(params)


def probe_accuracy(params: Mapping, x: np.ndarray, y: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Top-1 of each layer's classifier on features x (L, n, F): (L,)."""
    predict = jax.jit(lambda p, xb: jnp.argmax(jnp.einsum("lbf,lfc->lbc", xb, p["w"]) + p["b"][:, None], -1))
    correct = np.zeros(x.shape[0], np.int64)
    for i in range(0, x.shape[1], chunk):
        pred = np.asarray(predict(params, x[:, i:i + chunk]))
        correct += (pred == y[None, i:i + chunk]).sum(axis=1)
    return correct / max(x.shape[1], 1)
