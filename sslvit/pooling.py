"""Pooling of a layer's tokens (B, 1+N, D) into one feature vector per image, for the probe: a registry (`POOLINGS`,
chosen with `pool=`). Each pooling is a function with a `width` attribute: the feature width over the model dim."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sslvit.registry import Registry

POOLINGS: Registry = Registry("probe pooling", "pool", "pool")


def _width(w: int):
    def mark(fn):
        fn.width = w
        return fn

    return mark


@POOLINGS.register("cls")
@_width(1)
def cls(tokens: jax.Array) -> jax.Array:
    """The class token."""
    return tokens[..., 0, :]


@POOLINGS.register("mean")
@_width(1)
def mean(tokens: jax.Array) -> jax.Array:
    """The mean of the patch tokens."""
    return tokens[..., 1:, :].mean(axis=-2)


@POOLINGS.register("cls+mean")
@_width(2)
def cls_mean(tokens: jax.Array) -> jax.Array:
    """BEiT's linear evaluation: the class token concatenated with the mean of the patch tokens."""
    return jnp.concatenate([cls(tokens), mean(tokens)], axis=-1)


def get_pooling(name: str) -> Callable[[jax.Array], jax.Array]:
    return POOLINGS.get(name)
