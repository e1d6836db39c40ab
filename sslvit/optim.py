"""Optimiser: AdamW with BEiT's recipe (no weight decay on norms, biases, tokens and position embeddings),
linear warmup then cosine decay, global-norm gradient clipping and layer-wise learning-rate decay.

Trainable and frozen parameters are split before the optimiser is built (see `sslvit.finetune_modes`), so the
optimiser only ever sees — and keeps state for — the trainable tree.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from omegaconf import DictConfig, OmegaConf

from sslvit.errors import ConfigError

# Leaf names that get no weight decay (BEiT: norms, biases, class/mask tokens, position embedding, LayerScale).
NO_DECAY_NAMES = ("bias", "scale", "norm_scale", "norm_bias", "qkv_bias", "out_bias", "fc1_bias", "fc2_bias",
                  "layer_scale", "pos_embedding", "cls_token", "mask_token")


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


def _cfg(cfg: Mapping) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def lr_schedule(cfg: Mapping, total_steps: int) -> optax.Schedule:
    cfg = _cfg(cfg)
    warmup = int(cfg.get("warmup_steps", 0))
    warmup = min(warmup, max(total_steps - 1, 0))
    end_lr = float(cfg.get("min_lr", 0.0))
    # Warmup starts at lr/warmup, not 0: the first step is not wasted.
    return optax.warmup_cosine_decay_schedule(
        init_value=float(cfg.lr) / warmup if warmup else float(cfg.lr), peak_value=float(cfg.lr), warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=end_lr)


def validate(cfg: Mapping) -> None:
    cfg = _cfg(cfg)

    def check(name, ok, allowed):
        if not ok:
            raise ConfigError(f"optim.{name}={cfg.get(name)!r} is out of range: {allowed}")

    check("name", cfg.get("name", "adamw") == "adamw", "the only optimiser is adamw (conf/optim/adamw.yaml)")
    check("lr", _num(cfg.get("lr")) and 0 < cfg.lr < 10, "must be a number in (0, 10)")
    check("min_lr", _num(cfg.get("min_lr", 0)) and 0 <= cfg.get("min_lr", 0) <= cfg.lr,
          f"must be a number in [0, optim.lr={cfg.lr}] (the end of the cosine decay)")
    check("eps", _num(cfg.get("eps", 1e-8)) and 0 < cfg.get("eps", 1e-8) < 1, "must be a number in (0, 1), e.g. 1e-8")
    check("weight_decay", _num(cfg.get("weight_decay", 0)) and 0 <= cfg.get("weight_decay", 0) < 10, "must be >= 0")
    check("b1", _num(cfg.get("b1", 0.9)) and 0 <= cfg.get("b1", 0.9) < 1, "must be in [0, 1)")
    check("b2", _num(cfg.get("b2", 0.999)) and 0 <= cfg.get("b2", 0.999) < 1, "must be in [0, 1)")
    check("warmup_steps", isinstance(cfg.get("warmup_steps", 0), int) and cfg.get("warmup_steps", 0) >= 0,
          "must be an integer >= 0")
    clip = cfg.get("clip_grad_norm")
    check("clip_grad_norm", clip is None or (_num(clip) and clip > 0), "must be > 0, or null for no clipping")
    ld = cfg.get("layer_decay")
    check("layer_decay", ld is None or (_num(ld) and 0 < ld <= 1), "must be in (0, 1], or null for none")
    check("accum_steps", isinstance(cfg.get("accum_steps", 1), int) and cfg.get("accum_steps", 1) >= 1,
          "must be an integer >= 1")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def make_optimizer(cfg: Mapping, params, *, total_steps: int, depth: int | None = None):
    """AdamW + warmup/cosine + clipping (+ layer decay when `cfg.layer_decay` and `depth` are set).

    Returns (optimizer, schedule). `params` is the trainable tree (only its structure is used).
    """
    cfg = _cfg(cfg)
    validate(cfg)
    schedule = lr_schedule(cfg, total_steps)
    parts = []
    if cfg.get("clip_grad_norm"):
        parts.append(optax.clip_by_global_norm(float(cfg.clip_grad_norm)))
    parts.append(optax.adamw(schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                             eps=float(cfg.get("eps", 1e-8)), weight_decay=float(cfg.get("weight_decay", 0.0)),
                             mask=decay_mask(params)))
    if cfg.get("layer_decay") and depth and float(cfg.layer_decay) != 1.0:
        parts.append(scale_by_tree(layer_decay_scales(params, depth, float(cfg.layer_decay))))
    return optax.chain(*parts), schedule
