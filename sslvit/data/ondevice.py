"""Image transforms in JAX for in-memory datasets, and a training split that lives on the accelerator.

The `arrays` source (sslvit/data/arrays.py) keeps a small dataset (CIFAR-10: 150 MB of uint8) in memory. For
training, `DeviceData` puts the whole split on the devices once, **replicated**: every device holds every image,
so each device gathers its own rows of a step's batch locally. Sharding the split over the data axis instead
would save memory nobody needs at this size (150 MB against 141 GB of an H200) and cost a cross-device gather of
every batch. A training batch is then only the step's example indices (int32, sharded over the data axis like any
batch); the gather, the random-resized crop, the flip and the normalisation run inside the jitted train step
(`wrap_loss`), before the stage's own loss. No host work per step besides the index permutation, no image copy.

Randomness. The example order is a permutation per epoch seeded by `(seed, epoch)`; the crop and flip are drawn
from the step's key (`fold_in(key(seed), step)`, the key `sslvit.train.make_train_step` hands the loss) folded
with `AUGMENT_STREAM`. So batch k is a function of (seed, k) alone, and a resumed run sees exactly the images of
an uninterrupted one. The host iterators of the arrays source use the same order and keys: step k of
`make_train_iterator(data=arrays)` equals what the device path computes at step k.

The resampling is two small matrix products per image (separable bilinear interpolation, `resample_matrix`):
no gathers inside the image, in float32 at full precision; on GPU it is a negligible part of a step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sslvit.data.config import ASPECT_RATIO_RANGE

AUGMENT_STREAM = 0x617567  # folded into the step's key: the augmentation's random stream ("aug")
HIGHEST = jax.lax.Precision.HIGHEST  # pixel values exact to float32 (no TF32 / bf16 passes on GPU)


# ------------------------------------------------------------------------------------------------ order and keys
def epoch_order(seed: int, epoch: int, n: int, process_index: int = 0) -> np.ndarray:
    """The example order of one epoch: a permutation of range(n) seeded by (seed, epoch, process)."""
    ss = np.random.SeedSequence([seed, epoch, process_index, 0x6F72])
    return np.random.default_rng(ss).permutation(n).astype(np.int32)


def step_key(seed: int, step: int) -> jax.Array:
    """The augmentation key of training step `step`: the train step's key, `fold_in(key(seed), step)`, folded with
    AUGMENT_STREAM (what `DeviceData.wrap_loss` derives inside the step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), AUGMENT_STREAM)


# ------------------------------------------------------------------------------------------------ transforms
def rrc_windows(
    key: jax.Array,
    batch: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float] = ASPECT_RATIO_RANGE,
    attempts: int = 10,
):
    """Random-resized-crop windows, torchvision's algorithm vectorised over a batch (as the tf.data path's
    `rrc_windows`): up to `attempts` draws of (area fraction ~ U(scale), log aspect ~ U(log ratio)), the first that
    fits wins, else the largest central crop with its aspect clipped into `ratio`. Float32 (y, x, h, w), each (B,),
    integral values."""
    k_try, k_pos = jax.random.split(key)
    u = jax.random.uniform(k_try, (batch, attempts, 2))
    area = float(height * width) * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = jnp.round(jnp.sqrt(area * aspect))
    h = jnp.round(jnp.sqrt(area / aspect))
    fits = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    first = jnp.argmax(fits, axis=1)[:, None]
    w = jnp.take_along_axis(w, first, axis=1)[:, 0]
    h = jnp.take_along_axis(h, first, axis=1)[:, 0]
    found = fits.any(axis=1)
    in_ratio = width / height
    fallback_w = float(round(height * ratio[1])) if in_ratio > ratio[1] else float(width)
    fallback_h = float(round(width / ratio[0])) if in_ratio < ratio[0] else float(height)
    w = jnp.where(found, w, fallback_w)
    h = jnp.where(found, h, fallback_h)
    pos = jax.random.uniform(k_pos, (batch, 2))
    y = jnp.where(found, jnp.floor(pos[:, 0] * (height - h + 1)), jnp.floor((height - h) / 2))
    x = jnp.where(found, jnp.floor(pos[:, 1] * (width - w + 1)), jnp.floor((width - w) / 2))
    return jnp.minimum(y, height - h), jnp.minimum(x, width - w), h, w


def resample_matrix(start: jax.Array, length: jax.Array, out_size: int, in_size: int) -> jax.Array:
    """(B, out_size, in_size) bilinear weights sampling each window [start, start + length) from its first to its
    last pixel centre (the tf.data path's `crop_and_resize` convention: every sample lies inside the image, and a
    full window at out_size == in_size is the identity)."""
    t = jnp.arange(out_size, dtype=jnp.float32) / max(out_size - 1, 1) if out_size > 1 else jnp.full((1,), 0.5)
    src = start[:, None] + (length[:, None] - 1.0) * t[None, :]  # (B, S) source coordinates
    lo = jnp.clip(jnp.floor(src), 0, in_size - 1)
    frac = src - lo
    hi = jnp.minimum(lo + 1, in_size - 1)
    grid = jnp.arange(in_size, dtype=jnp.float32)
    return (grid == lo[..., None]) * (1.0 - frac[..., None]) + (grid == hi[..., None]) * frac[..., None]


def crop_resize(images: jax.Array, y, x, h, w, image_size: int, flip=None) -> jax.Array:
    """Each (B, H, W, C) image's window (y, x, h, w) resampled to (image_size, image_size), bilinear, mirrored where
    `flip` (B,) is True; float32 in the input's value range."""
    _, height, width, _ = images.shape
    rows = resample_matrix(y, h, image_size, height)
    cols = resample_matrix(x, w, image_size, width)
    if flip is not None:  # the mirrored window samples its columns right to left
        cols = jnp.where(flip[:, None, None], cols[:, ::-1], cols)
    out = jnp.einsum("bsh,bhwc->bswc", rows, images.astype(jnp.float32), precision=HIGHEST)
    return jnp.einsum("bswc,btw->bstc", out, cols, precision=HIGHEST)


def augment(images: jax.Array, key: jax.Array, image_size: int, scale: Sequence[float], flip: bool) -> jax.Array:
    """Random-resized crop (+ horizontal flip) of equally sized images (B, H, W, C), uint8 or float ->
    float32 (B, S, S, C), 0..255."""
    b, height, width, _ = images.shape
    k_crop, k_flip = jax.random.split(key)
    y, x, h, w = rrc_windows(k_crop, b, height, width, scale)
    mirror = jax.random.uniform(k_flip, (b,)) < 0.5 if flip else None
    return crop_resize(images, y, x, h, w, image_size, mirror)


def center_crop_resize(images: jax.Array, image_size: int, crop_pct: float = 1.0) -> jax.Array:
    """The evaluation transform (as the tf.data path's): shorter side -> round(S / crop_pct), then the central S x S;
    antialiased bilinear resize. (B, H, W, C) -> float32 (B, S, S, C); an S x S input passes through unchanged."""
    b, height, width, c = images.shape
    images = images.astype(jnp.float32)
    if (height, width) == (image_size, image_size):
        return images
    short = round(image_size / crop_pct)
    factor = short / min(height, width)
    new_h, new_w = max(round(height * factor), image_size), max(round(width * factor), image_size)
    images = jax.image.resize(images, (b, new_h, new_w, c), method="bilinear", antialias=True)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    return images[:, top : top + image_size, left : left + image_size]


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """float32 0..255 -> (x / 255 - mean) / std, as one multiply-add."""
    std = np.asarray(std, np.float32)
    return images * (1.0 / (255.0 * std)) + (-np.asarray(mean, np.float32) / std)


# ------------------------------------------------------------------------------------------------ the split on device
class DeviceData:
    """A training split on the devices and the transform of a step's index batch into images, inside the step.

    images: uint8 (N, H, W, C); labels: int32 (N,). batch_size: global. The stage's step receives
    {'index': int32 (B,), ...its other keys (masks)} and, through `wrap_loss`, its loss sees {'image': float32
    (B, S, S, C) normalised, 'label': int32 (B,) if `labels`, ...}."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        image_size: int,
        crop_scale: Sequence[float],
        flip: bool,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int,
        with_labels: bool = True,
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.image_size = int(batch_size), int(image_size)
        self.crop_scale, self.flip = tuple(float(s) for s in crop_scale), bool(flip)
        self.mean, self.std, self.seed, self.with_labels = tuple(mean), tuple(std), int(seed), with_labels
        self.steps_per_epoch = len(images) // self.batch_size

    @property
    def num_examples(self) -> int:
        return len(self.images)

    def arrays(self) -> dict:
        """What the step reads (host arrays; the stage places them replicated on the devices)."""
        out = {"image": self.images}
        if self.with_labels:
            out["label"] = self.labels
        return out

    def consts(self, stage_consts: Any) -> dict:
        """The step's constants: the stage's own (e.g. the tokenizer) beside the split."""
        return {"stage": stage_consts, "data": self.arrays()}

    def batch_spec(self, spec: dict) -> dict:
        """A stage's {name: (global shape, dtype)} with its images (and labels) replaced by the indices."""
        spec = {k: v for k, v in spec.items() if k not in ("image", "label")}
        return {"index": ((self.batch_size,), jnp.int32), **spec}

    def index_batches(self, start_step: int, process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
        """{'index': int32 (B / processes,)} of every step from `start_step` on: this process's rows of the step's
        global batch, from the epoch's permutation (the same on every process)."""
        local = self.batch_size // process_count
        rows = slice(process_index * local, (process_index + 1) * local)
        step, epoch, order = start_step, None, None
        while True:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                order = epoch_order(self.seed, epoch, self.num_examples)
            i = (step % self.steps_per_epoch) * self.batch_size
            yield {"index": order[i : i + self.batch_size][rows]}
            step += 1

    def transform(self, data: dict, batch: dict, key: jax.Array) -> dict:
        """An index batch -> the images (and labels) the stage's loss expects; pure, jittable."""
        batch = dict(batch)
        index = batch.pop("index")
        images = jnp.take(data["image"], index, axis=0)
        images = augment(images, key, self.image_size, self.crop_scale, self.flip)
        batch["image"] = normalize(images, self.mean, self.std)
        if self.with_labels:
            batch["label"] = jnp.take(data["label"], index, axis=0)
        return batch

    def wrap_loss(self, loss_fn: Callable) -> Callable:
        """The stage's `loss_fn(params, batch_stats, batch, rng, consts)` on index batches: the images are made
        from the step's key first (consts = `self.consts(...)`)."""

        def loss(params, batch_stats, batch, rng, consts):
            batch = self.transform(consts["data"], batch, jax.random.fold_in(rng, AUGMENT_STREAM))
            return loss_fn(params, batch_stats, batch, rng, consts["stage"])

        return loss


__all__ = [
    "AUGMENT_STREAM",
    "DeviceData",
    "augment",
    "center_crop_resize",
    "crop_resize",
    "epoch_order",
    "normalize",
    "resample_matrix",
    "rrc_windows",
    "step_key",
]
