"""Pretraining targets: what the head predicts at masked patches.

A target turns images into per-patch targets on device (`compute`), scores the head's predictions at
masked positions only (`loss`) and, if it needs one, fits a tokenizer on host before training (`fit`).

- `kmeans`: per-patch-normalised pixel patches quantised by a k-means codebook fitted on training
  patches; the head classifies the code (cross-entropy), like BEiT's dVAE tokens but tokenizer-cheap.
- `pixel`: MAE-style regression of (per-patch normalised) pixels, MSE.

A new target (e.g. a dVAE tokenizer) is one `Target` subclass registered with `@TARGETS.register(name)` and one
`conf/target/<name>.yaml`; the k-means fit itself lives in sslvit/kmeans.py. A target's
`state` is a pytree of arrays (nested dicts allowed), so `save`/`load` and jit work unchanged.

Patch convention (shared with the model stems): `patchify` uses
'b (h p1) (w p2) c -> b (h w) (p1 p2 c)', i.e. a row-major patch grid and, inside a patch, row-major
pixels with channels last. Targets are computed from the same normalised images the model sees.
"""

from __future__ import annotations

import abc
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import einops
import jax
import jax.numpy as jnp
import numpy as np

from sslvit import signals
from sslvit.config.checks import Boolean, Integer
from sslvit.errors import ConfigError
from sslvit.kmeans import kmeans, nearest_code
from sslvit.registry import Registry
from sslvit.rundir import TOKENIZER_FILE

logger = logging.getLogger(__name__)

State = dict[str, Any]  # pytree of arrays
Array = Any  # np.ndarray | jax.Array

TOKENIZER_FILENAME = TOKENIZER_FILE  # the name in a run dir (sslvit/rundir.py)


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
# Target interface
# ----------------------------------------------------------------------------------------------


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of values (B, N) over positions where mask (B, N) is True; 0 if nothing is masked."""
    m = mask.astype(jnp.float32)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


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


TARGETS: Registry = Registry("target", "target.name")


class Target(abc.ABC):
    """A pretraining target. Subclasses set `name` and implement `compute` and `loss`.

    Device-side methods (`compute`, `loss`) are pure functions of their array arguments (the instance
    only holds static Python config), so `jax.jit(target.loss)` works.
    """

    name: ClassVar[str]

    def __init__(self, *, patch_size: int, channels: int = 3):
        self.patch_size = Integer(min=1)(patch_size, "model.patch_size")
        self.channels = Integer(min=1)(channels, "data.channels")

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    @property
    @abc.abstractmethod
    def num_outputs(self) -> int:
        """Width of the prediction head."""

    @property
    def fits(self) -> bool:
        """Whether the target has a state of its own to fit on images (a codebook); else `fit` returns {}."""
        return type(self).fit is not Target.fit

    def fit(
        self, images_iterator: Iterable[Any], *, rng: np.random.Generator | int, num_samples: int | None = None
    ) -> State:
        """Host-side fit of the target's state (tokenizer). Default: nothing to fit."""
        del images_iterator, rng, num_samples
        return {}

    @abc.abstractmethod
    def compute(self, state: State, images: jax.Array) -> jax.Array:
        """Per-patch targets for NHWC images (on device, jittable)."""

    @abc.abstractmethod
    def loss(
        self, predictions: jax.Array, targets: jax.Array, mask: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
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
        meta = {
            "__target__": np.asarray(self.name),
            "__patch_size__": np.asarray(self.patch_size),
            "__channels__": np.asarray(self.channels),
        }
        # Written aside, then renamed: a run killed mid-write must not leave a truncated tokenizer for resume (and a
        # stop signal waits for the rename: no stray temporary file).
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with signals.deferred():
            with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to other suffixes
                np.savez(f, **meta, **_flatten(jax.device_get(state)))
            os.replace(tmp, path)
        return path

    def load(self, path: str | Path, key: str = "target.path") -> State:
        """The state saved at `path`, checked against this target's config. `key` names the file in messages (the
        user's `target.path`, or "the run's tokenizer" when a run resumes with its own)."""
        path = Path(path)
        what = f"{key}={str(path)!r}" if key == "target.path" else f"{key} {path}"
        if not path.is_file():
            raise ConfigError(
                f"{what}: no such file; point it at a {TOKENIZER_FILENAME} saved by an "
                f"earlier run, or set target.path=null to fit a new tokenizer"
                if key == "target.path"
                else f"{what} is missing: restore it from a copy (the run's checkpoints were trained against it)"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                flat = {k: data[k] for k in data.files}
            saved = (
                str(flat.pop("__target__", "?")),
                int(flat.pop("__patch_size__", -1)),
                int(flat.pop("__channels__", -1)),
            )
        except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as e:  # truncated, not npz
            fix = (
                "restore it from a copy (the run's checkpoints were trained against it)"
                if key != "target.path"
                else f"point target.path at a {TOKENIZER_FILENAME} saved by pretrain.py, or set target.path=null"
            )
            raise ConfigError(
                f"{what} is not a readable tokenizer file ({type(e).__name__}: {' '.join(str(e).split())[:120]}): {fix}"
            ) from e
        if saved != (self.name, self.patch_size, self.channels):
            raise ConfigError(
                f"{what}: saved for target={saved[0]}, patch_size={saved[1]}, channels={saved[2]} "
                f"but this run uses target={self.name}, patch_size={self.patch_size}, channels={self.channels}; "
                f"match the config or set target.path=null to fit a new one"
            )
        state = _unflatten(flat)
        self.validate_state(state, source=what)
        return state


@TARGETS.register("kmeans")
class KMeansTarget(Target):
    """k-means tokens of per-patch-normalised pixel patches; cross-entropy at masked patches.

    State: {'codebook': (K, p*p*C) float32, 'counts': (K,) int32 code frequencies on the fit samples}.
    """

    name = "kmeans"

    def __init__(
        self,
        *,
        patch_size: int,
        channels: int = 3,
        vocab_size: int = 512,
        num_samples: int = 100_000,
        iters: int = 20,
        patches_per_image: int | None = None,
    ):
        super().__init__(patch_size=patch_size, channels=channels)
        self.vocab_size = Integer(min=2, max=65536)(vocab_size, "target.vocab_size")
        self.num_samples = Integer(min=self.vocab_size)(
            num_samples, "target.num_samples", f"(k-means needs at least vocab_size={self.vocab_size} patches)"
        )
        self.iters = Integer(min=1)(iters, "target.iters")
        self.patches_per_image = (
            None if patches_per_image is None else Integer(min=1)(patches_per_image, "target.patches_per_image")
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
                    f"data.channels: images have {d // self.patch_size**2} channels but the target was built "
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

    def fit(
        self, images_iterator: Iterable[Any], *, rng: np.random.Generator | int, num_samples: int | None = None
    ) -> State:
        rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
        if num_samples is None:
            num_samples = self.num_samples
        else:
            num_samples = Integer(min=self.vocab_size)(num_samples, "target.num_samples")
        t0 = time.perf_counter()
        logger.info(
            "k-means tokenizer: sampling %d patches, then %d iterations of K=%d",
            num_samples,
            self.iters,
            self.vocab_size,
        )
        x = self.sample_patches(images_iterator, rng, num_samples)
        t1 = time.perf_counter()
        result = kmeans(x, self.vocab_size, iters=self.iters, seed=int(rng.integers(2**31)))
        counts = np.asarray(result["counts"])  # blocks until the fit is done
        t2 = time.perf_counter()
        state = {"codebook": np.asarray(result["codebook"]), "counts": counts}
        logger.info(
            "k-means tokenizer: K=%d, %d patches of dim %d, %d iters; sampling %.1fs, fit %.1fs; "
            "inertia %.4f, empty codes %d, chance accuracy %.4f",
            self.vocab_size,
            len(x),
            x.shape[1],
            self.iters,
            t1 - t0,
            t2 - t1,
            float(result["inertia"]),
            int((counts == 0).sum()),
            self.chance_accuracy(state),
        )
        return state

    def validate_state(self, state: State, source: str = "state") -> None:
        codebook = state.get("codebook")
        if codebook is None or "counts" not in state:
            raise ConfigError(
                f"{source}: not a k-means tokenizer (needs 'codebook' and 'counts'); "
                f"fit a new one with target.path=null"
            )
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


@TARGETS.register("pixel")
class PixelTarget(Target):
    """MAE-style tokenizer-free target: regress (per-patch normalised) pixels, MSE at masked patches."""

    name = "pixel"

    def __init__(self, *, patch_size: int, channels: int = 3, normalize: bool = True):
        super().__init__(patch_size=patch_size, channels=channels)
        self.normalize = Boolean()(normalize, "target.normalize")

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


def make_target(name: str, /, *, patch_size: int, channels: int = 3, **options: Any) -> Target:
    """Build a target from its config group, e.g. `make_target(cfg.target.name, patch_size=16, **cfg.target)`: the
    group's `name` and `path` keys are not options (`path` is for `fit_or_load`); unknown names and options raise
    one ConfigError before any heavy work."""
    return TARGETS.build(name, config=options, ignore=("name", "path"), patch_size=patch_size, channels=channels)


def fit_or_load(
    target: Target,
    cfg: Mapping[str, Any],
    images_iterator: Iterable[Any] | Callable[[], Iterable[Any]],
    seed: int | np.random.Generator,
    run_dir: str | Path | None,
    key: str = "target.path",
) -> State:
    """Load the tokenizer at `cfg['path']` if set, else fit one; save it to `run_dir/tokenizer.npz`.

    `images_iterator` may be a zero-argument callable returning the iterator, so no data pipeline is
    built when a saved tokenizer is loaded or the target fits nothing. `key` names the loaded file in messages
    (`Target.load`).
    """
    path = cfg.get("path") if isinstance(cfg, Mapping) or hasattr(cfg, "get") else None
    if path:
        state = target.load(Path(str(path)).expanduser(), key=key)
        logger.info("target %s: loaded state from %s", target.name, path)
    elif target.fits:
        images = images_iterator() if callable(images_iterator) else images_iterator
        state = target.fit(images, rng=seed)
    else:
        state = target.fit((), rng=seed)
    if run_dir is not None:
        out = Path(run_dir) / TOKENIZER_FILENAME
        if not (path and out.exists() and out.resolve() == Path(str(path)).expanduser().resolve()):
            target.save(state, out)
            logger.info("target %s: saved state to %s", target.name, out)
    chance = target.chance_accuracy(state)
    if chance is not None:
        logger.info("target %s: chance accuracy (always the most frequent code) %.4f", target.name, chance)
    return state
