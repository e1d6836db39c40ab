"""Masked-image-modelling wrapper: the encoder sees masked patches as the mask token; a linear head on the
(final-normed) patch tokens predicts the target (visual tokens or pixels) at every position; the loss keeps the
masked ones."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sslvit.models.vit import ViT


class MaskedImageModel(nn.Module):
    encoder: ViT  # built with num_classes=0, use_mask_token=True
    num_outputs: int

    @nn.compact
    def __call__(self, img, mask, train: bool = False):
        _, feats = self.encoder(img, train=train, mask=mask, return_features=True, collect_layers=False)
        tokens = feats["tokens"][:, 1:]  # patch tokens, after the encoder's final LayerNorm
        return nn.Dense(
            self.num_outputs, kernel_init=nn.initializers.truncated_normal(0.02), dtype=jnp.float32, name="head"
        )(tokens)
