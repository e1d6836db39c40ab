"""Optimiser: AdamW with BEiT's recipe (no weight decay on norms, biases, tokens and position embeddings),
linear warmup then cosine decay, global-norm gradient clipping and layer-wise learning-rate decay.

Trainable and frozen parameters are split before the optimiser is built (see `sslvit.finetune_modes`), so the
optimiser only ever sees — and keeps state for — the trainable tree.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from sslvit.config.groups import OptimConfig

# Leaf names that get no weight decay (BEiT: norms, biases, class/mask tokens, position embedding, LayerScale).
NO_DECAY_NAMES = (
    "bias",
    "scale",
    "norm_scale",
    "norm_bias",
    "qkv_bias",
    "out_bias",
    "fc1_bias",
    "fc2_bias",
    "layer_scale",
    "pos_embedding",
    "cls_token",
    "mask_token",
)


def decay_mask(params) -> Any:
    """True where weight decay applies: matmul/conv kernels only."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: k[-1] not in NO_DECAY_NAMES for k in flat})


def layer_id(path: tuple[str, ...], depth: int) -> int | None:
    """BEiT layer id of a parameter: 0 for the embedding (stem, tokens, position embedding), 1..depth for the
    layers (None: stacked over depth, resolved per layer), depth+1 for the final norm and the heads."""
    names = [p for p in path if p not in ("params", "encoder")]
    if not names:
        return depth + 1
    if names[0] in ("stem", "cls_token", "mask_token", "pos_embedding"):
        return 0
    if names[0] == "layers":
        return None
    return depth + 1


def layer_decay_scales(params, depth: int, decay: float):
    """Per-leaf learning-rate multipliers decay^(depth + 1 - layer_id). Leaves stacked over depth under `layers`
    get a (depth, 1, ..., 1) array so each layer of the scan has its own multiplier."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, leaf in flat.items():
        lid = layer_id(path, depth)
        if lid is None:
            per_layer = np.array([decay ** (depth - i) for i in range(depth)], np.float32)  # layer i has id i+1
            out[path] = jnp.asarray(per_layer.reshape((depth,) + (1,) * (leaf.ndim - 1)))
        else:
            out[path] = jnp.float32(decay ** (depth + 1 - lid))
    return traverse_util.unflatten_dict(out)


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiply each update leaf by the matching (broadcastable) leaf of `scales`."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from lr/warmup (the first step is not wasted), then cosine decay to `min_lr`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.lr / warmup if warmup else cfg.lr,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.min_lr,
    )


def make_optimizer(cfg: OptimConfig | Mapping, params, *, total_steps: int, depth: int | None = None):
    """AdamW + warmup/cosine + clipping (+ layer decay when `cfg.layer_decay` and `depth` are set).

    Returns (optimizer, schedule). `cfg`: the `optim` group (parsed here if a mapping). `params` is the trainable
    tree (only its structure is used).
    """
    cfg = OptimConfig.parse(cfg)
    schedule = lr_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    parts.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask(params))
    )
    if cfg.layer_decay and depth and cfg.layer_decay != 1.0:
        parts.append(scale_by_tree(layer_decay_scales(params, depth, cfg.layer_decay)))
    return optax.chain(*parts), schedule
