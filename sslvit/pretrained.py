"""Loading a trained encoder out of a run dir, for the linear probe and fine-tuning.

A run dir (`<run>/checkpoints/`, orbax) holds everything needed to rebuild its encoder: the checkpoint's meta
carries the encoder's description (its `model` and `stem` groups, sslvit/models/build.py), so no model option is
repeated on the command line. The loader

- rejects, in one line each, a path that is not a run dir, a run dir without a checkpoint, command-line model
  options that contradict the saved architecture, and a checkpoint whose weights don't fit the config;
- takes the encoder's weights from a pretraining run (`params['encoder']`, next to the pretext head) or from a
  fine-tuning run (the classifier's own tree);
- fits them into a freshly initialised model of the target shape (`load_into`): the position embeddings are
  interpolated when the image size changes, a classification head of another size is re-initialised, and pretext
  leaves the classifier has no use for (the mask token) are dropped.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
from flax import traverse_util

from sslvit.errors import ConfigError
from sslvit.models.build import ENCODER_GROUPS, encoder_from_meta
from sslvit.models.ops import resize_pos_embedding
from sslvit.rundir import CHECKPOINT_SUBDIR, run_dir_of_checkpoints

# Keys of an encoder description that fix the parameters' shapes (or which parameters exist): a run's saved values
# win and a command-line override that contradicts them is an error.
ARCH_KEYS = (
    "model.patch_size",
    "model.dim",
    "model.depth",
    "model.heads",
    "model.mlp_dim",
    "model.num_parallel_branches",
    "model.dim_head",
    "model.channels",
    "model.pos_embedding",
    "model.layer_scale_init",
    "stem.name",
    "stem.norm",
)
# Keys a user may change when reusing a trained encoder (they change how it runs, not what it holds).
RUNTIME_KEYS = (
    "model.dtype",
    "model.remat",
    "model.unroll_layers",
    "model.dropout",
    "model.emb_dropout",
    "model.pool",
    "model.drop_path",
    "model.attention",
    "model.remat_policy",
    "model.drop_path_schedule",
)
# Leaves a classifier built from a pretrained encoder does not have (pretext-only parameters).
PRETEXT_ONLY = (("mask_token",),)


@dataclasses.dataclass
class TrainedEncoder:
    """An encoder's weights and the description that rebuilds it (`sslvit.models.build_vit`)."""

    run_dir: Path
    step: int
    encoder: dict  # {'model': ..., 'stem': ...}; model.image_size is the resolution it was trained at
    params: dict  # the ViT's parameter tree (numpy), without the pretext head
    batch_stats: dict  # BatchNorm running statistics of the stem ({} without BatchNorm)
    meta: dict  # the checkpoint's whole meta ('stage', 'model', 'config', ...)

    @property
    def stage(self) -> str:
        return str(self.meta.get("stage", "?"))


def checkpoint_dir(run: str | os.PathLike) -> Path:
    """`<run>/checkpoints`, after checking that `run` is a run dir: one-line ConfigErrors otherwise."""
    if run is None or (isinstance(run, str) and not run.strip()):
        raise ConfigError("run is not set: pass run=<a pretraining run dir> (the dir pretrain.py printed)")
    path = Path(os.path.expanduser(os.fspath(run))).absolute()
    if not path.exists():
        raise ConfigError(
            f"run={os.fspath(run)!r} does not exist: pass run=<a pretraining run dir> "
            f"(the dir pretrain.py printed, e.g. outputs/pretrain/<date>)"
        )
    if not path.is_dir():
        raise ConfigError(f"run={os.fspath(run)!r} is a file, not a run dir: pass the dir holding checkpoints/")
    sub = path / CHECKPOINT_SUBDIR
    if not sub.is_dir() and any(p.is_dir() and p.name.isdigit() for p in path.iterdir()):
        return path  # the checkpoints dir itself was given
    return sub


def checkpoint_step(run: str | os.PathLike, step: Optional[int] = None) -> tuple[Path, Optional[int]]:
    """(checkpoint dir, step) of `run`: `step` checked against the complete checkpoints. `step=None` stays None:
    the latest *usable* step is found when the checkpoint is read (`load_checkpoint` falls back past damage)."""
    from sslvit.checkpoint import Checkpointer  # noqa: PLC0415

    ckpt_dir = checkpoint_dir(run)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ConfigError(f"step={step!r} must be a checkpoint step (an integer >= 0), or null for the latest")
    steps: list[int] = []
    if ckpt_dir.is_dir():
        with Checkpointer(ckpt_dir, max_to_keep=None) as ckpt:
            steps = ckpt.all_steps()
    if not steps:
        raise ConfigError(
            f"run={os.fspath(run)!r} holds no checkpoint ({ckpt_dir} is missing or empty): pass the "
            f"dir of a pretraining run that saved at least one checkpoint"
        )
    if step is not None and step not in steps:
        raise ConfigError(f"step={step} is not a checkpoint of {ckpt_dir}: choose one of {steps}, or null")
    return ckpt_dir, step


def load_encoder(run: str | os.PathLike, step: Optional[int] = None) -> TrainedEncoder:
    """The encoder of the run's checkpoint at `step` (default: the latest usable one: a damaged latest checkpoint
    is named in a warning and the one before it is used, as when a training run resumes)."""
    from sslvit.checkpoint import load_checkpoint  # noqa: PLC0415

    ckpt_dir, step = checkpoint_step(run, step)
    # fine-tuning splits params into trainable and frozen; BatchNorm stems keep statistics: all from one step
    step, tree, meta = load_checkpoint(ckpt_dir, step, subtrees=("params",), optional=("frozen", "batch_stats"))
    meta = dict(meta or {})
    encoder = encoder_from_meta(meta)
    if encoder is None:
        raise ConfigError(
            f"the checkpoint in {ckpt_dir} has no saved encoder description (meta 'encoder'): it was "
            f"not written by pretrain.py or finetune.py"
        )
    params, batch_stats = _encoder_trees(tree, ckpt_dir)
    return TrainedEncoder(
        run_dir=run_dir_of_checkpoints(ckpt_dir),
        step=int(step),
        encoder=encoder,
        params=params,
        batch_stats=batch_stats,
        meta=meta,
    )


def _encoder_trees(tree: Mapping, where: Path) -> tuple[dict, dict]:
    """(params, batch_stats) of the encoder, from whatever `load_params` returned: a TrainState-like tree
    ({'params', 'frozen', 'batch_stats', ...}) or a bare parameter tree; pretraining nests the encoder under
    'encoder' beside the pretext head, fine-tuning saves the ViT itself."""
    tree = dict(tree)
    batch_stats = {}
    if "params" in tree and isinstance(tree["params"], Mapping):
        flat = traverse_util.flatten_dict(_plain(tree["params"]))
        flat.update(traverse_util.flatten_dict(_plain(tree.get("frozen") or {})))  # fine-tuning splits them
        params = traverse_util.unflatten_dict(flat) if flat else {}
        batch_stats = _plain(tree.get("batch_stats") or {})
    else:
        params = _plain(tree)
    if "encoder" in params:
        params = params["encoder"]
        batch_stats = batch_stats.get("encoder", batch_stats) if isinstance(batch_stats, Mapping) else {}
    if "layers" not in params:
        raise ConfigError(f"the checkpoint in {where} holds no ViT encoder parameters (found {sorted(params)})")
    return params, batch_stats


def _plain(tree) -> dict:
    """Nested plain dicts of numpy arrays (orbax may hand back other mappings)."""
    if isinstance(tree, Mapping):
        return {str(k): _plain(v) for k, v in tree.items()}
    return np.asarray(tree)


# ------------------------------------------------------------------------------------------ model config
def touched_keys(overrides: Iterable[str], requested: Mapping[str, Mapping]) -> set[str]:
    """Dotted encoder keys that command-line overrides (Hydra syntax) set: `model=small` or `stem=conv` touch every
    key of the group, `model.dim=128` and `stem.norm=layer` one key each."""
    touched: set[str] = set()
    for item in overrides:
        k = str(item).split("=", 1)[0].lstrip("+~").strip()
        group, _, rest = k.partition(".")
        if group not in ENCODER_GROUPS:
            continue
        if rest:
            touched.add(f"{group}.{rest}")
        else:
            touched.update(f"{group}.{name}" for name in requested.get(group, {}))
    return touched


def resolve_encoder(
    saved: Mapping[str, Mapping], requested: Mapping[str, Mapping], touched: Iterable[str], run: Any
) -> dict:
    """The saved description, with the runtime options (dtype, remat, dropout, pool, ...) the user set on the
    command line. Raises ConfigError when an explicit override contradicts the saved architecture: the weights
    would not fit (or would mean something else), so the user asked for another model than the run holds."""
    out = {g: dict(saved.get(g, {})) for g in ENCODER_GROUPS}
    for dotted in sorted(set(touched)):
        group, _, name = dotted.partition(".")
        if name not in requested.get(group, {}):
            continue
        want, have = requested[group][name], saved.get(group, {}).get(name)
        if dotted in RUNTIME_KEYS:
            out[group][name] = want
        elif dotted == "model.image_size":
            if _norm_size(want) != _norm_size(have):
                raise ConfigError(
                    f"model.image_size={want} conflicts with the run's image_size={have} ({run}): "
                    f"drop it and set finetune.image_size={want} to change the resolution"
                )
        elif dotted in ARCH_KEYS and want != have:
            raise ConfigError(
                f"{dotted}={want!r} conflicts with the checkpoint's {dotted}={have!r} in run={run}: the "
                f"run's saved config rebuilds the model; drop the override (or use run=null to train "
                f"that model from scratch)"
            )
    return out


def _norm_size(x):
    return tuple(x) if isinstance(x, (list, tuple)) else (x, x)


# ------------------------------------------------------------------------------------------ weights
def load_into(
    template: Mapping,
    loaded: Mapping,
    *,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    where: str,
    keep_head: bool = False,
) -> dict:
    """Fill a freshly initialised parameter tree (`template`) with the trained leaves of `loaded`.

    - 'pos_embedding' is resized (bicubic on the 2-D grid) when the grids differ;
    - the classification head stays initialised unless `keep_head` and its shape matches;
    - pretext-only leaves in `loaded` (mask token, pretext head) are dropped;
    - any other missing leaf or shape mismatch is a ConfigError: the checkpoint belongs to another model."""
    want = traverse_util.flatten_dict(_plain(template))
    have = traverse_util.flatten_dict(_plain(loaded))
    out = {}
    for path, init in want.items():
        name = "/".join(path)
        if path[0] == "head":
            src = have.get(path)
            out[path] = src if (keep_head and src is not None and src.shape == init.shape) else init
            continue
        if path not in have:
            raise ConfigError(
                f"the checkpoint in {where} has no parameter {name}: it belongs to another model "
                f"config (drop conflicting model overrides, or use run=null)"
            )
        src = have[path]
        if path == ("pos_embedding",) and src.shape != init.shape and tuple(old_grid) != tuple(new_grid):
            src = np.asarray(resize_pos_embedding(src, new_grid, old_grid, num_extra_tokens=0))
        if src.shape != init.shape:
            raise ConfigError(
                f"the checkpoint's {name} has shape {tuple(src.shape)} but the model built from its "
                f"config expects {tuple(init.shape)} ({where}): the checkpoint belongs to another "
                f"model config"
            )
        out[path] = src.astype(init.dtype)
    extra = sorted("/".join(p) for p in have if p not in want and p[0] != "head" and p not in PRETEXT_ONLY)
    if extra:
        raise ConfigError(
            f"the checkpoint in {where} has parameters the model lacks ({', '.join(extra[:3])}): it "
            f"belongs to another model config"
        )
    return traverse_util.unflatten_dict(out)


def load_batch_stats(template: Mapping, loaded: Mapping, where: str) -> dict:
    """BatchNorm statistics of the stem, checked against the model's (empty without BatchNorm)."""
    want = traverse_util.flatten_dict(_plain(template or {}))
    have = traverse_util.flatten_dict(_plain(loaded or {}))
    out = {}
    for path, init in want.items():
        src = have.get(path)
        if src is None or src.shape != init.shape:
            raise ConfigError(
                f"the checkpoint in {where} lacks BatchNorm statistics {'/'.join(path)} of shape "
                f"{tuple(init.shape)}: it belongs to another model config"
            )
        out[path] = src.astype(init.dtype)
    return traverse_util.unflatten_dict(out) if out else {}
