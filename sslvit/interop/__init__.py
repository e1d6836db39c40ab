"""Weights in and out: timm / DeiT Vision Transformer state dicts <-> sslvit variables, in pure numpy.

- `timm_to_variables(state_dict, model)`: the variables of a built `ViT` from a timm or DeiT state dict;
- `variables_to_timm(variables, model)`: a `dict[str, np.ndarray]` with timm's key names and layouts, which
  `timm.models.vision_transformer.VisionTransformer(**timm_kwargs(model), ...)` loads with `load_state_dict`
  (`timm_snippet` prints the lines that build and load it);
- `load_state_dict` / `save_safetensors`: `.safetensors` files (no torch needed), torch `.pth`/`.pt`/`.bin` state
  dicts (torch needed);
- `load_init(path, encoder)`: a file as the `TrainedEncoder` the fine-tune and probe stages start from
  (`init=<file>`); `export_run(run)`: a run's encoder as a `.safetensors` file (`export_timm.py`).

What maps to what (torch Linear weights are (out, in), flax kernels (in, out); convolutions OIHW vs HWIO):

- `patch_embed.proj.{weight,bias}` <-> `stem/proj/{kernel,bias}` (stem=linear); for stem=hmlp, `patch_embed.proj.{3i}`
  (Conv2d), `.{3i+1}` (BatchNorm2d), `.{3i+2}` (GELU) <-> `stem/conv{i}`, `stem/norm{i}` and
  `batch_stats/stem/norm{i}/{mean,var}`;
- `cls_token` + `pos_embed[:, 0]` <-> `cls_token`, `pos_embed[:, 1:]` <-> `pos_embedding` (see below);
- `blocks.i.attns.p.{norm, attn.qkv, attn.proj, ls.gamma}` (`ParallelThingsBlock`), or `blocks.i.{norm1, attn, ls1}`
  (`Block`, P = 1) <-> `layers/attn/{norm_*, qkv_*, out_*, layer_scale}[i, p]`;
- `blocks.i.ffns.p.{norm, mlp.fc1, mlp.fc2, ls.gamma}`, or `blocks.i.{norm2, mlp, ls2}` <->
  `layers/mlp/{norm_*, fc1_*, fc2_*, layer_scale}[i, p]`;
- `norm`, `head` <-> `norm`, `head` (timm's `fc_norm` is the identity).

- **The class token's position slot.** timm adds `pos_embed` (1, 1 + N, D) to the class token too; sslvit, like
  the official 3-things code (and timm's `no_embed_class=True`, DeiT III), adds position embeddings to the N patch
  tokens only. The class token's input is then one constant either way, so the conversion is exact: import folds
  the slot into the class token (`cls_token + pos_embed[:, 0]`), export writes a zero slot. A `pos_embed` of N rows
  (DeiT III, `no_embed_class=True`) is read as it is.
- **Pooling.** `pool=cls` is timm's `global_pool='token'`; `pool=mean` (the mean of the final-normed patch tokens)
  is `global_pool='avg', fc_norm=False` — timm's default for 'avg' normalises after pooling (`fc_norm`), another
  model, so a file with `fc_norm` weights is refused.
- **hMLP stem.** Exported as DeiT's `hMLP_stem` layout (`proj = Sequential(Conv2d, BatchNorm2d, GELU, ...)`) with
  as many stages as `hmlp_factors(patch_size)`: for patch 16 (4·2·2) it is DeiT's module exactly; patch 4 (CIFAR)
  has the 2·2 stages. flax BatchNorm momentum 0.9 is torch momentum 0.1, eps 1e-5 in both; running statistics
  are carried (`num_batches_tracked` is written as 0: only torch's momentum=None mode reads it).
- **DeiT's own key names** (models_v2.py: `gamma_1`, `norm11`, `attn1`, ...) are read as timm's.
- **Resolution.** When the file's grid differs from the model's, the position embeddings are resized by
  `resize_pos_embedding_timm`, PyTorch's bicubic `interpolate` (`align_corners=False`) reimplemented in numpy. By
  default without antialiasing (a = -0.75, clamped borders): `F.interpolate`'s default, which the DeiT, MAE and BEiT
  fine-tuning scripts and `timm.layers.resample_abs_pos_embed(..., antialias=False)` use. `antialias=True` is the
  default of timm's own loader since 0.9 (`create_model(..., img_size=...)`, `checkpoint_filter_fn`): a = -0.5, the
  kernel stretched when down-sampling, and the same values as `jax.image.resize`, which sslvit's own
  `resize_pos_embedding` uses (measured equal to 5e-6; the plain kernel differs from both by up to ~9% of the
  largest value up-sampling, ~37% down-sampling).
- **Refused, one line each** (no timm counterpart, or another model): `stem=conv`, an hMLP stem with LayerNorm,
  `dim_head` other than dim / heads; files with `fc_norm`,
  `dist_token`, register tokens, `norm_pre`, qk-norm, attention pooling, or keys of unknown meaning; a file's
  shapes that differ from the model's (the message names the key and both shapes).
- **Not carried:** the mask token (pretext-only) is not exported, and a file's `mask_token` is ignored; dropout,
  drop path and dtype are run options, not weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from sslvit.errors import ConfigError
from sslvit.interop.convert import IGNORED, UNMAPPABLE, canonical_keys, timm_to_variables, variables_to_timm
from sslvit.interop.files import SAFETENSORS_SUFFIX, TORCH_EXTRA, TORCH_SUFFIXES, load_state_dict, save_safetensors
from sslvit.interop.resize import bicubic_matrix, resize_pos_embedding_timm
from sslvit.interop.snippet import timm_kwargs, timm_snippet


def load_init(path: str | os.PathLike, encoder: Optional[Mapping], *, image_size: Any = None, antialias: bool = False):
    """An external checkpoint (`init=<file>`) as the `TrainedEncoder` the fine-tune and probe stages start from.

    `encoder` (the `model` and `stem` groups: `{"model": ..., "stem": ...}`, sslvit/models/build.py) says which
    architecture the file holds; `image_size` (default: the config's) is where the position embeddings are resized
    to (`resize_pos_embedding_timm`, `antialias` as there)."""
    from sslvit.models import build_vit  # noqa: PLC0415
    from sslvit.pretrained import TrainedEncoder  # noqa: PLC0415

    if not encoder:
        raise ConfigError(
            "init=<file> needs the model and stem groups to describe the file's architecture: pass "
            "model=<preset> stem=<stem> (and model.* options)"
        )
    where = os.fspath(path)
    sd = canonical_keys(load_state_dict(path))
    head = sd.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 0
    enc = {"model": dict(encoder["model"]), "stem": dict(encoder["stem"])}
    if image_size is not None:
        enc["model"]["image_size"] = image_size
    model = build_vit(enc, num_classes=num_classes)
    variables = timm_to_variables(sd, model, antialias=antialias, where=where)
    return TrainedEncoder(
        run_dir=Path(where).absolute(),
        step=0,
        encoder=enc,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        meta={"stage": "import", "source": where, "encoder": enc, "num_classes": num_classes},
    )


def export_run(
    run: str | os.PathLike, out: Optional[str | os.PathLike] = None, step: Optional[int] = None, head: bool = True
) -> tuple[Path, dict, str]:
    """Write the encoder of a pretraining or fine-tuning run (its checkpoint at `step`, default the latest) to a
    timm `.safetensors` file; returns (path, timm_kwargs, snippet). `out` defaults to
    `<run>/timm_step<step>.safetensors`; a fine-tuned classifier's head is included unless `head=False`."""
    from sslvit.models import build_vit  # noqa: PLC0415
    from sslvit.pretrained import load_encoder  # noqa: PLC0415

    if out is not None and Path(os.fspath(out)).suffix.lower() != SAFETENSORS_SUFFIX:
        raise ConfigError(f"out={os.fspath(out)!r} must end in {SAFETENSORS_SUFFIX} (the export writes safetensors)")
    trained = load_encoder(run, step)
    params = dict(trained.params)
    if not head:
        params.pop("head", None)
    num_classes = int(np.shape(params["head"]["kernel"])[-1]) if "head" in params else 0
    model = build_vit(trained.encoder, num_classes=num_classes)
    tensors = variables_to_timm({"params": params, "batch_stats": trained.batch_stats}, model)
    kwargs = timm_kwargs(model)
    target = Path(out) if out else trained.run_dir / f"timm_step{trained.step}{SAFETENSORS_SUFFIX}"
    meta = {
        "format": "pt",
        "source": f"sslvit {trained.stage} run {trained.run_dir} step {trained.step}",
        "sslvit_encoder": json.dumps(trained.encoder),
        "timm_kwargs": json.dumps(kwargs),
        "block": f"ParallelThingsBlock(num_parallel={model.num_parallel_branches})"
        if model.num_parallel_branches > 1
        else "Block",
        "stem": "hMLP_stem (DeiT layout)" if model.stem == "hmlp" else "PatchEmbed",
    }
    path = save_safetensors(tensors, target, meta)
    return path, kwargs, timm_snippet(model, path)


__all__ = [
    "IGNORED",
    "SAFETENSORS_SUFFIX",
    "TORCH_EXTRA",
    "TORCH_SUFFIXES",
    "UNMAPPABLE",
    "bicubic_matrix",
    "canonical_keys",
    "export_run",
    "load_init",
    "load_state_dict",
    "resize_pos_embedding_timm",
    "save_safetensors",
    "timm_kwargs",
    "timm_snippet",
    "timm_to_variables",
    "variables_to_timm",
]
