"""Position-embedding resize exactly as PyTorch's bicubic `interpolate` (`align_corners=False`), in numpy: the plain
kernel (a = -0.75, clamped borders) or timm's loader default (`antialias=True`)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from sslvit.errors import ConfigError


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


def resize_pos_embedding_timm(
    posemb,
    new_grid: Sequence[int],
    old_grid: Optional[Sequence[int]] = None,
    num_extra_tokens: int = 0,
    antialias: bool = False,
) -> np.ndarray:
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
