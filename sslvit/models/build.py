"""The encoder's description, and the ViT built from it.

An encoder is described by the two config groups that define it, as the user writes them:
`{"model": {...the model group...}, "stem": {"name": "hmlp", "norm": "batch"}}`. Pretraining and fine-tuning save
this description with every checkpoint (meta key `encoder`), so a probe or a fine-tune rebuilds the encoder without
repeating an option, and command-line overrides (`model.dim=...`, `stem.norm=...`) compare to it key for key.
"""

from __future__ import annotations

from typing import Any, Mapping

from sslvit.config.checks import Registered
from sslvit.config.groups import ModelConfig
from sslvit.errors import ConfigError
from sslvit.models.stems import STEM_GIVEN, STEMS

ENCODER_GROUPS = ("model", "stem")


def encoder_config(model: Any, stem: Any) -> dict:
    """The validated, plain description of an encoder from its `model` and `stem` config groups."""
    return {
        "model": ModelConfig.parse(model).to_dict(),
        "stem": dict(Registered(STEMS, given=STEM_GIVEN)(stem, "stem")),
    }


def encoder_from_meta(meta: Mapping[str, Any]) -> dict | None:
    """The encoder description saved in a checkpoint's meta, or None. Checkpoints written before the description
    was nested (meta 'model': the ViT's flat arguments, with `stem` and `stem_norm`) are read as well."""
    enc = meta.get("encoder")
    if isinstance(enc, Mapping) and isinstance(enc.get("model"), Mapping):
        return {"model": dict(enc["model"]), "stem": dict(enc.get("stem") or {"name": "linear"})}
    flat = meta.get("model")
    if isinstance(flat, Mapping):
        return from_flat(flat)
    return None


def from_flat(flat: Mapping[str, Any]) -> dict:
    """{'stem': 'hmlp', 'stem_norm': 'batch', ...model keys} -> the nested description."""
    model = {k: v for k, v in flat.items() if k not in ("stem", "stem_norm")}
    return {"model": model, "stem": {"name": flat.get("stem", "linear"), "norm": flat.get("stem_norm", "batch")}}


def build_vit(
    encoder: Mapping[str, Any], *, num_classes: int = 0, use_mask_token: bool = False, **model_overrides: Any
):
    """The ViT of an encoder description; `model_overrides` change model keys (e.g. image_size for fine-tuning at
    another resolution, drop_path)."""
    import jax.numpy as jnp  # noqa: PLC0415

    from sslvit.models.vit import ViT  # noqa: PLC0415

    if "model" not in encoder or "stem" not in encoder:
        raise ConfigError(f"an encoder description needs 'model' and 'stem' (got {sorted(encoder)})")
    model = dict(encoder["model"], **model_overrides)
    dtype = model.pop("dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype={dtype!r} must be one of float32, bfloat16")
    stem = dict(encoder["stem"])
    return ViT(
        num_classes=num_classes,
        use_mask_token=use_mask_token,
        stem=stem.get("name", "linear"),
        stem_norm=stem.get("norm", "batch"),
        dtype=jnp.dtype(dtype),
        **model,
    )
