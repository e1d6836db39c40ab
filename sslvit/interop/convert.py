"""timm / DeiT state dicts <-> sslvit variables (the mapping is described in sslvit/interop/__init__.py)."""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from sslvit.errors import ConfigError
from sslvit.interop.resize import resize_pos_embedding_timm
from sslvit.models.stems import hmlp_factors

# Keys of timm / DeiT checkpoints with no sslvit counterpart, and why (matched as regular expressions).
UNMAPPABLE = (
    (
        r"^fc_norm\.",
        "fc_norm (LayerNorm after average pooling, timm's default for global_pool='avg') is another model "
        "than sslvit's pool=mean, which normalises the tokens before pooling (timm fc_norm=False)",
    ),
    (r"^(dist_token|head_dist\.)", "a distilled DeiT's distillation token and head have no sslvit counterpart"),
    (r"^reg_token", "register tokens have no sslvit counterpart"),
    (r"^norm_pre\.", "a LayerNorm before the blocks (timm pre_norm, CLIP-style) has no sslvit counterpart"),
    (r"\.(q_norm|k_norm)\.", "qk-norm (timm qk_norm=True) has no sslvit counterpart"),
    (
        r"\.attn\.norm\.|\.mlp\.norm\.",
        "norms inside attention / MLP (timm scale_attn_norm / scale_mlp_norm) have no sslvit counterpart",
    ),
    (r"^attn_pool\.", "attention pooling (timm global_pool='map') has no sslvit counterpart"),
    (r"^patch_embed\.norm\.", "a norm after the patch embedding has no sslvit counterpart"),
)
IGNORED = ("mask_token",)  # pretext-only leaves of MIM checkpoints (the stages drop sslvit's own too)

# DeiT's models_v2.py names inside blocks.<i>. -> timm's: LayerScale blocks, and the two-branch blocks of the
# 3-things paper (Layer_scale_init_Block_paralx2 / Block_paralx2).
_DEIT_BLOCK = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}
_DEIT_PARALX2 = {
    "norm1": "attns.0.norm",
    "norm11": "attns.1.norm",
    "attn": "attns.0.attn",
    "attn1": "attns.1.attn",
    "gamma_1": "attns.0.ls.gamma",
    "gamma_1_1": "attns.1.ls.gamma",
    "norm2": "ffns.0.norm",
    "norm21": "ffns.1.norm",
    "mlp": "ffns.0.mlp",
    "mlp1": "ffns.1.mlp",
    "gamma_2": "ffns.0.ls.gamma",
    "gamma_2_1": "ffns.1.ls.gamma",
}


class _Arch:
    """The numbers of a built `ViT` that fix its timm layout, after checking that timm has that model."""

    def __init__(self, model, *, export: bool):
        self.model = model
        self.D, self.depth, self.H, self.P = (
            int(model.dim),
            int(model.depth),
            int(model.heads),
            int(model.num_parallel_branches),
        )
        self.E = int(model.dim_head or model.dim // model.heads)
        self.M, self.C, self.p = int(model.mlp_dim), int(model.channels), int(model.patch_size)
        self.grid = tuple(int(g) for g in model.grid_size)
        self.N = self.grid[0] * self.grid[1]
        self.classes = int(model.num_classes)
        self.ls = model.layer_scale_init is not None
        self.stem = model.stem
        if model.stem == "conv":
            raise ConfigError(
                "stem=conv (overlapping 3x3 convolutions) has no timm or DeiT counterpart: timm and DeiT "
                "have the linear patch embedding (stem=linear) and DeiT's hMLP stem (stem=hmlp)"
            )
        if model.stem == "hmlp" and model.stem_norm != "batch":
            raise ConfigError(
                f"stem.norm={model.stem_norm}: DeiT's hMLP stem uses BatchNorm; an hMLP stem with "
                f"LayerNorm has no timm or DeiT counterpart (use stem.norm=batch)"
            )
        if self.H * self.E != self.D:
            raise ConfigError(
                f"model.dim_head={model.dim_head} with heads={self.H} gives an attention width of "
                f"{self.H * self.E}, not dim={self.D}: timm's attention has head_dim = dim // heads "
                f"(set model.dim_head=null)"
            )
        if not export:
            if model.use_mask_token:
                raise ConfigError(
                    "use_mask_token=True: timm's ViT has no mask token to import (build the model "
                    "without it; the stages do)"
                )
            if model.pos_embedding != "learned":
                raise ConfigError(
                    f"model.pos_embedding={model.pos_embedding}: the file's learned position "
                    f"embeddings have nowhere to go in a fixed sin-cos model; use "
                    f"model.pos_embedding=learned"
                )

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
        return {
            "attn_norm": a + "norm",
            "qkv": a + "attn.qkv",
            "proj": a + "attn.proj",
            "attn_ls": a + "ls.gamma",
            "mlp_norm": f + "norm",
            "fc1": f + "mlp.fc1",
            "fc2": f + "mlp.fc2",
            "mlp_ls": f + "ls.gamma",
        }
    b = f"blocks.{i}."
    return {
        "attn_norm": b + "norm1",
        "qkv": b + "attn.qkv",
        "proj": b + "attn.proj",
        "attn_ls": b + "ls1.gamma",
        "mlp_norm": b + "norm2",
        "fc1": b + "mlp.fc1",
        "fc2": b + "mlp.fc2",
        "mlp_ls": b + "ls2.gamma",
    }


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
        sd = {k[len("module.") :]: v for k, v in sd.items()}
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
            raise ConfigError(
                f"{self.where} has no {key} (the model expects one of shape {tuple(shape)}): it is not a {self.desc}"
            )
        v = self.sd[key]
        self.used.add(key)
        if tuple(v.shape) != tuple(shape):
            raise ConfigError(
                f"{key} has shape {tuple(v.shape)} in {self.where} but the model expects "
                f"{tuple(shape)} ({hint}): set the model options to the file's architecture"
            )
        return v

    def leftover(self) -> None:
        rest = sorted(
            k for k in self.sd if k not in self.used and k not in IGNORED and not k.endswith("num_batches_tracked")
        )
        for key in rest:
            for pattern, why in UNMAPPABLE:
                if re.search(pattern, key):
                    raise ConfigError(f"{self.where} has {key}: {why}")
        if rest:
            raise ConfigError(
                f"{self.where} has {len(rest)} keys with no place in the model "
                f"({', '.join(rest[:3])}{', ...' if len(rest) > 3 else ''}): it is not a {self.desc}"
            )


def timm_to_variables(
    state_dict: Mapping[str, Any], model, *, antialias: bool = False, where: str = "the state dict"
) -> dict:
    """sslvit variables ({'params', 'batch_stats'}) of the built `ViT` `model` from a timm or DeiT state dict.

    The model's options must describe the file's architecture (else a one-line ConfigError names the key and both
    shapes); the position embeddings are resized to the model's grid when the file's grid differs
    (`resize_pos_embedding_timm`, `antialias` as there). A headless model (num_classes=0) ignores the file's head;
    a model with LayerScale takes gamma = 1 from a file without (the same function)."""
    a = _Arch(model, export=False)
    sd = canonical_keys(state_dict)
    desc = (
        f"ViT with dim={a.D}, depth={a.depth}, heads={a.H}, mlp_dim={a.M}, {a.P} branch(es), patch {a.p}, stem={a.stem}"
    )
    r = _Reader(sd, where, desc)
    D, P, H, E, M = a.D, a.P, a.H, a.E, a.M
    f32 = np.float32

    for k in list(sd):
        for pattern, why in UNMAPPABLE:
            if re.search(pattern, k):
                raise ConfigError(f"{where} has {k}: {why}")
    if not r.has("cls_token"):
        raise ConfigError(
            f"{where} has no cls_token: a ViT without a class token (timm class_token=False) has no sslvit counterpart"
        )
    if not r.has("pos_embed"):
        raise ConfigError(
            f"{where} has no pos_embed: a ViT without learned position embeddings has no sslvit counterpart"
        )

    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    # Patch embedding.
    if a.stem == "linear":
        if r.has("patch_embed.proj.0.weight"):
            raise ConfigError(
                f"{where} has a stack of convolutions as patch embedding (patch_embed.proj.0.weight: "
                f"DeiT's hMLP stem) but the model has stem=linear: pass stem=hmlp"
            )
        w = r.take("patch_embed.proj.weight", (D, a.C, a.p, a.p), f"dim={D}, channels={a.C}, patch_size={a.p}")
        b = r.take("patch_embed.proj.bias", (D,), f"dim={D}", optional=True)
        params["stem"] = {"proj": {"kernel": w.transpose(2, 3, 1, 0), "bias": _or_zeros(b, (D,))}}
    else:
        if r.has("patch_embed.proj.weight"):
            raise ConfigError(
                f"{where} has one linear patch projection (patch_embed.proj.weight) but the model has "
                f"stem=hmlp: pass stem=linear"
            )
        params["stem"], stats["stem"] = {}, {}
        for i, (k, cin, cout) in enumerate(_hmlp_widths(a)):
            conv, bn = f"patch_embed.proj.{3 * i}.", f"patch_embed.proj.{3 * i + 1}."
            hint = f"hMLP stage {i} of patch_size={a.p} ({'·'.join(map(str, hmlp_factors(a.p)))}), dim={D}"
            w = r.take(conv + "weight", (cout, cin, k, k), hint)
            b = r.take(conv + "bias", (cout,), hint, optional=True)
            params["stem"][f"conv{i}"] = {"kernel": w.transpose(2, 3, 1, 0), "bias": _or_zeros(b, (cout,))}
            params["stem"][f"norm{i}"] = {
                "scale": r.take(bn + "weight", (cout,), hint),
                "bias": r.take(bn + "bias", (cout,), hint),
            }
            stats["stem"][f"norm{i}"] = {
                "mean": r.take(bn + "running_mean", (cout,), hint),
                "var": r.take(bn + "running_var", (cout,), hint),
            }

    # Class token and position embeddings (the class token's slot folded in; resized to the model's grid).
    cls = r.take("cls_token", (1, 1, D), f"dim={D}")
    pos = sd["pos_embed"]
    r.used.add("pos_embed")
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != D:
        raise ConfigError(
            f"pos_embed has shape {tuple(pos.shape)} in {where} but the model expects (1, {a.N}, {D}) "
            f"or (1, {1 + a.N}, {D}) (dim={D}): set the model options to the file's architecture"
        )
    rows = pos.shape[1]
    if rows == 1 + a.N or (rows != a.N and _is_square(rows - 1)):
        cls, pos = cls + pos[:, :1], pos[:, 1:]
    elif rows != a.N and not _is_square(rows):
        raise ConfigError(
            f"pos_embed has {rows} rows in {where}: neither a square grid nor a class slot + a square "
            f"grid, and the model's grid {a.grid[0]}x{a.grid[1]} needs {a.N} or {1 + a.N}"
        )
    params["cls_token"] = cls
    params["pos_embedding"] = (
        resize_pos_embedding_timm(pos, a.grid, antialias=antialias) if pos.shape[1] != a.N else pos
    )

    # Blocks.
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if blocks != list(range(a.depth)):
        raise ConfigError(
            f"{where} has {len(blocks)} blocks (blocks.0-{max(blocks, default=-1)}) but model.depth="
            f"{a.depth}: set model.depth={len(blocks)}"
        )
    parallel = any(k.startswith("blocks.0.attns.") for k in sd)
    branches = len({k.split(".")[3] for k in sd if k.startswith("blocks.0.attns.")}) if parallel else 1
    if branches != P:
        raise ConfigError(
            f"{where} has {branches} parallel branch(es) per block "
            f"({'blocks.0.attns.*' if parallel else 'timm Block'}) but model.num_parallel_branches={P}: "
            f"set model.num_parallel_branches={branches}"
        )
    attn = {
        n: np.zeros((a.depth, *s), f32)
        for n, s in (
            ("norm_scale", (P, D)),
            ("norm_bias", (P, D)),
            ("qkv_kernel", (D, P, 3, H, E)),
            ("qkv_bias", (P, 3, H, E)),
            ("out_kernel", (P, H, E, D)),
            ("out_bias", (P, D)),
        )
    }
    mlp = {
        n: np.zeros((a.depth, *s), f32)
        for n, s in (
            ("norm_scale", (P, D)),
            ("norm_bias", (P, D)),
            ("fc1_kernel", (D, P, M)),
            ("fc1_bias", (P, M)),
            ("fc2_kernel", (P, M, D)),
            ("fc2_bias", (P, D)),
        )
    }
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
                3, H, E
            )
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
                    raise ConfigError(
                        f"{where} has LayerScale ({key}) but the model has none: set "
                        f"model.layer_scale_init (any value > 0; the file's gammas replace it)"
                    )
                if a.ls:
                    g = r.take(key, (D,), dh, optional=True)
                    if g is not None:
                        tree["layer_scale"][i, p] = g
    params["layers"] = {"attn": attn, "mlp": mlp}
    params["norm"] = {"scale": r.take("norm.weight", (D,), dh), "bias": r.take("norm.bias", (D,), dh)}
    if a.classes > 0:
        params["head"] = {
            "kernel": r.take("head.weight", (a.classes, D), f"num_classes={a.classes}, {dh}").T,
            "bias": r.take("head.bias", (a.classes,), f"num_classes={a.classes}"),
        }
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
            raise ConfigError(
                f"{what}: {name} has shape {have.get(k)} but the model expects {want.get(k)} "
                f"(None = missing): the variables belong to another model config"
            )


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
    _check_against(
        variables,
        {k: v for k, v in template.items() if k in ("params", "batch_stats")},
        "variables_to_timm",
        skip=IGNORED,
    )
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
        from sslvit.models.ops import sincos_pos_embedding  # noqa: PLC0415

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
