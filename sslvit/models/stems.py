"""Patch stems: image (B, H, W, C) -> patch embeddings (B, H/p, W/p, dim).

A registry (`STEMS`), so a new stem is one class registered with `@STEMS.register(name)` plus one
`conf/stem/<name>.yaml`. The property that matters for masked
pretraining (paper §5): `linear` and `hmlp` use kernel = stride everywhere, so a patch's embedding depends on that
patch's pixels only and masking after the stem equals masking the pixels; `conv` uses overlapping 3x3 kernels and
leaks neighbouring (possibly masked) content into each patch.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from sslvit.config.checks import Choice
from sslvit.errors import ConfigError
from sslvit.registry import Registry

Dtype = Any
STEMS: Registry = Registry("stem", "stem.name")
NORMS = ("batch", "layer")
STEM_GIVEN = ("dim", "patch_size", "channels", "dtype", "parent")  # set by the ViT, not by the stem's config group


def register_stem(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """`@register_stem(name)`: `STEMS.register(name)`, also recording the name on the class (`stem_name`)."""

    def wrap(cls):
        cls.stem_name = name
        return STEMS.register(name)(cls)

    return wrap


def get_stem(name: str) -> type[nn.Module]:
    return STEMS.get(name)


def _kernel_init():
    return nn.initializers.truncated_normal(0.02)


def _norm(kind: str, train: bool, dtype: Dtype, name: str) -> nn.Module:
    if kind == "batch":
        # Under jit with a batch-sharded input, the batch mean is global: this is SyncBN for free.
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)


def check_norm(norm: str) -> None:
    Choice(NORMS)(norm, "stem.norm", "(layer needs no batch statistics and works at batch size 1)")


def hmlp_factors(patch_size: int) -> list[int]:
    """Kernel (= stride) sizes of the hMLP stem's convolutions, whose product is the patch size.

    The paper's 16 = 4·2·2 generalises to `p = (p/4)·2·2` (8 = 2·2·2, 32 = 8·2·2, 12 = 3·2·2) and `4 = 2·2`:
    the last two stages always merge 2x2 sub-patches, as in Algorithm 1.
    """
    if patch_size < 4 or patch_size % 4:
        raise ConfigError(
            f"patch_size={patch_size} cannot be factored by the hmlp stem: it needs a multiple of 4 "
            f"(4 = 2·2, 8 = 2·2·2, 16 = 4·2·2); use another patch_size or stem=linear"
        )
    first = patch_size // 4
    return ([first] if first > 1 else []) + [2, 2]


def conv_num_layers(patch_size: int) -> int:
    n = int(round(math.log2(patch_size))) if patch_size > 0 else 0
    if patch_size < 2 or 2**n != patch_size:
        raise ConfigError(
            f"patch_size={patch_size} does not suit the conv stem (stride-2 3x3 convolutions): use a power of 2"
        )
    return n


@register_stem("linear")
class LinearStem(nn.Module):
    """Standard ViT patchify: one convolution with kernel = stride = patch size."""

    dim: int
    patch_size: int
    channels: int = 3
    norm: str = "batch"  # unused, kept so every stem takes the same arguments
    dtype: Dtype = jnp.float32

    @staticmethod
    def validate(dim: int, patch_size: int, norm: str) -> None:
        pass

    @nn.compact
    def __call__(self, x, train: bool = False):
        p = self.patch_size
        return nn.Conv(
            self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, kernel_init=_kernel_init(), name="proj"
        )(x)


@register_stem("hmlp")
class HMLPStem(nn.Module):
    """Hierarchical MLP stem (paper Algorithm 1): conv k=s=4 -> dim/4, norm, GELU; k=s=2 -> dim/4, norm, GELU;
    k=s=2 -> dim, norm. Kernel = stride, so 16x16 patches never interact (a per-patch MLP).

    Note: BatchNorm in training mode pools statistics over all patches (masked ones too), a non-spatial coupling;
    `norm: layer` has none and works at batch size 1.
    """

    dim: int
    patch_size: int
    channels: int = 3
    norm: str = "batch"
    dtype: Dtype = jnp.float32

    @staticmethod
    def validate(dim: int, patch_size: int, norm: str) -> None:
        check_norm(norm)
        hmlp_factors(patch_size)
        if dim % 4:
            raise ConfigError(f"dim={dim} must be divisible by 4 for the hmlp stem (inner width dim/4)")

    @nn.compact
    def __call__(self, x, train: bool = False):
        factors = hmlp_factors(self.patch_size)
        for i, k in enumerate(factors):
            last = i == len(factors) - 1
            width = self.dim if last else self.dim // 4
            x = nn.Conv(
                width,
                (k, k),
                strides=(k, k),
                padding="VALID",
                dtype=self.dtype,
                kernel_init=_kernel_init(),
                name=f"conv{i}",
            )(x)
            x = _norm(self.norm, train, self.dtype, f"norm{i}")(x)
            if not last:
                x = nn.gelu(x, approximate=False)
        return x


@register_stem("conv")
class ConvStem(nn.Module):
    """Overlapping convolutional stem (LeViT-style, the paper's 'conv' comparison): log2(p) 3x3 stride-2
    convolutions with widths dim/2^(n-1), ..., dim/2, dim, each followed by a norm, GELU between.
    Neighbouring patches mix, so masked content leaks into visible patches' embeddings.
    """

    dim: int
    patch_size: int
    channels: int = 3
    norm: str = "batch"
    dtype: Dtype = jnp.float32

    @staticmethod
    def validate(dim: int, patch_size: int, norm: str) -> None:
        check_norm(norm)
        n = conv_num_layers(patch_size)
        if dim % (2 ** (n - 1)):
            raise ConfigError(
                f"dim={dim} must be divisible by {2 ** (n - 1)} for the conv stem with patch {patch_size}"
            )

    @nn.compact
    def __call__(self, x, train: bool = False):
        n = conv_num_layers(self.patch_size)
        for i in range(n):
            last = i == n - 1
            width = self.dim // 2 ** (n - 1 - i)
            x = nn.Conv(
                width,
                (3, 3),
                strides=(2, 2),
                padding=((1, 1), (1, 1)),
                dtype=self.dtype,
                kernel_init=_kernel_init(),
                name=f"conv{i}",
            )(x)
            x = _norm(self.norm, train, self.dtype, f"norm{i}")(x)
            if not last:
                x = nn.gelu(x, approximate=False)
        return x
