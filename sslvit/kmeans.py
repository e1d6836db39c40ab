"""k-means in JAX: greedy k-means++ seeding, chunked Lloyd iterations with empty-cluster re-seeding (one jitted
program, memory bounded by a (chunk, K) distance block), and nearest-code assignment that walks large codebooks in
chunks. The k-means tokenizer target (sslvit/targets.py) fits its codebook with `kmeans` and assigns tokens on
device with `nearest_code`; both use `squared_distances`, so training-time tokens are the ones the fit produced.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from sslvit.errors import ConfigError

Array = Any  # np.ndarray | jax.Array
State = dict[str, Any]
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes in distances: fit and compute must agree


def squared_distances(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """||x||^2 - 2 x.c + ||c||^2 for x (M, D), codebook (K, D) -> (M, K), clamped at 0.

    One function for fit and `compute`, so training-time tokens are the ones the fit produced.
    """
    x_sq = jnp.sum(x * x, axis=-1, keepdims=True)
    c_sq = jnp.sum(codebook * codebook, axis=-1)
    xc = jnp.dot(x, codebook.T, precision=_HIGHEST)
    return jnp.maximum(x_sq - 2.0 * xc + c_sq, 0.0)


# Above this many (row, code) distances, `nearest_code` walks the codebook in chunks instead of building the whole
# (rows x K) matrix: ImageNet at K=8192 and 256 images per step would be 1.6 G floats (6.6 GB) at once.
NEAREST_CODE_MAX_ENTRIES = 2**26


def nearest_code(x: jax.Array, codebook: jax.Array, max_entries: int = NEAREST_CODE_MAX_ENTRIES) -> jax.Array:
    """Index of the nearest codebook row for each row of x (M, D): argmin of `squared_distances`, with at most
    ~`max_entries` distances alive at a time. Chunks run over the codebook, not the rows, so rows sharded over
    devices stay where they are; ties go to the lower index, as with one argmin."""
    m, k = x.shape[0], codebook.shape[0]
    chunk = max(1, min(k, max_entries // max(m, 1)))
    if chunk >= k:
        return jnp.argmin(squared_distances(x, codebook), axis=-1).astype(jnp.int32)
    n_chunks = -(-k // chunk)
    pad = n_chunks * chunk - k  # padded codes are +inf away, never chosen
    padded = jnp.pad(codebook, ((0, pad), (0, 0)))
    valid = jnp.arange(n_chunks * chunk) < k

    def body(carry, i):
        best_d, best_i = carry
        c = jax.lax.dynamic_slice_in_dim(padded, i * chunk, chunk)
        d = jnp.where(jax.lax.dynamic_slice_in_dim(valid, i * chunk, chunk), squared_distances(x, c), jnp.inf)
        j = jnp.argmin(d, axis=-1)
        dj = jnp.take_along_axis(d, j[:, None], axis=-1)[:, 0]
        better = dj < best_d  # strict: an earlier chunk keeps a tie
        return (jnp.where(better, dj, best_d), jnp.where(better, j + i * chunk, best_i)), None

    init = (jnp.full((m,), jnp.inf, jnp.float32), jnp.zeros((m,), jnp.int32))
    (_, best), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    return best.astype(jnp.int32)


def _kmeans_plusplus(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """Greedy k-means++ seeding (as in scikit-learn): each step draws 2 + ln(k) candidates by D^2
    sampling and keeps the one that lowers the potential most; plain k-means++ often puts two
    centres in one cluster, which Lloyd iterations cannot undo. O(k * trials * n * D) work,
    O(n * trials) memory.
    """
    n, d = x.shape
    trials = 2 + int(math.log(k))
    key_first, key_rest = jax.random.split(key)
    first = x[jax.random.randint(key_first, (), 0, n)]
    centers = jnp.zeros((k, d), x.dtype).at[0].set(first)
    d2 = squared_distances(x, first[None])[:, 0]

    def body(i, carry):
        centers, d2 = carry
        cum = jnp.cumsum(d2)
        u = jax.random.uniform(jax.random.fold_in(key_rest, i), (trials,)) * cum[-1]
        # side='right' never picks a zero-weight point (already a centre) unless all weights are 0.
        idx = jnp.minimum(jnp.searchsorted(cum, u, side="right"), n - 1)
        candidates = x[idx]
        new_d2 = jnp.minimum(d2[:, None], squared_distances(x, candidates))  # (n, trials)
        best = jnp.argmin(jnp.sum(new_d2, axis=0))
        return centers.at[i].set(candidates[best]), new_d2[:, best]

    centers, _ = jax.lax.fori_loop(1, k, body, (centers, d2))
    return centers


def _assign_pass(xs: jax.Array, ws: jax.Array, centers: jax.Array):
    """One pass over chunked samples xs (C, chunk, D) with weights ws (C, chunk) (0 = padding).

    Returns per-cluster sums (K, D), counts (K,) int32, and per-sample min distances (C*chunk,).
    Peak memory is (chunk, K), never (n, K).
    """
    k, d = centers.shape

    def step(carry, inp):
        sums, counts = carry
        xc, wc = inp
        dist = squared_distances(xc, centers)
        a = jnp.argmin(dist, axis=-1)
        dmin = jnp.min(dist, axis=-1)
        onehot = jax.nn.one_hot(a, k, dtype=xc.dtype) * wc[:, None]
        # A matmul instead of a scatter-add: deterministic on GPU, and fast everywhere.
        sums = sums + jnp.dot(onehot.T, xc, precision=_HIGHEST)
        counts = counts + jnp.sum(onehot, axis=0).astype(jnp.int32)  # exact: chunk < 2^24
        return (sums, counts), dmin

    init = (jnp.zeros((k, d), xs.dtype), jnp.zeros((k,), jnp.int32))
    (sums, counts), dmin = jax.lax.scan(step, init, (xs, ws))
    return sums, counts, dmin.reshape(-1)


def _random_init(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """k distinct samples drawn uniformly: O(n) seeding for vocabularies too big for k-means++."""
    return x[jax.random.choice(key, x.shape[0], (k,), replace=False)]


def _kmeans_impl(x: jax.Array, init: jax.Array | None, key: jax.Array, k: int, iters: int, chunk: int, plusplus: bool):
    n, d = x.shape
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    w = jnp.concatenate([jnp.ones((n,), x.dtype), jnp.zeros((pad,), x.dtype)])
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(num_chunks, chunk, d)
    ws = w.reshape(num_chunks, chunk)

    def lloyd(_, centers):
        sums, counts, dmin = _assign_pass(xs, ws, centers)
        empty = counts == 0
        new = sums / jnp.maximum(counts, 1)[:, None].astype(x.dtype)
        # Empty clusters are re-seeded at the samples worst served by the current codebook: the
        # r-th empty cluster takes the r-th farthest sample, so several empties get distinct points.
        far = jnp.where(w > 0, dmin, -jnp.inf)
        _, far_idx = jax.lax.top_k(far, k)
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
        seeds = xs.reshape(-1, d)[far_idx[rank]]
        return jnp.where(empty[:, None], seeds, new)

    if init is not None:
        centers = init
    else:
        centers = _kmeans_plusplus(x, k, key) if plusplus else _random_init(x, k, key)
    centers = jax.lax.fori_loop(0, iters, lloyd, centers)
    _, counts, dmin = _assign_pass(xs, ws, centers)
    inertia = jnp.sum(dmin * w) / n
    return centers, counts, inertia


_kmeans_jit = jax.jit(_kmeans_impl, static_argnames=("k", "iters", "chunk", "plusplus"))

# k-means++ takes k sequential steps over all samples; beyond this many codes it would dominate the
# fit (hours on CPU for k=65536), so larger vocabularies start from random samples instead.
MAX_PLUSPLUS_K = 4096


def _default_chunk(n: int, k: int, max_elems: int = 1 << 22) -> int:
    """Samples per chunk so a (chunk, K) float32 distance block stays around 16 MiB."""
    return int(max(1, min(n, max(256, max_elems // k))))


def kmeans(
    x: Array,
    k: int,
    *,
    iters: int = 20,
    seed: int = 0,
    chunk_size: int | None = None,
    init_codebook: Array | None = None,
) -> State:
    """Fit k-means to x (n, D): greedy k-means++ seeding (random distinct samples when
    k > MAX_PLUSPLUS_K; or `init_codebook` (k, D), e.g. to warm start), then `iters` Lloyd
    iterations with empty-cluster re-seeding, all in one jitted program.

    Deterministic given `seed` (and the device). Returns {'codebook': (k, D) float32,
    'counts': (k,) int32 assignments of x to the final codebook, 'inertia': () mean sq. distance}.
    """
    x = jnp.asarray(x, jnp.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ConfigError(f"k-means: k={k} clusters need at least k samples, got {n}; use more samples or a smaller k")
    if init_codebook is not None:
        init_codebook = jnp.asarray(init_codebook, jnp.float32)
        if init_codebook.shape != (k, d):
            raise ValueError(f"init_codebook has shape {init_codebook.shape}, expected {(k, d)}")
    chunk = chunk_size or _default_chunk(n, k)
    centers, counts, inertia = _kmeans_jit(
        x, init_codebook, jax.random.key(seed), k=k, iters=iters, chunk=chunk, plusplus=k <= MAX_PLUSPLUS_K
    )
    return {"codebook": centers, "counts": counts, "inertia": inertia}
