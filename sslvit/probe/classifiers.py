"""Linear classifiers on frozen features: one per layer, all trained together (AdamW, warmup + cosine), and their
top-1.

Features come from a source (sslvit/probe/store.py), in memory or on disk. Training holds a *window* of the train
features in memory at a time: with a memory budget that holds them all (CIFAR at the default `probe.memory_mb`) the
window is the whole split, loaded once, and every epoch is one jitted scan over a fresh permutation of it; otherwise
each epoch visits the split's chunks of rows in a fresh random order, a window of chunks at a time, each window
shuffled on the device and scanned. Either way a step is the same update (`make_update`), which the augmented probe
(features of new random crops each epoch: sslvit/probe/__init__.py) uses as well.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sslvit.config.groups import ProbeOptions
from sslvit.distributed import is_main_process
from sslvit.errors import ConfigError
from sslvit.probe.store import as_source, chunks, fill, rows_per_read

CHUNK_ROWS = 4096  # rows read from the source at a time; the shuffling unit of a streamed epoch


def make_optimizer(cfg: ProbeOptions, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW, linear warmup over `cfg.warmup_epochs`, cosine decay to 0 at `total_steps`; no decay of the biases."""
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(
        cfg.lr / max(warmup, 1) if warmup else cfg.lr, cfg.lr, warmup, max(total_steps, warmup + 1), 0.0
    )
    return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask={"w": True, "b": False})


def init_params(num_layers: int, dim: int, num_classes: int) -> dict:
    return {
        "w": jnp.zeros((num_layers, dim, num_classes), jnp.float32),
        "b": jnp.zeros((num_layers, num_classes), jnp.float32),
    }


def make_update(tx: optax.GradientTransformation):
    """`(params, opt_state, x (L, B, F), y (B,)) -> (params, opt_state, loss)`: one step of every layer's classifier.
    The summed loss keeps the layers independent (disjoint parameters)."""

    def loss_fn(p, xb, yb):
        logits = jnp.einsum("lbf,lfc->lbc", xb, p["w"]) + p["b"][:, None]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.broadcast_to(yb, logits.shape[:2]))
        return ce.mean(axis=1).sum()

    def update(p, s, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    return update


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which rows each epoch's windows hold: `windows[e]` lists the windows of epoch e, each a list of (start, stop)
    row ranges. One window of everything, in order, when the budget holds all rows."""

    windows: list[list[list[tuple[int, int]]]]
    window_rows: int

    @property
    def streamed(self) -> bool:
        return len(self.windows[0]) > 1 or len(self.windows[0][0]) > 1

    def steps(self, batch_size: int) -> int:
        return sum(sum(b - a for a, b in w) // batch_size for epoch in self.windows for w in epoch)


def plan_windows(n: int, row_bytes: int, batch_size: int, epochs: int, seed: int, memory_bytes: int | None) -> Plan:
    """Epochs as windows of chunks under the memory budget. A window takes `memory_bytes / 2`: the host buffer, and
    its copy on the device (on a CPU, in the same memory)."""
    window_rows = n if memory_bytes is None else int(memory_bytes // (2 * row_bytes))
    if window_rows >= n:
        return Plan([[[(0, n)]] for _ in range(epochs)], n)
    chunk = min(CHUNK_ROWS, window_rows)
    per_window = window_rows // chunk
    if per_window * chunk < batch_size:
        raise ConfigError(
            f"probe.memory_mb={memory_bytes / 2**20:g} holds {window_rows} examples of "
            f"{row_bytes / 2**10:.1f} KiB of features, fewer than probe.batch_size={batch_size}: raise "
            f"probe.memory_mb to at least {int(np.ceil(2 * batch_size * row_bytes / 2**20))}"
        )
    ranges = list(chunks(n, chunk))
    windows = []
    for e in range(epochs):
        order = np.random.default_rng([seed, e]).permutation(len(ranges))
        windows.append([[ranges[i] for i in order[j : j + per_window]] for j in range(0, len(order), per_window)])
    return Plan(windows, per_window * chunk)


def train_linear_probes(
    x,
    y: np.ndarray,
    num_classes: int,
    cfg: ProbeOptions,
    *,
    seed: int = 0,
    progress: bool = True,
    memory_bytes: int | None = None,
) -> dict:
    """One linear classifier per layer on features x (an array (L, n, F), or a feature source), labels y (n,); all
    trained together. `memory_bytes`: the host memory for features (None: all of them at once).

    Returns {'w': (L, F, C), 'b': (L, C)}."""
    from tqdm import tqdm  # noqa: PLC0415

    source = as_source(x)
    n_layers, n, f = source.num_layers, source.num_rows, source.dim
    bs = min(cfg.batch_size, n)
    plan = plan_windows(n, n_layers * f * 4, bs, cfg.epochs, seed, memory_bytes)
    tx = make_optimizer(cfg, plan.steps(bs), n // bs)
    params = init_params(n_layers, f, num_classes)
    opt_state = tx.init(params)
    update = make_update(tx)

    @jax.jit
    def window(p, s, key, xs, ys):
        steps = xs.shape[1] // bs
        order = jax.random.permutation(key, xs.shape[1])[: steps * bs].reshape(steps, bs)

        def body(carry, idx):
            p, s, loss = update(*carry, xs[:, idx], ys[idx])
            return (p, s), loss

        (p, s), losses = jax.lax.scan(body, (p, s), order)
        return p, s, losses.mean()

    buffer = np.empty((n_layers, plan.window_rows, f), np.float32)
    resident = None
    key = jax.random.key(seed)
    bar = tqdm(range(cfg.epochs), desc="linear probe", disable=not (progress and is_main_process()), dynamic_ncols=True)
    for e in bar:
        losses = []
        for j, ranges in enumerate(plan.windows[e]):
            if not plan.streamed:  # everything fits: loaded once, a fresh permutation of it every epoch
                if resident is None:
                    fill(buffer, source, ranges)
                    resident = jnp.asarray(buffer), jnp.asarray(y)
                    buffer = None  # the device copy is all that is kept
                xs, ys, wkey = resident[0], resident[1], jax.random.fold_in(key, e)
            else:  # the next window is read while the last one trains; it is copied only once that is done
                rows = fill(buffer, source, ranges)
                # The last window must be done (its device copy freed) before the next one is copied in; copied, as a
                # CPU device array made with asarray may share the buffer's memory, which the next read overwrites.
                jax.block_until_ready(params)
                xs = jnp.array(buffer[:, :rows], copy=True)
                ys = jnp.asarray(np.concatenate([y[a:b] for a, b in ranges]))
                wkey = jax.random.fold_in(jax.random.fold_in(key, e), j)
            if xs.shape[1] >= bs:
                params, opt_state, loss = window(params, opt_state, wkey, xs, ys)
                losses.append(loss)
            del xs, ys
        if losses and (e == cfg.epochs - 1 or e % 5 == 0):
            bar.set_postfix(loss=f"{float(jnp.mean(jnp.stack(losses))) / n_layers:.4f}")
    return jax.device_get(params)


_predict = jax.jit(lambda p, xb: jnp.argmax(jnp.einsum("lbf,lfc->lbc", xb, p["w"]) + p["b"][:, None], -1))


def probe_accuracy(params: Mapping, x, y: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Top-1 of each layer's classifier on features x (an array (L, n, F), or a feature source): (L,)."""
    source = as_source(x)
    correct = np.zeros(source.num_layers, np.int64)
    for a, b in chunks(source.num_rows, chunk or min(CHUNK_ROWS, rows_per_read(source))):
        pred = np.asarray(_predict(params, source.read(a, b)))
        correct += (pred == y[None, a:b]).sum(axis=1)
    return correct / max(source.num_rows, 1)


__all__ = [
    "CHUNK_ROWS",
    "Plan",
    "init_params",
    "make_optimizer",
    "make_update",
    "plan_windows",
    "probe_accuracy",
    "train_linear_probes",
]
