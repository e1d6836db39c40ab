"""The numerical building blocks of the ViT (sslvit/models/vit.py), each a plain function: GELU with a lean
backward pass, the matmul that contracts several axes in memory order, the attention kernels, and position
embeddings (fixed sin-cos, and the resize that loads a model at another resolution)."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sslvit.errors import ConfigError


def pair(x) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        return int(x[0]), int(x[1])
    return int(x), int(x)


@jax.custom_vjp
def gelu(x):
    """Exact GELU x·Φ(x), the same values as `jax.nn.gelu(x, approximate=False)`.

    Why not that function: differentiated by JAX, its erfc leaves several tensors of the MLP's hidden size per layer
    for the backward pass (the erfc value, an exp and a quotient), which a scan over layers stores and zero-fills
    every step. Here the backward pass keeps only x and recomputes Φ(x) and φ(x): the same derivative (to float
    rounding), a quarter less activation memory and a ~5% faster CPU pretraining step (bench/compile_memory.py)."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    cdf = 0.5 * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))  # erf: a polynomial, cheaper than erfc
    pdf = jnp.exp(-0.5 * jnp.square(x)) * np.asarray(1.0 / np.sqrt(2.0 * np.pi), x.dtype)
    return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def contract(x, w, n: int):
    """Contract the last `n` axes of `x` with the first `n` of `w`, in memory order: one 2-D matmul.

    (`jnp.einsum` lists a multi-axis contraction in reverse order, e.g. "bnpm,pmd->bnd" as (m, p): with P > 1
    branches XLA then transposes the activations and the weights before the matmul, every call.)"""
    k, rest = int(np.prod(w.shape[:n])), w.shape[n:]
    out = x.reshape(*x.shape[:-n], k) @ w.reshape(k, int(np.prod(rest)))
    return out.reshape(*x.shape[:-n], *rest)


def cudnn_attention_applies(dtype, head_dim: int) -> bool:
    """Whether cuDNN's fused attention takes these inputs here: a CUDA GPU backend, half-precision q/k/v and a head
    dim that is a multiple of 8 and at most 128 (the limits `jax.nn.dot_product_attention` checks)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or head_dim % 8 or head_dim > 128:
        return False
    if jax.default_backend() != "gpu":
        return False
    return "cuda" in jax.devices()[0].client.platform_version.lower()


def resolve_attention(attention: str, dtype, head_dim: int) -> str:
    """The implementation `attention` means for these inputs on this backend ("auto" -> "cudnn" or "explicit")."""
    if attention == "auto":
        return "cudnn" if cudnn_attention_applies(dtype, head_dim) else "explicit"
    if attention == "cudnn" and not cudnn_attention_applies(dtype, head_dim):
        raise ConfigError(
            f"model.attention=cudnn needs a CUDA GPU, model.dtype=bfloat16 and a head dim that is a "
            f"multiple of 8 up to 128 (here {jax.default_backend()}, {jnp.dtype(dtype).name}, head dim "
            f"{head_dim}): use model.attention=auto"
        )
    return attention


def multi_head_attention(q, k, v, implementation: str):
    """Multi-head attention of (b, n, heads, e) q, k, v -> (b, n, heads, e), scale e^-0.5, softmax in float32."""
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    e = q.shape[-1]
    # Softmax in float32 (bf16 logits overflow at high resolution).
    logits = jnp.einsum("bqhe,bkhe->bhqk", q, k, preferred_element_type=jnp.float32) * (e**-0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    # probs @ v as a batched matmul in natural order, (b,h,q,k)·(b,h,k,e) -> (b,h,q,e): jnp.einsum
    # "bhqk,bkhe->bqhe" swaps the operands (vᵀ·probsᵀ, transposed output), ~2.5x slower on CPU.
    out = jax.lax.dot_general(probs, v, (((3,), (1,)), ((0, 1), (0, 2))))
    return out.transpose(0, 2, 1, 3)


def sincos_pos_embedding(grid_hw: tuple[int, int], dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE), shape (1, gh*gw, dim)."""
    gh, gw = grid_hw
    if dim % 4:
        raise ConfigError(f"dim={dim} must be divisible by 4 for pos_embedding=sincos")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    yy, xx = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    out = [f(np.outer(c.reshape(-1), omega)) for c in (yy, xx) for f in (np.sin, np.cos)]
    return np.concatenate(out, axis=1)[None].astype(np.float32)


def resize_pos_embedding(
    posemb, new_grid: Sequence[int], old_grid: Optional[Sequence[int]] = None, num_extra_tokens: int = 0
):
    """Resize learned position embeddings (1, extra + gh*gw, D) to another grid: bicubic on the 2-D grid, the
    `num_extra_tokens` leading rows (class token and the like) kept as they are. So a model trained at one
    resolution loads at another (e.g. 224 -> 384, 32 -> 48)."""
    posemb = jnp.asarray(posemb)
    extra, grid = posemb[:, :num_extra_tokens], posemb[:, num_extra_tokens:]
    n = grid.shape[1]
    if old_grid is None:
        side = int(round(np.sqrt(n)))
        if side * side != n:
            raise ConfigError(f"cannot infer a square grid from {n} position embeddings: pass old_grid")
        old_grid = (side, side)
    gh, gw = pair(tuple(old_grid))
    nh, nw = pair(tuple(new_grid))
    if gh * gw != n:
        raise ConfigError(f"old_grid {gh}x{gw} does not match {n} position embeddings")
    if (gh, gw) == (nh, nw):
        return posemb
    d = grid.shape[-1]
    grid = jax.image.resize(grid.reshape(1, gh, gw, d).astype(jnp.float32), (1, nh, nw, d), method="bicubic")
    return jnp.concatenate([extra, grid.reshape(1, nh * nw, d).astype(posemb.dtype)], axis=1)


__all__ = [
    "contract",
    "cudnn_attention_applies",
    "gelu",
    "multi_head_attention",
    "pair",
    "resize_pos_embedding",
    "resolve_attention",
    "sincos_pos_embedding",
]
