"""Batch-level Mixup / CutMix and label smoothing, on device inside the fine-tuning step (timm's 'batch' mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    return (
        optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
        if smoothing
        else jax.nn.one_hot(labels, num_classes)
    )


def mix_batch(
    rng: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    mix_prob: float = 1.0,
    switch_prob: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """Batch-level Mixup / CutMix (timm's 'batch' mode): each image is mixed with the batch's reversed order.

    Mixup: x = lam x + (1 - lam) x_rev; CutMix: a box of area (1 - lam) pasted from x_rev, lam recomputed from the
    clipped box; targets (soft, (B, C)) mixed with the same lam. With both on, CutMix with `switch_prob`."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(rng, 6)
    b, h, w, _ = images.shape
    partner, partner_t = images[::-1], targets[::-1]
    one = jnp.ones((), jnp.float32)

    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else one
    mixed = lam_mix * images + (1 - lam_mix) * partner

    if cutmix_alpha > 0:
        lam = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)
        ratio = jnp.sqrt(1.0 - lam)
        ch, cw = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
        cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
        y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
        x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
        yy, xx = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        box = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        cut = jnp.where(box[None, :, :, None], partner, images)
        lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
    else:
        cut, lam_cut = images, one

    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cut = jax.random.bernoulli(k_switch, switch_prob)
    else:
        use_cut = jnp.asarray(cutmix_alpha > 0)
    apply = jax.random.bernoulli(k_apply, mix_prob) if mix_prob < 1 else jnp.asarray(True)
    out = jnp.where(apply, jnp.where(use_cut, cut, mixed), images)
    lam = jnp.where(apply, jnp.where(use_cut, lam_cut, lam_mix), one)
    return out, lam * targets + (1 - lam) * partner_t
