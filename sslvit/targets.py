"""Pretraining targets: what the head predicts at masked patches.

A target turns images into per-patch targets on device (`compute`), scores the head's predictions at
masked positions only (`loss`) and, if it needs one, fits a tokenizer on host before training (`fit`).

- `kmeans`: per-patch-normalised pixel patches quantised by a k-means codebook fitted on training
  patches; the head classifies the code (cross-entropy), like BEiT's dVAE tokens but tokenizer-cheap.
- `pixel`: MAE-style regression of (per-patch normalised) pixels, MSE.

A new target (e.g. a dVAE tokenizer) is one `Target` subclass plus one line in `TARGETS`. A target's
`state` is a pytree of arrays (nested dicts allowed), so `save`/`load` and jit work unchanged.

Patch convention (shared with the model stems): `patchify` uses
'b (h p1) (w p2) c -> b (h w) (p1 p2 c)', i.e. a row-major patch grid and, inside a patch, row-major
pixels with channels last. Targets are computed from the same normalised images the model sees.
"""

from __future__ import annotations

import abc
import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import einops
import jax
import jax.numpy as jnp
import numpy as np

from sslvit.errors import ConfigError

logger = logging.getLogger(__name__)

State = dict[str, Any]  # pytree of arrays
Array = Any  # np.ndarray | jax.Array

TOKENIZER_FILENAME = "tokenizer.npz"
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes in distances: fit and compute must agree


# ----------------------------------------------------------------------------------------------
# Patches
# ----------------------------------------------------------------------------------------------


def patchify(images: Array, patch_size: int) -> Array:
    """(B, H, W, C) -> (B, N, p*p*C), row-major patch grid, pixels (p1 p2 c) inside a patch.

    Works on numpy and jax arrays (returns the same kind).
    """
    if images.ndim != 4:
        raise ValueError(f"patchify expects NHWC images, got shape {tuple(images.shape)}")
    _, h, w, _ = images.shape
    if h % patch_size or w % patch_size:
        raise ConfigError(
            f"patch_size={patch_size}: image size {h}x{w} is not divisible by it; "
            f"choose a patch_size dividing both sides (or resize the images)"
        )
    return einops.rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(patches: Array, patch_size: int, grid_hw: tuple[int, int], channels: int) -> Array:
    """Inverse of `patchify`: (B, N, p*p*C) -> (B, gh*p, gw*p, C)."""
    gh, gw = grid_hw
    return einops.rearrange(
        patches, "b (h w) (p1 p2 c) -> b (h p1) (w p2) c", h=gh, w=gw, p1=patch_size, p2=patch_size, c=channels
    )


def normalize_patches(patches: Array, eps: float = 1e-6) -> Array:
    """Per-patch (last axis) normalisation as in MAE's `norm_pix_loss`: (x - mean) / sqrt(var + eps).

    Uses the population variance (MAE uses torch's unbiased one; the difference is a constant
    factor sqrt(D/(D-1)) that only matters for bit-matching MAE). Numpy in, numpy out; jax in, jax out.
    """
    xp = np if isinstance(patches, np.ndarray) else jnp
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True)
    return (patches - mean) / xp.sqrt(var + eps)


# ----------------------------------------------------------------------------------------------
# k-means (JAX, jitted, memory-bounded)
# ----------------------------------------------------------------------------------------------


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


def _kmeans_impl(x: jax.Array, init: jax.Array | None, key: jax.Array, k: int, iters: int, chunk: int,
                 plusplus: bool):
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


def kmeans(x: Array, k: int, *, iters: int = 20, seed: int = 0, chunk_size: int | None = None,
           init_codebook: Array | None = None) -> State:
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
    centers, counts, inertia = _kmeans_jit(x, init_codebook, jax.random.key(seed), k=k, iters=iters, chunk=chunk,
                                           plusplus=k <= MAX_PLUSPLUS_K)
    return {"codebook": centers, "counts": counts, "inertia": inertia}


# ----------------------------------------------------------------------------------------------
# Target interface
# ----------------------------------------------------------------------------------------------


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of values (B, N) over positions where mask (B, N) is True; 0 if nothing is masked."""
    m = mask.astype(jnp.float32)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


def _check_int(name: str, value: Any, lo: int, hi: int | None = None, fix: str = "") -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and value >= lo and (hi is None or value <= hi):
        return int(value)
    allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
    raise ConfigError(f"{name}={value!r} is invalid: must be {allowed}{'; ' + fix if fix else ''}")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if "/" in key:
            raise ValueError(f"state key {key!r} must not contain '/'")
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> State:
    tree: State = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _images_of(batch: Any) -> np.ndarray:
    """Accepts an NHWC array or a dict batch with an 'image' entry (the data pipeline's format)."""
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ValueError(f"image batch dict has no 'image' key (keys: {sorted(batch)})")
        batch = batch["image"]
    images = np.asarray(batch, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"expected NHWC image batches, got shape {images.shape}")
    return images


class Target(abc.ABC):
    """A pretraining target. Subclasses set `name` and implement `compute` and `loss`.

    Device-side methods (`compute`, `loss`) are pure functions of their array arguments (the instance
    only holds static Python config), so `jax.jit(target.loss)` works.
    """

    name: ClassVar[str]

    def __init__(self, *, patch_size: int, channels: int = 3):
        self.patch_size = _check_int("model.patch_size", patch_size, 1)
        self.channels = _check_int("data.channels", channels, 1)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    @property
    @abc.abstractmethod
    def num_outputs(self) -> int:
        """Width of the prediction head."""

    def fit(self, images_iterator: Iterable[Any], *, rng: np.random.Generator | int,
            num_samples: int | None = None) -> State:
        """Host-side fit of the target's state (tokenizer). Default: nothing to fit."""
        del images_iterator, rng, num_samples
        return {}

    @abc.abstractmethod
    def compute(self, state: State, images: jax.Array) -> jax.Array:
        """Per-patch targets for NHWC images (on device, jittable)."""

    @abc.abstractmethod
    def loss(self, predictions: jax.Array, targets: jax.Array,
             mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, metrics) averaged over masked positions only; computed in float32."""

    def chance_accuracy(self, state: State) -> float | None:
        """Accuracy of a constant predictor, for targets that report accuracy; None otherwise."""
        del state
        return None

    def validate_state(self, state: State, source: str = "state") -> None:
        """Raise ConfigError if `state` (e.g. a loaded tokenizer) does not fit this target's config."""
        del state, source

    # --- persistence: npz of the flattened state plus metadata checked on load ---------------

    def save(self, state: State, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"__target__": np.asarray(self.name), "__patch_size__": np.asarray(self.patch_size),
                "__channels__": np.asarray(self.channels)}
        # Written aside, then renamed: a run killed mid-write must not leave a truncated tokenizer for resume.
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to other suffixes
            np.savez(f, **meta, **_flatten(jax.device_get(state)))
        os.replace(tmp, path)
        return path

    def load(self, path: str | Path) -> State:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"target.path={str(path)!r}: no such file; point it at a {TOKENIZER_FILENAME} saved by an "
                f"earlier run, or set target.path=null to fit a new tokenizer"
            )
        with np.load(path, allow_pickle=False) as data:
            flat = {k: data[k] for k in data.files}
        saved = (str(flat.pop("__target__", "?")), int(flat.pop("__patch_size__", -1)),
                 int(flat.pop("__channels__", -1)))
        if saved != (self.name, self.patch_size, self.channels):
            raise ConfigError(
                f"target.path={str(path)!r}: saved for target={saved[0]}, patch_size={saved[1]}, channels={saved[2]} "
                f"but this run uses target={self.name}, patch_size={self.patch_size}, channels={self.channels}; "
                f"match the config or set target.path=null to fit a new one"
            )
        state = _unflatten(flat)
        self.validate_state(state, source=f"target.path={str(path)!r}")
        return state


class KMeansTarget(Target):
    """k-means tokens of per-patch-normalised pixel patches; cross-entropy at masked patches.

    State: {'codebook': (K, p*p*C) float32, 'counts': (K,) int32 code frequencies on the fit samples}.
    """

    name = "kmeans"

    def __init__(self, *, patch_size: int, channels: int = 3, vocab_size: int = 512, num_samples: int = 100_000,
                 iters: int = 20, patches_per_image: int | None = None):
        super().__init__(patch_size=patch_size, channels=channels)
        self.vocab_size = _check_int("target.vocab_size", vocab_size, 2, 65536)
        self.num_samples = _check_int(
            "target.num_samples", num_samples, self.vocab_size,
            fix=f"k-means needs at least vocab_size={self.vocab_size} patches to fit")
        self.iters = _check_int("target.iters", iters, 1)
        self.patches_per_image = (
            None if patches_per_image is None else _check_int("target.patches_per_image", patches_per_image, 1)
        )

    @property
    def num_outputs(self) -> int:
        return self.vocab_size

    def sample_patches(self, images_iterator: Iterable[Any], rng: np.random.Generator, num_samples: int) -> np.ndarray:
        """Normalised patches (n, D), n <= num_samples, drawn from the iterator's images.

        Takes a few random patches per image (default N/4, at least 1) so the sample spans many images.
        Stops as soon as enough are collected, so an infinite (repeating) iterator is fine.
        """
        parts, total = [], 0
        for batch in images_iterator:
            patches = patchify(_images_of(batch), self.patch_size)
            b, n, d = patches.shape
            if d != self.patch_dim:
                raise ConfigError(
                    f"data.channels: images have {d // self.patch_size ** 2} channels but the target was built "
                    f"with channels={self.channels}; pass the dataset's channel count"
                )
            per_image = min(n, self.patches_per_image or max(1, n // 4))
            idx = np.argsort(rng.random((b, n)), axis=1)[:, :per_image]  # without replacement, per image
            picked = np.take_along_axis(patches, idx[..., None], axis=1).reshape(-1, d)
            parts.append(picked[: num_samples - total])
            total += len(parts[-1])
            if total >= num_samples:
                break
        if total < num_samples:
            logger.warning("k-means: the image iterator ended after %d of %d requested patches", total, num_samples)
        if total < self.vocab_size:
            raise ConfigError(
                f"target.num_samples: only {total} patches were available but vocab_size={self.vocab_size} "
                f"needs at least that many; use more images or a smaller target.vocab_size"
            )
        return normalize_patches(np.concatenate(parts, axis=0).astype(np.float32))

    def fit(self, images_iterator: Iterable[Any], *, rng: np.random.Generator | int,
            num_samples: int | None = None) -> State:
        rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
        num_samples = self.num_samples if num_samples is None else _check_int(
            "target.num_samples", num_samples, self.vocab_size)
        t0 = time.perf_counter()
        x = self.sample_patches(images_iterator, rng, num_samples)
        t1 = time.perf_counter()
        result = kmeans(x, self.vocab_size, iters=self.iters, seed=int(rng.integers(2**31)))
        counts = np.asarray(result["counts"])  # blocks until the fit is done
        t2 = time.perf_counter()
        state = {"codebook": np.asarray(result["codebook"]), "counts": counts}
        logger.info(
            "k-means tokenizer: K=%d, %d patches of dim %d, %d iters; sampling %.1fs, fit %.1fs; "
            "inertia %.4f, empty codes %d, chance accuracy %.4f",
            self.vocab_size, len(x), x.shape[1], self.iters, t1 - t0, t2 - t1, float(result["inertia"]),
            int((counts == 0).sum()), self.chance_accuracy(state),
        )
        return state

    def validate_state(self, state: State, source: str = "state") -> None:
        codebook = state.get("codebook")
        if codebook is None or "counts" not in state:
            raise ConfigError(f"{source}: not a k-means tokenizer (needs 'codebook' and 'counts'); "
                              f"fit a new one with target.path=null")
        if tuple(codebook.shape) != (self.vocab_size, self.patch_dim):
            raise ConfigError(
                f"{source}: codebook has shape {tuple(codebook.shape)} but target.vocab_size={self.vocab_size} and "
                f"patch dim {self.patch_dim} need ({self.vocab_size}, {self.patch_dim}); set target.vocab_size="
                f"{codebook.shape[0]} or fit a new tokenizer with target.path=null"
            )

    def compute(self, state: State, images: jax.Array) -> jax.Array:
        """int32 tokens (B, N): nearest codebook entry of each normalised patch."""
        patches = normalize_patches(patchify(jnp.asarray(images, jnp.float32), self.patch_size))
        b, n, d = patches.shape
        codebook = jnp.asarray(state["codebook"], jnp.float32)
        if codebook.shape[-1] != d:
            raise ConfigError(
                f"target: codebook patch dim {codebook.shape[-1]} != image patch dim {d} "
                f"(patch_size={self.patch_size}); refit the tokenizer for this patch size/channels"
            )
        return nearest_code(patches.reshape(b * n, d), codebook).reshape(b, n)

    def loss(self, predictions, targets, mask):
        if predictions.shape[-1] != self.vocab_size:
            raise ValueError(f"predictions have width {predictions.shape[-1]}, expected vocab_size={self.vocab_size}")
        logits = predictions.astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
        loss = _masked_mean(nll, mask)
        accuracy = _masked_mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32), mask)
        # Usage over all of the batch's target tokens (not only masked ones): it describes the
        # tokenizer on this data; a low value means many codes are dead weight in the head.
        used = jnp.zeros((self.vocab_size,), jnp.bool_).at[targets.reshape(-1)].set(True)
        usage = jnp.mean(used.astype(jnp.float32))
        return loss, {"accuracy": accuracy, "codebook_usage": usage}

    def chance_accuracy(self, state: State) -> float:
        counts = np.asarray(state["counts"], dtype=np.float64)
        return float(counts.max() / max(counts.sum(), 1.0))


class PixelTarget(Target):
    """MAE-style tokenizer-free target: regress (per-patch normalised) pixels, MSE at masked patches."""

    name = "pixel"

    def __init__(self, *, patch_size: int, channels: int = 3, normalize: bool = True):
        super().__init__(patch_size=patch_size, channels=channels)
        if not isinstance(normalize, (bool, np.bool_)):
            raise ConfigError(f"target.normalize={normalize!r} is invalid: must be true or false")
        self.normalize = bool(normalize)

    @property
    def num_outputs(self) -> int:
        return self.patch_dim

    def compute(self, state: State, images: jax.Array) -> jax.Array:
        del state
        patches = patchify(jnp.asarray(images, jnp.float32), self.patch_size)
        return normalize_patches(patches) if self.normalize else patches

    def loss(self, predictions, targets, mask):
        per_patch = jnp.mean((predictions.astype(jnp.float32) - targets.astype(jnp.float32)) ** 2, axis=-1)
        mse = _masked_mean(per_patch, mask)
        return mse, {"mse": mse}


TARGETS: dict[str, type[Target]] = {
    KMeansTarget.name: KMeansTarget,
    PixelTarget.name: PixelTarget,
}


def make_target(name: str, /, *, patch_size: int, **cfg_kwargs: Any) -> Target:
    """Build a target from its config, e.g. `make_target(cfg.target.name, patch_size=16, **cfg.target)`.

    `name` in cfg_kwargs is ignored (it must agree), `path` is ignored (see `fit_or_load`).
    Unknown names/options raise ConfigError before any heavy work.
    """
    if name not in TARGETS:
        raise ConfigError(f"target.name={name!r} is unknown; choose one of {sorted(TARGETS)}")
    cfg = dict(cfg_kwargs)
    cfg_name = cfg.pop("name", name)
    if cfg_name != name:
        raise ConfigError(f"target.name: make_target got {name!r} but the config says {cfg_name!r}; use one name")
    cfg.pop("path", None)
    cls = TARGETS[name]
    allowed = {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "patch_size")}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ConfigError(
            f"target.{unknown[0]}: unknown option for target {name!r}; allowed: {sorted(allowed | {'name', 'path'})}"
        )
    return cls(patch_size=patch_size, **cfg)


def fit_or_load(
    target: Target,
    cfg: Mapping[str, Any],
    images_iterator: Iterable[Any] | Callable[[], Iterable[Any]],
    seed: int | np.random.Generator,
    run_dir: str | Path | None,
) -> State:
    """Load the tokenizer at `cfg['path']` if set, else fit one; save it to `run_dir/tokenizer.npz`.

    `images_iterator` may be a zero-argument callable returning the iterator, so no data pipeline is
    built when a saved tokenizer is loaded.
    """
    path = cfg.get("path") if isinstance(cfg, Mapping) or hasattr(cfg, "get") else None
    if path:
        state = target.load(Path(str(path)).expanduser())
        logger.info("target %s: loaded state from %s", target.name, path)
    else:
        images = images_iterator() if callable(images_iterator) else images_iterator
        state = target.fit(images, rng=seed)
    if run_dir is not None:
        out = Path(run_dir) / TOKENIZER_FILENAME
        if not (path and out.exists() and out.resolve() == Path(str(path)).expanduser().resolve()):
            target.save(state, out)
            logger.info("target %s: saved state to %s", target.name, out)
    chance = target.chance_accuracy(state)
    if chance is not None:
        logger.info("target %s: chance accuracy (always the most frequent code) %.4f", target.name, chance)
    return state
