"""Image transforms of the tf.data pipeline (pure TensorFlow functions): decoding, random-resized crop and flip
(stateless: keyed by a seed tensor, so a batch is a function of (seed, step)), the evaluation centre crop, and
normalisation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from sslvit.data._tf import tf
from sslvit.data.config import ASPECT_RATIO_RANGE


def decode(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes (JPEG/PNG/GIF/BMP) -> uint8 (H, W, 3); grayscale and RGBA become RGB."""
    return tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)


def rrc_windows(
    seed: tf.Tensor,
    heights: tf.Tensor,
    widths: tf.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = ASPECT_RATIO_RANGE,
    attempts: int = 10,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Random-resized-crop windows, torchvision's algorithm vectorised over a batch; stateless in `seed`.

    Up to `attempts` draws of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first that fits wins,
    else the largest central crop with its aspect clipped into `ratio`. Returns int32 (y, x, h, w), each (B,).
    """
    heights = tf.cast(heights, tf.float32)
    widths = tf.cast(widths, tf.float32)
    batch = tf.shape(heights)[0]
    seed_try, seed_pos = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    u = tf.random.stateless_uniform(tf.stack([batch, attempts, 2]), seed_try)
    area = (heights * widths)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = tf.round(tf.sqrt(area * aspect))
    h = tf.round(tf.sqrt(area / aspect))
    fits = (w >= 1) & (h >= 1) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    w = tf.gather(w, first, batch_dims=1)
    h = tf.gather(h, first, batch_dims=1)
    found = tf.reduce_any(fits, axis=1)
    in_ratio = widths / heights
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(heights * ratio[1]), widths)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(widths / ratio[0]), heights)
    w = tf.where(found, w, fallback_w)
    h = tf.where(found, h, fallback_h)
    pos = tf.random.stateless_uniform(tf.stack([batch, 2]), seed_pos)
    y = tf.where(found, tf.floor(pos[:, 0] * (heights - h + 1)), tf.floor((heights - h) / 2))
    x = tf.where(found, tf.floor(pos[:, 1] * (widths - w + 1)), tf.floor((widths - w) / 2))
    y = tf.minimum(y, heights - h)
    x = tf.minimum(x, widths - w)
    return tuple(tf.cast(v, tf.int32) for v in (y, x, h, w))


def _flip_mask(seed: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
    return tf.random.stateless_uniform(tf.reshape(batch, [1]), seed) < 0.5


def augment_batch(
    images: tf.Tensor, seed: tf.Tensor, image_size: int, scale: tuple[float, float], flip: bool
) -> tf.Tensor:
    """Random-resized-crop (+ flip) of equally sized uint8 images (B, H, W, 3) -> float32 (B, S, S, 3), 0..255.

    One `crop_and_resize` for the whole batch instead of a crop and a resize per image.
    The box uses its align-corners convention from the first to the last pixel centre of each window, so
    every sample lies inside the image (no black border) and a full window at S == H is the identity. It does
    not antialias: fine for the up-/mild down-scaling of small images this path serves."""
    seed_crop, seed_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.shape(images)
    # Static sizes where known keep shapes static downstream (and grappler's cost model quiet).
    batch, height, width = (images.shape[i] if images.shape[i] is not None else shape[i] for i in range(3))
    y, x, h, w = rrc_windows(seed_crop, tf.fill([batch], height), tf.fill([batch], width), scale)
    hm1 = tf.cast(tf.maximum(height - 1, 1), tf.float32)
    wm1 = tf.cast(tf.maximum(width - 1, 1), tf.float32)
    y, x, h, w = (tf.cast(v, tf.float32) for v in (y, x, h, w))
    left, right = x / wm1, (x + w - 1) / wm1
    if flip:  # a box with x1 > x2 samples the mirrored crop: the flip costs nothing
        flipped = _flip_mask(seed_flip, batch)
        left, right = tf.where(flipped, right, left), tf.where(flipped, left, right)
    boxes = tf.stack([y / hm1, left, (y + h - 1) / hm1, right], axis=1)
    # uint8 in, float32 out: no separate cast pass over the batch.
    return tf.image.crop_and_resize(images, boxes, tf.range(batch), [image_size, image_size], method="bilinear")


def augment_example(
    image: tf.Tensor, seed: tf.Tensor, image_size: int, scale: tuple[float, float], flip: bool
) -> tf.Tensor:
    """Random-resized-crop (+ flip) of one image of any size -> float32 (S, S, 3), 0..255.

    `image` is encoded bytes or uint8 (H, W, 3). JPEGs are decoded only inside the crop window
    (`decode_and_crop_jpeg`), which spares most of the decode of large images; the resize antialiases."""
    seed_crop, seed_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

    def window(shape):
        y, x, h, w = rrc_windows(seed_crop, shape[:1], shape[1:2], scale)
        return y[0], x[0], h[0], w[0]

    def crop_decoded(img):
        y, x, h, w = window(tf.shape(img))
        return img[y : y + h, x : x + w]

    if image.dtype == tf.string:

        def jpeg():
            y, x, h, w = window(tf.image.extract_jpeg_shape(image))
            return tf.image.decode_and_crop_jpeg(image, tf.stack([y, x, h, w]), channels=3)

        crop = tf.cond(tf.io.is_jpeg(image), jpeg, lambda: crop_decoded(decode(image)))
    else:
        crop = crop_decoded(image)
    out = tf.image.resize(crop, [image_size, image_size], method="bilinear", antialias=True)
    if flip:
        out = tf.cond(_flip_mask(seed_flip, tf.constant(1))[0], lambda: tf.reverse(out, axis=[1]), lambda: out)
    return tf.ensure_shape(out, [image_size, image_size, 3])


def center_crop_resize(image: tf.Tensor, image_size: int, crop_pct: float = 1.0) -> tf.Tensor:
    """Evaluation transform: shorter side -> round(S / crop_pct), then the central S x S. Works on (H, W, 3)
    and (B, H, W, 3), uint8 or float; returns float32 0..255. An S x S input passes through unchanged."""
    if image.dtype == tf.string:
        image = decode(image)
    static = image.shape[-3:-1]
    if static[0] == image_size and static[1] == image_size:
        return tf.cast(image, tf.float32)
    shape = tf.shape(image)
    h = tf.cast(shape[-3], tf.float32)
    w = tf.cast(shape[-2], tf.float32)
    short = tf.round(image_size / crop_pct)
    factor = short / tf.minimum(h, w)
    new_h = tf.cast(tf.maximum(tf.round(h * factor), image_size), tf.int32)
    new_w = tf.cast(tf.maximum(tf.round(w * factor), image_size), tf.int32)
    image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
    top = (new_h - image_size) // 2
    left = (new_w - image_size) // 2
    image = image[..., top : top + image_size, left : left + image_size, :]
    return tf.ensure_shape(image, [*image.shape[:-3], image_size, image_size, 3])


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """float32 0..255 -> (x / 255 - mean) / std, as one multiply-add."""
    std = np.asarray(std, np.float32)
    scale = tf.constant(1.0 / (255.0 * std), tf.float32)
    shift = tf.constant(-np.asarray(mean, np.float32) / std, tf.float32)
    return tf.cast(image, tf.float32) * scale + shift


def options(threads: int | None = None) -> tf.data.Options:
    """Deterministic order; with `threads`, a private thread pool of that size (and no intra-op parallelism on top:
    each map call on one thread), so that processes sharing a host share its cores as told."""
    options = tf.data.Options()
    options.deterministic = True  # parallel maps keep their input order: batches depend on (seed, step) only
    if threads is not None:
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
    return options
