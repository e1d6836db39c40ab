"""Analytic FLOP counts of the parallel ViT, for model FLOPs utilisation (MFU).

XLA's cost analysis counts a `scan` body once, not once per layer, so it under-reports scanned models; these
counts are exact for the matmuls and attention (2 FLOPs per multiply-add), ignoring elementwise work, as is usual
for MFU. A training step costs 3x the forward pass (backward = 2x forward).
"""

from __future__ import annotations

from sslvit.models.stems import conv_num_layers, hmlp_factors
from sslvit.models.vit import ViT


def stem_flops(model: ViT) -> int:
    gh, gw = model.grid_size
    c, d, p = model.channels, model.dim, model.patch_size
    if model.stem == "linear":
        return 2 * gh * gw * p * p * c * d
    if model.stem == "hmlp":
        flops, cin, res = 0, c, 1  # res: sub-patch side in pixels after each stage
        factors = hmlp_factors(p)
        for i, k in enumerate(factors):
            res *= k
            cout = d if i == len(factors) - 1 else d // 4
            positions = (gh * p // res) * (gw * p // res)
            flops += 2 * positions * k * k * cin * cout
            cin = cout
        return flops
    if model.stem == "conv":
        n = conv_num_layers(p)
        flops, cin = 0, c
        for i in range(n):
            cout = d // 2 ** (n - 1 - i)
            positions = (gh * p // 2 ** (i + 1)) * (gw * p // 2 ** (i + 1))
            flops += 2 * positions * 9 * cin * cout
            cin = cout
        return flops
    raise ValueError(model.stem)


def forward_flops(model: ViT, *, head_outputs_per_patch: int = 0) -> int:
    """FLOPs of one image's forward pass: stem, every branch of every layer, and either the classification head
    (model.num_classes) or a per-patch head of `head_outputs_per_patch` outputs (pretraining)."""
    n = model.num_patches + 1
    d, m = model.dim, model.mlp_dim
    inner = model.heads * (model.dim_head or d // model.heads)
    per_branch = (
        2 * n * d * 3 * inner  # qkv
        + 2 * 2 * n * n * inner  # q·k and attention·v
        + 2 * n * inner * d  # output projection
        + 2 * 2 * n * d * m
    )  # fc1 + fc2
    flops = stem_flops(model) + model.depth * model.num_parallel_branches * per_branch
    flops += 2 * d * model.num_classes
    flops += 2 * model.num_patches * d * head_outputs_per_patch
    return flops


def train_flops(model: ViT, **kw) -> int:
    return 3 * forward_flops(model, **kw)
