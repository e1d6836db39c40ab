"""The timm `VisionTransformer` arguments of an sslvit ViT, and the Python lines a user pastes to load an export."""

from __future__ import annotations

import os

from sslvit.interop.convert import _Arch
from sslvit.models.stems import hmlp_factors


def timm_kwargs(model) -> dict:
    """Keyword arguments of timm's `VisionTransformer` for the same model (JSON-able; without `block_fn` and
    `embed_layer`, which `timm_snippet` adds: `ParallelThingsBlock` for P > 1, DeiT's hMLP stem for stem=hmlp)."""
    a = _Arch(model, export=True)
    h, w = a.grid[0] * a.p, a.grid[1] * a.p
    kw = {
        "img_size": h if h == w else [h, w],
        "patch_size": a.p,
        "in_chans": a.C,
        "num_classes": a.classes,
        "global_pool": "token" if model.pool == "cls" else "avg",
        "embed_dim": a.D,
        "depth": a.depth,
        "num_heads": a.H,
        "mlp_ratio": _mlp_ratio(a.D, a.M),
        "qkv_bias": True,
    }
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
    imports = [
        "import torch",
        "from safetensors.torch import load_file",
        "from timm.models.vision_transformer import VisionTransformer",
    ]
    head = []
    if a.P > 1:
        imports = (
            ["from functools import partial", ""]
            + imports[:2]
            + ["from timm.models.vision_transformer import ParallelThingsBlock, VisionTransformer"]
        )
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
    lines += [
        f"model.load_state_dict(load_file({os.fspath(path)!r}))",
        "model.eval()  # inference: no dropout" + (", BatchNorm running statistics" if a.stem == "hmlp" else ""),
        f"x = torch.randn(2, {a.C}, {size[0]}, {size[1]})  # NCHW",
        f"out = model(x)  # {'logits' if a.classes else 'pooled features'}: (2, {a.classes or a.D})",
    ]
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
