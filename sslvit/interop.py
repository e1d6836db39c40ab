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
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from sslvit.errors import ConfigError
from sslvit.models.stems import hmlp_factors

TORCH_EXTRA = 'pip install "sslvit[timm]"'  # torch + timm: reading .pth files, running exported encoders
SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")

# Keys of timm / DeiT checkpoints with no sslvit counterpart, and why (matched as regular expressions).
UNMAPPABLE = (
    (r"^fc_norm\.", "fc_norm (LayerNorm after average pooling, timm's default for global_pool='avg') is another model "
                    "than sslvit's pool=mean, which normalises the tokens before pooling (timm fc_norm=False)"),
    (r"^(dist_token|head_dist\.)", "a distilled DeiT's distillation token and head have no sslvit counterpart"),
    (r"^reg_token", "register tokens have no sslvit counterpart"),
    (r"^norm_pre\.", "a LayerNorm before the blocks (timm pre_norm, CLIP-style) has no sslvit counterpart"),
    (r"\.(q_norm|k_norm)\.", "qk-norm (timm qk_norm=True) has no sslvit counterpart"),
    (r"\.attn\.norm\.|\.mlp\.norm\.", "norms inside attention / MLP (timm scale_attn_norm / scale_mlp_norm) have "
                                      "no sslvit counterpart"),
    (r"^attn_pool\.", "attention pooling (timm global_pool='map') has no sslvit counterpart"),
    (r"^patch_embed\.norm\.", "a norm after the patch embedding has no sslvit counterpart"),
)
IGNORED = ("mask_token",)  # pretext-only leaves of MIM checkpoints (the stages drop sslvit's own too)

# DeiT's models_v2.py names inside blocks.<i>. -> timm's: LayerScale blocks, and the two-branch blocks of the
# 3-things paper (Layer_scale_init_Block_paralx2 / Block_paralx2).
_DEIT_BLOCK = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}
_DEIT_PARALX2 = {"norm1": "attns.0.norm", "norm11": "attns.1.norm", "attn": "attns.0.attn", "attn1": "attns.1.attn",
                 "gamma_1": "attns.0.ls.gamma", "gamma_1_1": "attns.1.ls.gamma", "norm2": "ffns.0.norm",
                 "norm21": "ffns.1.norm", "mlp": "ffns.0.mlp", "mlp1": "ffns.1.mlp", "gamma_2": "ffns.0.ls.gamma",
                 "gamma_2_1": "ffns.1.ls.gamma"}


# ------------------------------------------------------------------------------------------ files
def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict as numpy arrays: `.safetensors` (numpy only) or a torch `.pth` / `.pt` / `.bin` (needs torch).

    Checkpoints that wrap the state dict ({'model': ...} as DeiT's, {'state_dict': ...}) are unwrapped, and a
    'module.' prefix (DistributedDataParallel) is dropped. Floating-point tensors come back as float32."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.is_file():
        raise ConfigError(f"init={os.fspath(path)!r} is not a file: pass a .safetensors or .pth state dict")
    suffix = p.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.numpy import load_file  # noqa: PLC0415

        try:
            sd = dict(load_file(str(p)))
        except Exception as e:  # noqa: BLE001 - a damaged or non-numpy (bfloat16) file: say which
            raise ConfigError(f"cannot read {p} as safetensors ({_first_line(e)}): write it with float32 "
                              f"tensors") from None
    elif suffix in TORCH_SUFFIXES:
        sd = _load_torch(p)
    else:
        raise ConfigError(f"init={os.fspath(path)!r}: unknown file type {suffix!r}; pass a .safetensors file or a "
                          f"torch state dict ({', '.join(TORCH_SUFFIXES)})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v) for k, v in sd.items()}


def _load_torch(p: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise ConfigError(f"reading {p.name} needs torch: {TORCH_EXTRA} (or save the state dict as .safetensors "
                          f"with safetensors.torch.save_file)") from None
    # weights_only: no arbitrary code from the pickle. Training checkpoints (DeiT's, MAE's) also hold the run's
    # argparse.Namespace, a plain attribute bag: allowed.
    import argparse  # noqa: PLC0415
    import contextlib  # noqa: PLC0415

    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        with safe([argparse.Namespace]) if safe else contextlib.nullcontext():
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot read {p} with torch.load ({_first_line(e)})") from None
    for key in ("model", "state_dict", "model_state", "module"):  # training checkpoints wrap the weights
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{p} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            out[str(k)] = (v.float() if v.is_floating_point() else v).numpy()
    return out


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write `tensors` to a `.safetensors` file (atomically: a temporary file renamed when complete)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    p = Path(os.path.expanduser(os.fspath(path))).absolute()
    if p.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ConfigError(f"out={os.fspath(path)!r} must end in {SAFETENSORS_SUFFIX}")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
              metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, p)
    return p


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ------------------------------------------------------------------------------------------ bicubic like torch
def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a (PyTorch: -0.75; its antialiased path and PIL: -0.5)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's 1-D bicubic resampling with `align_corners=False` (float64).

    antialias=False (`F.interpolate`'s default): 4 taps at src = (i + 0.5)·in/out - 0.5, a = -0.75, indices clamped
    to the border. antialias=True (the default of timm's `resample_abs_pos_embed`; PIL's filter): a = -0.5, the
    kernel stretched by in/out when down-sampling, taps inside the input only, weights normalised to sum 1."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    if not antialias:
        src = scale * (np.arange(n_out) + 0.5) - 0.5
        x0 = np.floor(src)
        for k in range(-1, 3):
            idx = np.clip(x0 + k, 0, n_in - 1).astype(np.int64)
            np.add.at(w, (np.arange(n_out), idx), _cubic(src - (x0 + k), -0.75))
        return w
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)  # int(): truncation, as the C++ static_cast
        hi = min(int(center + support + 0.5), n_in)
        taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
        w[i, lo:hi] = taps / taps.sum()
    return w


def resize_pos_embedding_timm(posemb, new_grid: Sequence[int], old_grid: Optional[Sequence[int]] = None,
                              num_extra_tokens: int = 0, antialias: bool = False) -> np.ndarray:
    """Position embeddings (1, extra + gh·gw, D) resized to `new_grid` exactly as timm does it (numpy).

    The same values as `timm.layers.resample_abs_pos_embed(posemb, new_grid, old_grid, num_extra_tokens,
    antialias=antialias)`, i.e. `torch.nn.functional.interpolate(mode='bicubic', align_corners=False)` on the grid;
    the `num_extra_tokens` leading rows are kept. `old_grid` defaults to a square grid."""
    posemb = np.asarray(posemb)
    extra, grid = posemb[:, :num_extra_tokens], posemb[:, num_extra_tokens:]
    n, d = grid.shape[1], grid.shape[2]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ConfigError(f"cannot infer a square grid from {n} position embeddings: pass old_grid")
        old_grid = (side, side)
    (gh, gw), (nh, nw) = (int(x) for x in old_grid), (int(x) for x in new_grid)
    if gh * gw != n:
        raise ConfigError(f"old_grid {gh}x{gw} does not match {n} position embeddings")
    if (gh, gw) == (nh, nw):
        return posemb
    g = grid.reshape(gh, gw, d).astype(np.float64)
    g = np.einsum("ih,hwd->iwd", bicubic_matrix(gh, nh, antialias), g)
    g = np.einsum("jw,iwd->ijd", bicubic_matrix(gw, nw, antialias), g)
    return np.concatenate([extra, g.reshape(1, nh * nw, d).astype(posemb.dtype)], axis=1)


# ------------------------------------------------------------------------------------------ the model's side
class _Arch:
    """The numbers of a built `ViT` that fix its timm layout, after checking that timm has that model."""

    def __init__(self, model, *, export: bool):
        self.model = model
        self.D, self.depth, self.H, self.P = int(model.dim), int(model.depth), int(model.heads), \
            int(model.num_parallel_branches)
        self.E = int(model.dim_head or model.dim // model.heads)
        self.M, self.C, self.p = int(model.mlp_dim), int(model.channels), int(model.patch_size)
        self.grid = tuple(int(g) for g in model.grid_size)
        self.N = self.grid[0] * self.grid[1]
        self.classes = int(model.num_classes)
        self.ls = model.layer_scale_init is not None
        self.stem = model.stem
        if model.stem == "conv":
            raise ConfigError("stem=conv (overlapping 3x3 convolutions) has no timm or DeiT counterpart: timm and DeiT "
                              "have the linear patch embedding (stem=linear) and DeiT's hMLP stem (stem=hmlp)")
        if model.stem == "hmlp" and model.stem_norm != "batch":
            raise ConfigError(f"stem.norm={model.stem_norm}: DeiT's hMLP stem uses BatchNorm; an hMLP stem with "
                              f"LayerNorm has no timm or DeiT counterpart (use stem.norm=batch)")
        if self.H * self.E != self.D:
            raise ConfigError(f"model.dim_head={model.dim_head} with heads={self.H} gives an attention width of "
                              f"{self.H * self.E}, not dim={self.D}: timm's attention has head_dim = dim // heads "
                              f"(set model.dim_head=null)")
        if not export:
            if model.use_mask_token:
                raise ConfigError("use_mask_token=True: timm's ViT has no mask token to import (build the model "
                                  "without it; the stages do)")
            if model.pos_embedding != "learned":
                raise ConfigError(f"model.pos_embedding={model.pos_embedding}: the file's learned position "
                                  f"embeddings have nowhere to go in a fixed sin-cos model; use "
                                  f"model.pos_embedding=learned")

    def template(self) -> dict:
        """{'params': ..., 'batch_stats': ...} shapes of the model (traced, nothing computed)."""
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415

        h, w = self.grid[0] * self.p, self.grid[1] * self.p
        shapes = jax.eval_shape(self.model.init, jax.random.key(0), jnp.zeros((1, h, w, self.C), jnp.float32))
        return jax.tree.map(lambda s: tuple(s.shape), dict(shapes))


def _block_names(i: int, p: int, parallel: bool) -> dict[str, str]:
    """timm key prefixes of branch p of block i: ParallelThingsBlock (attns/ffns) or Block (P = 1)."""
    if parallel:
        a, f = f"blocks.{i}.attns.{p}.", f"blocks.{i}.ffns.{p}."
        return {"attn_norm": a + "norm", "qkv": a + "attn.qkv", "proj": a + "attn.proj", "attn_ls": a + "ls.gamma",
                "mlp_norm": f + "norm", "fc1": f + "mlp.fc1", "fc2": f + "mlp.fc2", "mlp_ls": f + "ls.gamma"}
    b = f"blocks.{i}."
    return {"attn_norm": b + "norm1", "qkv": b + "attn.qkv", "proj": b + "attn.proj", "attn_ls": b + "ls1.gamma",
            "mlp_norm": b + "norm2", "fc1": b + "mlp.fc1", "fc2": b + "mlp.fc2", "mlp_ls": b + "ls2.gamma"}


def _hmlp_widths(a: _Arch) -> list[tuple[int, int, int]]:
    """(kernel, in, out) of each hMLP stage."""
    ks = hmlp_factors(a.p)
    widths = [a.D if i == len(ks) - 1 else a.D // 4 for i in range(len(ks))]
    return [(k, a.C if i == 0 else widths[i - 1], widths[i]) for i, k in enumerate(ks)]


# ------------------------------------------------------------------------------------------ timm -> sslvit
def canonical_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A timm or DeiT state dict with timm's key names: DeiT's models_v2.py block names (gamma_1, norm11, attn1, ...)
    renamed, a 'module.' prefix dropped, values as numpy arrays."""
    sd = {str(k): np.asarray(v) for k, v in state_dict.items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    paralx2 = {m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.norm11\.", k))}
    out = {}
    for k, v in sd.items():
        m = re.match(r"(blocks\.(\d+)\.)([A-Za-z0-9_]+)(.*)$", k)
        if m:
            table = _DEIT_PARALX2 if m.group(2) in paralx2 else _DEIT_BLOCK
            if m.group(3) in table:
                k = m.group(1) + table[m.group(3)] + m.group(4)
        out[k] = v
    return out


class _Reader:
    """Takes keys out of a state dict with shape checks; what is left over at the end is reported."""

    def __init__(self, sd: dict, where: str, model_desc: str):
        self.sd, self.where, self.desc, self.used = sd, where, model_desc, set()

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str, shape: tuple, hint: str, optional: bool = False) -> Optional[np.ndarray]:
        if key not in self.sd:
            if optional:
                return None
            raise ConfigError(f"{self.where} has no {key} (the model expects one of shape {tuple(shape)}): it is not "
                              f"a {self.desc}")
        v = self.sd[key]
        self.used.add(key)
        if tuple(v.shape) != tuple(shape):
            raise ConfigError(f"{key} has shape {tuple(v.shape)} in {self.where} but the model expects "
                              f"{tuple(shape)} ({hint}): set the model options to the file's architecture")
        return v

    def leftover(self) -> None:
        rest = sorted(k for k in self.sd if k not in self.used and k not in IGNORED
                      and not k.endswith("num_batches_tracked"))
        for key in rest:
            for pattern, why in UNMAPPABLE:
                if re.search(pattern, key):
                    raise ConfigError(f"{self.where} has {key}: {why}")
        if rest:
            raise ConfigError(f"{self.where} has {len(rest)} keys with no place in the model "
                              f"({', '.join(rest[:3])}{', ...' if len(rest) > 3 else ''}): it is not a {self.desc}")


def timm_to_variables(state_dict: Mapping[str, Any], model, *, antialias: bool = False,
                      where: str = "the state dict") -> dict:
    """sslvit variables ({'params', 'batch_stats'}) of the built `ViT` `model` from a timm or DeiT state dict.

    The model's options must describe the file's architecture (else a one-line ConfigError names the key and both
    shapes); the position embeddings are resized to the model's grid when the file's grid differs
    (`resize_pos_embedding_timm`, `antialias` as there). A headless model (num_classes=0) ignores the file's head;
    a model with LayerScale takes gamma = 1 from a file without (the same function)."""
    a = _Arch(model, export=False)
    sd = canonical_keys(state_dict)
    desc = (f"ViT with dim={a.D}, depth={a.depth}, heads={a.H}, mlp_dim={a.M}, {a.P} branch(es), patch "
            f"{a.p}, stem={a.stem}")
    r = _Reader(sd, where, desc)
    D, P, H, E, M = a.D, a.P, a.H, a.E, a.M
    f32 = np.float32

    for k in list(sd):
        for pattern, why in UNMAPPABLE:
            if re.search(pattern, k):
                raise ConfigError(f"{where} has {k}: {why}")
    if not r.has("cls_token"):
        raise ConfigError(f"{where} has no cls_token: a ViT without a class token (timm class_token=False) has no "
                          f"sslvit counterpart")
    if not r.has("pos_embed"):
        raise ConfigError(f"{where} has no pos_embed: a ViT without learned position embeddings has no sslvit "
                          f"counterpart")

    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    # Patch embedding.
    if a.stem == "linear":
        if r.has("patch_embed.proj.0.weight"):
            raise ConfigError(f"{where} has a stack of convolutions as patch embedding (patch_embed.proj.0.weight: "
                              f"DeiT's hMLP stem) but the model has stem=linear: pass stem=hmlp")
        w = r.take("patch_embed.proj.weight", (D, a.C, a.p, a.p), f"dim={D}, channels={a.C}, patch_size={a.p}")
        b = r.take("patch_embed.proj.bias", (D,), f"dim={D}", optional=True)
        params["stem"] = {"proj": {"kernel": w.transpose(2, 3, 1, 0), "bias": _or_zeros(b, (D,))}}
    else:
        if r.has("patch_embed.proj.weight"):
            raise ConfigError(f"{where} has one linear patch projection (patch_embed.proj.weight) but the model has "
                              f"stem=hmlp: pass stem=linear")
        params["stem"], stats["stem"] = {}, {}
        for i, (k, cin, cout) in enumerate(_hmlp_widths(a)):
            conv, bn = f"patch_embed.proj.{3 * i}.", f"patch_embed.proj.{3 * i + 1}."
            hint = f"hMLP stage {i} of patch_size={a.p} ({'·'.join(map(str, hmlp_factors(a.p)))}), dim={D}"
            w = r.take(conv + "weight", (cout, cin, k, k), hint)
            b = r.take(conv + "bias", (cout,), hint, optional=True)
            params["stem"][f"conv{i}"] = {"kernel": w.transpose(2, 3, 1, 0), "bias": _or_zeros(b, (cout,))}
            params["stem"][f"norm{i}"] = {"scale": r.take(bn + "weight", (cout,), hint),
                                          "bias": r.take(bn + "bias", (cout,), hint)}
            stats["stem"][f"norm{i}"] = {"mean": r.take(bn + "running_mean", (cout,), hint),
                                         "var": r.take(bn + "running_var", (cout,), hint)}

    # Class token and position embeddings (the class token's slot folded in; resized to the model's grid).
    cls = r.take("cls_token", (1, 1, D), f"dim={D}")
    pos = sd["pos_embed"]
    r.used.add("pos_embed")
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != D:
        raise ConfigError(f"pos_embed has shape {tuple(pos.shape)} in {where} but the model expects (1, {a.N}, {D}) "
                          f"or (1, {1 + a.N}, {D}) (dim={D}): set the model options to the file's architecture")
    rows = pos.shape[1]
    if rows == 1 + a.N or (rows != a.N and _is_square(rows - 1)):
        cls, pos = cls + pos[:, :1], pos[:, 1:]
    elif rows != a.N and not _is_square(rows):
        raise ConfigError(f"pos_embed has {rows} rows in {where}: neither a square grid nor a class slot + a square "
                          f"grid, and the model's grid {a.grid[0]}x{a.grid[1]} needs {a.N} or {1 + a.N}")
    params["cls_token"] = cls
    params["pos_embedding"] = resize_pos_embedding_timm(pos, a.grid, antialias=antialias) \
        if pos.shape[1] != a.N else pos

    # Blocks.
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if blocks != list(range(a.depth)):
        raise ConfigError(f"{where} has {len(blocks)} blocks (blocks.0-{max(blocks, default=-1)}) but model.depth="
                          f"{a.depth}: set model.depth={len(blocks)}")
    parallel = any(k.startswith("blocks.0.attns.") for k in sd)
    branches = len({k.split(".")[3] for k in sd if k.startswith("blocks.0.attns.")}) if parallel else 1
    if branches != P:
        raise ConfigError(f"{where} has {branches} parallel branch(es) per block "
                          f"({'blocks.0.attns.*' if parallel else 'timm Block'}) but model.num_parallel_branches={P}: "
                          f"set model.num_parallel_branches={branches}")
    attn = {n: np.zeros((a.depth, *s), f32) for n, s in (
        ("norm_scale", (P, D)), ("norm_bias", (P, D)), ("qkv_kernel", (D, P, 3, H, E)), ("qkv_bias", (P, 3, H, E)),
        ("out_kernel", (P, H, E, D)), ("out_bias", (P, D)))}
    mlp = {n: np.zeros((a.depth, *s), f32) for n, s in (
        ("norm_scale", (P, D)), ("norm_bias", (P, D)), ("fc1_kernel", (D, P, M)), ("fc1_bias", (P, M)),
        ("fc2_kernel", (P, M, D)), ("fc2_bias", (P, D)))}
    if a.ls:
        attn["layer_scale"] = np.ones((a.depth, P, D), f32)
        mlp["layer_scale"] = np.ones((a.depth, P, D), f32)
    dh, hh, mh = f"dim={D}", f"dim={D}, heads={H}", f"dim={D}, mlp_dim={M}"
    for i in range(a.depth):
        for p in range(P):
            n = _block_names(i, p, parallel)
            attn["norm_scale"][i, p] = r.take(n["attn_norm"] + ".weight", (D,), dh)
            attn["norm_bias"][i, p] = r.take(n["attn_norm"] + ".bias", (D,), dh)
            attn["qkv_kernel"][i, :, p] = r.take(n["qkv"] + ".weight", (3 * D, D), hh).T.reshape(D, 3, H, E)
            attn["qkv_bias"][i, p] = _or_zeros(r.take(n["qkv"] + ".bias", (3 * D,), hh, True), (3 * D,)).reshape(
                3, H, E)
            attn["out_kernel"][i, p] = r.take(n["proj"] + ".weight", (D, D), hh).T.reshape(H, E, D)
            attn["out_bias"][i, p] = _or_zeros(r.take(n["proj"] + ".bias", (D,), hh, True), (D,))
            mlp["norm_scale"][i, p] = r.take(n["mlp_norm"] + ".weight", (D,), dh)
            mlp["norm_bias"][i, p] = r.take(n["mlp_norm"] + ".bias", (D,), dh)
            mlp["fc1_kernel"][i, :, p] = r.take(n["fc1"] + ".weight", (M, D), mh).T
            mlp["fc1_bias"][i, p] = _or_zeros(r.take(n["fc1"] + ".bias", (M,), mh, True), (M,))
            mlp["fc2_kernel"][i, p] = r.take(n["fc2"] + ".weight", (D, M), mh).T
            mlp["fc2_bias"][i, p] = _or_zeros(r.take(n["fc2"] + ".bias", (D,), mh, True), (D,))
            for key, tree in ((n["attn_ls"], attn), (n["mlp_ls"], mlp)):
                if r.has(key) and not a.ls:
                    raise ConfigError(f"{where} has LayerScale ({key}) but the model has none: set "
                                      f"model.layer_scale_init (any value > 0; the file's gammas replace it)")
                if a.ls:
                    g = r.take(key, (D,), dh, optional=True)
                    if g is not None:
                        tree["layer_scale"][i, p] = g
    params["layers"] = {"attn": attn, "mlp": mlp}
    params["norm"] = {"scale": r.take("norm.weight", (D,), dh), "bias": r.take("norm.bias", (D,), dh)}
    if a.classes > 0:
        params["head"] = {"kernel": r.take("head.weight", (a.classes, D), f"num_classes={a.classes}, {dh}").T,
                          "bias": r.take("head.bias", (a.classes,), f"num_classes={a.classes}")}
    else:
        r.used.update(k for k in sd if k.startswith("head."))
    r.leftover()

    params = _as_f32(params)
    variables = {"params": params}
    if stats:
        variables["batch_stats"] = _as_f32(stats)
    _check_against(variables, a.template(), "the converted variables")
    return variables


def _or_zeros(x: Optional[np.ndarray], shape: tuple) -> np.ndarray:
    return np.zeros(shape, np.float32) if x is None else x


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _as_f32(tree):
    if isinstance(tree, Mapping):
        return {k: _as_f32(v) for k, v in tree.items()}
    return np.ascontiguousarray(np.asarray(tree, np.float32))


def _flat(tree, prefix=()) -> dict:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def _check_against(variables: Mapping, template: Mapping, what: str, skip: Sequence[str] = ()) -> None:
    """`variables` has exactly the leaves and shapes of `template` (the model's): else a ConfigError."""
    have = {k: tuple(np.shape(v)) for k, v in _flat(variables).items() if k[-1] not in skip}
    want = {k: tuple(v) for k, v in _flat(template).items()}
    for k in sorted(set(want) | set(have)):
        if have.get(k) != want.get(k):
            name = "/".join(k)
            raise ConfigError(f"{what}: {name} has shape {have.get(k)} but the model expects {want.get(k)} "
                              f"(None = missing): the variables belong to another model config")


# ------------------------------------------------------------------------------------------ sslvit -> timm
def variables_to_timm(variables: Mapping, model) -> dict[str, np.ndarray]:
    """timm's state dict (numpy, float32; BatchNorm `num_batches_tracked` int64) of `model`'s variables
    ({'params', 'batch_stats'}; a bare parameter tree is accepted for models without BatchNorm). It loads into
    `VisionTransformer(**timm_kwargs(model), block_fn=..., embed_layer=...)` (see `timm_snippet`)."""
    a = _Arch(model, export=True)
    variables = dict(variables)
    if "params" not in variables:
        variables = {"params": variables}
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    template = a.template()
    _check_against(variables, {k: v for k, v in template.items() if k in ("params", "batch_stats")},
                   "variables_to_timm", skip=IGNORED)
    prm = _as_f32({k: v for k, v in variables["params"].items() if k not in IGNORED})
    stats = _as_f32(variables.get("batch_stats") or {})
    D, P = a.D, a.P
    out: dict[str, np.ndarray] = {}

    if a.stem == "linear":
        out["patch_embed.proj.weight"] = prm["stem"]["proj"]["kernel"].transpose(3, 2, 0, 1)
        out["patch_embed.proj.bias"] = prm["stem"]["proj"]["bias"]
    else:
        for i in range(len(_hmlp_widths(a))):
            conv, bn = f"patch_embed.proj.{3 * i}.", f"patch_embed.proj.{3 * i + 1}."
            out[conv + "weight"] = prm["stem"][f"conv{i}"]["kernel"].transpose(3, 2, 0, 1)
            out[conv + "bias"] = prm["stem"][f"conv{i}"]["bias"]
            out[bn + "weight"] = prm["stem"][f"norm{i}"]["scale"]
            out[bn + "bias"] = prm["stem"][f"norm{i}"]["bias"]
            out[bn + "running_mean"] = stats["stem"][f"norm{i}"]["mean"]
            out[bn + "running_var"] = stats["stem"][f"norm{i}"]["var"]
            out[bn + "num_batches_tracked"] = np.zeros((), np.int64)

    out["cls_token"] = prm["cls_token"]
    if model.pos_embedding == "learned":
        pos = prm["pos_embedding"]
    else:  # the fixed table, as timm's (learnable) parameter: the same function
        from sslvit.models.vit import sincos_pos_embedding  # noqa: PLC0415

        pos = sincos_pos_embedding(a.grid, D)
    out["pos_embed"] = np.concatenate([np.zeros((1, 1, D), np.float32), pos], axis=1)  # a zero class-token slot

    at, ml = prm["layers"]["attn"], prm["layers"]["mlp"]
    parallel = P > 1
    for i in range(a.depth):
        for p in range(P):
            n = _block_names(i, p, parallel)
            out[n["attn_norm"] + ".weight"] = at["norm_scale"][i, p]
            out[n["attn_norm"] + ".bias"] = at["norm_bias"][i, p]
            out[n["qkv"] + ".weight"] = at["qkv_kernel"][i, :, p].reshape(D, 3 * D).T
            out[n["qkv"] + ".bias"] = at["qkv_bias"][i, p].reshape(3 * D)
            out[n["proj"] + ".weight"] = at["out_kernel"][i, p].reshape(D, D).T
            out[n["proj"] + ".bias"] = at["out_bias"][i, p]
            out[n["mlp_norm"] + ".weight"] = ml["norm_scale"][i, p]
            out[n["mlp_norm"] + ".bias"] = ml["norm_bias"][i, p]
            out[n["fc1"] + ".weight"] = ml["fc1_kernel"][i, :, p].T
            out[n["fc1"] + ".bias"] = ml["fc1_bias"][i, p]
            out[n["fc2"] + ".weight"] = ml["fc2_kernel"][i, p].T
            out[n["fc2"] + ".bias"] = ml["fc2_bias"][i, p]
            if a.ls:
                out[n["attn_ls"]] = at["layer_scale"][i, p]
                out[n["mlp_ls"]] = ml["layer_scale"][i, p]
    out["norm.weight"] = prm["norm"]["scale"]
    out["norm.bias"] = prm["norm"]["bias"]
    if a.classes > 0:
        out["head.weight"] = prm["head"]["kernel"].T
        out["head.bias"] = prm["head"]["bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def timm_kwargs(model) -> dict:
    """Keyword arguments of timm's `VisionTransformer` for the same model (JSON-able; without `block_fn` and
    `embed_layer`, which `timm_snippet` adds: `ParallelThingsBlock` for P > 1, DeiT's hMLP stem for stem=hmlp)."""
    a = _Arch(model, export=True)
    h, w = a.grid[0] * a.p, a.grid[1] * a.p
    kw = {"img_size": h if h == w else [h, w], "patch_size": a.p, "in_chans": a.C, "num_classes": a.classes,
          "global_pool": "token" if model.pool == "cls" else "avg", "embed_dim": a.D, "depth": a.depth,
          "num_heads": a.H, "mlp_ratio": _mlp_ratio(a.D, a.M), "qkv_bias": True}
    if model.pool != "cls":
        kw["fc_norm"] = False  # sslvit's mean pooling: final norm, then the mean
    if a.ls:
        kw["init_values"] = float(model.layer_scale_init)
    return kw


def _mlp_ratio(dim: int, mlp_dim: int) -> float:
    """timm's `mlp_ratio` for `mlp_dim` hidden units: timm builds int(dim * mlp_ratio), and mlp_dim / dim can land a
    rounding error below (28 * (61 / 28) = 60.99...); (mlp_dim + 0.5) / dim then gives mlp_dim for sure."""
    ratio = mlp_dim / dim
    return ratio if int(dim * ratio) == mlp_dim else (mlp_dim + 0.5) / dim


def timm_snippet(model, path: str | os.PathLike) -> str:
    """Python lines that build the timm model of `model` and load the exported file at `path` (paste and run)."""
    a = _Arch(model, export=True)
    kw = timm_kwargs(model)
    args = [f"{k}={v!r}" for k, v in kw.items()]
    imports = ["import torch", "from safetensors.torch import load_file",
               "from timm.models.vision_transformer import VisionTransformer"]
    head = []
    if a.P > 1:
        imports = ["from functools import partial", ""] + imports[:2] + [
            "from timm.models.vision_transformer import ParallelThingsBlock, VisionTransformer"]
        args.append(f"block_fn=partial(ParallelThingsBlock, num_parallel={a.P})")
    if a.stem == "hmlp":
        args.append("embed_layer=HMLPStem")
        kernels = hmlp_factors(a.p)
        head = [
            "",
            "",
            "class HMLPStem(torch.nn.Module):",
            f'    """DeiT\'s hMLP_stem layout (Conv2d, BatchNorm2d, GELU, ...; no final GELU), kernels {kernels}."""',
            "",
            "    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, **_):",
            "        super().__init__()",
            "        size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)",
            "        self.grid_size = (size[0] // patch_size, size[1] // patch_size)",
            "        self.num_patches = self.grid_size[0] * self.grid_size[1]",
            f"        kernels, layers, width = {kernels}, [], in_chans",
            "        for i, k in enumerate(kernels):",
            "            out = embed_dim if i == len(kernels) - 1 else embed_dim // 4",
            "            layers += [torch.nn.Conv2d(width, out, k, k), torch.nn.BatchNorm2d(out)]",
            "            layers += [torch.nn.GELU()] if i < len(kernels) - 1 else []",
            "            width = out",
            "        self.proj = torch.nn.Sequential(*layers)",
            "",
            "    def forward(self, x):",
            "        return self.proj(x).flatten(2).transpose(1, 2)",
        ]
    lines = imports + head + ["", ""] + _wrap("model = VisionTransformer(", args, ")")
    size = kw["img_size"] if isinstance(kw["img_size"], list) else [kw["img_size"]] * 2
    lines += [f"model.load_state_dict(load_file({os.fspath(path)!r}))",
              "model.eval()  # inference: no dropout" + (", BatchNorm running statistics" if a.stem == "hmlp" else ""),
              f"x = torch.randn(2, {a.C}, {size[0]}, {size[1]})  # NCHW",
              f"out = model(x)  # {'logits' if a.classes else 'pooled features'}: (2, {a.classes or a.D})"]
    return "\n".join(lines) + "\n"


def _wrap(opening: str, args: list[str], closing: str, width: int = 110) -> list[str]:
    lines, line = [opening], "    "
    for i, arg in enumerate(args):
        piece = arg + ("," if i < len(args) - 1 else "")
        if len(line) + len(piece) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = "    "
        line += piece + " "
    lines.append(line.rstrip() + closing)
    return lines


# ------------------------------------------------------------------------------------------ the stages' side
def load_init(path: str | os.PathLike, encoder: Optional[Mapping], *, image_size: Any = None,
              antialias: bool = False):
    """An external checkpoint (`init=<file>`) as the `TrainedEncoder` the fine-tune and probe stages start from.

    `encoder` (the `model` and `stem` groups: `{"model": ..., "stem": ...}`, sslvit/models/build.py) says which
    architecture the file holds; `image_size` (default: the config's) is where the position embeddings are resized
    to (`resize_pos_embedding_timm`, `antialias` as there)."""
    from sslvit.models import build_vit  # noqa: PLC0415
    from sslvit.pretrained import TrainedEncoder  # noqa: PLC0415

    if not encoder:
        raise ConfigError("init=<file> needs the model and stem groups to describe the file's architecture: pass "
                          "model=<preset> stem=<stem> (and model.* options)")
    where = os.fspath(path)
    sd = canonical_keys(load_state_dict(path))
    head = sd.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 0
    enc = {"model": dict(encoder["model"]), "stem": dict(encoder["stem"])}
    if image_size is not None:
        enc["model"]["image_size"] = image_size
    model = build_vit(enc, num_classes=num_classes)
    variables = timm_to_variables(sd, model, antialias=antialias, where=where)
    return TrainedEncoder(run_dir=Path(where).absolute(), step=0, encoder=enc, params=variables["params"],
                          batch_stats=variables.get("batch_stats", {}),
                          meta={"stage": "import", "source": where, "encoder": enc, "num_classes": num_classes})


def export_run(run: str | os.PathLike, out: Optional[str | os.PathLike] = None, step: Optional[int] = None,
               head: bool = True) -> tuple[Path, dict, str]:
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
    meta = {"format": "pt", "source": f"sslvit {trained.stage} run {trained.run_dir} step {trained.step}",
            "sslvit_encoder": json.dumps(trained.encoder), "timm_kwargs": json.dumps(kwargs),
            "block": f"ParallelThingsBlock(num_parallel={model.num_parallel_branches})"
            if model.num_parallel_branches > 1 else "Block",
            "stem": "hMLP_stem (DeiT layout)" if model.stem == "hmlp" else "PatchEmbed"}
    path = save_safetensors(tensors, target, meta)
    return path, kwargs, timm_snippet(model, path)
