"""Config -> objects: the model from the `model` and `stem` groups, and the shared checks of top-level keys.

Every check raises `ConfigError` with the key, its value and what is allowed, before anything is compiled.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from omegaconf import DictConfig, OmegaConf

from sslvit.errors import ConfigError
from sslvit.models import ViT

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODEL_KEYS = ("image_size", "patch_size", "dim", "depth", "heads", "mlp_dim", "num_parallel_branches", "dim_head",
              "dropout", "emb_dropout", "drop_path", "layer_scale_init", "pool", "pos_embedding", "channels",
              "remat", "unroll_layers")


def to_dict(cfg: Any) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def model_config(cfg: Mapping) -> dict:
    """The encoder's full description (saved with checkpoints; rebuilds the model for probes and fine-tuning)."""
    model, stem = to_dict(cfg["model"]), to_dict(cfg["stem"])
    out = {k: model[k] for k in MODEL_KEYS if k in model}
    out["dtype"] = model.get("dtype", "float32")
    out["stem"] = stem.get("name", "linear")
    out["stem_norm"] = stem.get("norm", "batch")
    return out


def build_vit(model_cfg: Mapping, *, num_classes: int = 0, **overrides) -> ViT:
    """ViT from a `model_config` dict; `overrides` (e.g. image_size for fine-tuning at another resolution)."""
    kw = dict(model_cfg)
    kw.update(overrides)
    dtype = kw.pop("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not supported: choose one of {list(DTYPES)}")
    for key in ("dropout", "emb_dropout", "drop_path"):
        if key in kw and not _is_number(kw[key]):
            raise ConfigError(f"model.{key}={kw[key]!r} must be a number in [0, 1)")
    if kw.get("layer_scale_init") is not None and not _is_number(kw["layer_scale_init"]):
        raise ConfigError(f"model.layer_scale_init={kw['layer_scale_init']!r} must be a number > 0, or null")
    for key in ("image_size", "patch_size", "dim", "depth", "heads", "mlp_dim", "num_parallel_branches", "channels",
                "dim_head"):
        if key not in kw or (key == "dim_head" and kw[key] is None):
            continue
        v = kw[key]
        if not (_is_positive_int(v) or (key == "image_size" and isinstance(v, (list, tuple)) and len(v) == 2
                                        and all(map(_is_positive_int, v)))):
            raise ConfigError(f"model.{key}={v!r} must be a positive integer"
                              f"{' (or null: dim // heads)' if key == 'dim_head' else ''}")
    for key in ("remat", "unroll_layers"):
        if key in kw and not isinstance(kw[key], bool):
            raise ConfigError(f"model.{key}={kw[key]!r} must be true or false")
    return ViT(num_classes=num_classes, dtype=DTYPES[dtype], **kw)


def _is_positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


def check_batch_size(batch_size, accum_steps: int = 1) -> int:
    """The global batch must split evenly over devices (and over gradient-accumulation micro-batches)."""
    check_int("batch_size", batch_size)
    n = jax.device_count()
    if batch_size % (n * accum_steps):
        what = f"{n} devices" + (f" x {accum_steps} accumulation steps" if accum_steps > 1 else "")
        raise ConfigError(f"batch_size={batch_size} is not divisible by {what}: use a multiple of "
                          f"{n * accum_steps}")
    if batch_size % jax.process_count():
        raise ConfigError(f"batch_size={batch_size} is not divisible by {jax.process_count()} processes")
    return batch_size
