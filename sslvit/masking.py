"""Mask samplers for BEiT-style masked-patch pretraining (BEiT: unilm `beit/masking_generator.py`).

A sampler turns a ``np.random.Generator`` and a batch size into a bool array of shape
``(batch_size, gh * gw)`` (row-major patch grid, True = masked) with exactly ``num_masked`` True per
row, so the masked-token gather has a static shape under ``jit``.

Samplers run on the host in numpy, vectorised over the batch, so they never bottleneck the input
pipeline. Given the same Generator state and batch size they return the same masks (a row's mask
depends on the batch size, as the batch shares one random stream); ``mask_rng(seed, step)`` gives
the Generator for a training step, so masks of step k can be regenerated exactly after a resume.

Adding a sampler = one ``MaskSampler`` subclass registered with ``@MASK_SAMPLERS.register(name)`` + one
``conf/mask/<name>.yaml``.
"""

from __future__ import annotations

import abc
import math

import numpy as np

from sslvit.config.checks import Integer, Number, Optional, is_int
from sslvit.errors import ConfigError
from sslvit.registry import Registry

__all__ = ["MASK_SAMPLERS", "BlockMaskSampler", "MaskSampler", "RandomMaskSampler", "make_mask_sampler", "mask_rng"]


MASK_SAMPLERS: Registry = Registry("mask sampler", "mask.name")


def mask_rng(seed: int, step: int) -> np.random.Generator:
    """Generator for the masks of training step ``step``: a pure function of (seed, step).

    Keying on the step (not on a stream advanced by every previous step) lets a resumed run
    regenerate exactly the masks it would have drawn without the interruption.
    """
    return np.random.default_rng([Integer(min=0)(seed, "seed"), Integer(min=0)(step, "step")])


def _fill_to_count(mask: np.ndarray, num_masked: int, rng: np.random.Generator) -> np.ndarray:
    """Randomly mask extra / unmask patches so every row of ``mask`` (B, N) has exactly ``num_masked`` True.

    BEiT v2's fix-up: the blockwise loop can stop short of the target, and a static count is needed
    under jit. Rows already at the target are left unchanged.
    """
    counts = mask.sum(axis=1)
    if np.all(counts == num_masked):
        return mask
    noise = rng.random(mask.shape)
    # Rank candidates per row: for a deficit the unmasked patches (noise in [0, 1)) come first, for a
    # surplus the masked ones; the first |delta| candidates of each row flip.
    deficit = counts < num_masked
    candidate = np.where(deficit[:, None], ~mask, mask)
    ranks = np.argsort(np.argsort(np.where(candidate, noise, 2.0), axis=1), axis=1)
    flip = ranks < np.abs(num_masked - counts)[:, None]
    return mask ^ flip


class MaskSampler(abc.ABC):
    """Base class: validates the grid and ratio and fixes ``num_masked = round(mask_ratio * gh * gw)``.

    Attributes:
      grid_size: (gh, gw) patch grid.
      num_patches: gh * gw.
      mask_ratio: the requested ratio.
      num_masked: exact number of masked patches per row.
    """

    name: str = ""

    def __init__(self, grid_size: tuple[int, int], mask_ratio: float):
        if (
            not isinstance(grid_size, (tuple, list))
            or len(grid_size) != 2
            or not all(is_int(g) and g >= 1 for g in grid_size)
        ):
            raise ConfigError(
                f"mask grid_size={grid_size!r} must be two positive ints (gh, gw) = (H // patch, W // patch), "
                "e.g. (14, 14) for 224 px / patch 16."
            )
        gh, gw = int(grid_size[0]), int(grid_size[1])
        n = gh * gw
        mask_ratio = Number(gt=0, lt=1)(mask_ratio, "mask_ratio", "e.g. 0.4 as in BEiT")
        num_masked = int(round(float(mask_ratio) * n))
        if num_masked == 0 or num_masked == n:
            why = "nothing to predict" if num_masked == 0 else "no patch visible"
            raise ConfigError(
                f"mask_ratio={mask_ratio} masks {num_masked} of {n} patches on a {gh}x{gw} grid "
                f"(round(ratio * {n})), leaving {why}; use a ratio that masks 1..{n - 1} patches, "
                f"e.g. {1 / n:.3g}..{(n - 1) / n:.3g}."
            )
        self.grid_size = (gh, gw)
        self.num_patches = n
        self.mask_ratio = float(mask_ratio)
        self.num_masked = num_masked

    def __call__(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """Return a bool array (batch_size, gh * gw), True = masked, exactly ``num_masked`` per row."""
        batch_size = Integer(min=0)(batch_size, "batch_size")
        if not isinstance(rng, np.random.Generator):
            raise ConfigError(
                f"mask sampler rng must be a np.random.Generator (got {type(rng).__name__}); "
                "use sslvit.masking.mask_rng(seed, step)."
            )
        mask = self._sample(rng, int(batch_size))
        return mask.reshape(int(batch_size), self.num_patches)

    @abc.abstractmethod
    def _sample(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """Draw (batch_size, N) or (batch_size, gh, gw) bool masks with exactly num_masked per row."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(grid_size={self.grid_size}, mask_ratio={self.mask_ratio}, "
            f"num_masked={self.num_masked})"
        )


@MASK_SAMPLERS.register("random")
class RandomMaskSampler(MaskSampler):
    """Uniformly random patches (MAE / SimMIM style), exactly ``num_masked`` per row."""

    name = "random"

    def _sample(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        # The num_masked smallest of i.i.d. uniform noise = a uniform random subset of that size.
        order = np.argsort(rng.random((batch_size, self.num_patches)), axis=1)
        mask = np.zeros((batch_size, self.num_patches), dtype=bool)
        np.put_along_axis(mask, order[:, : self.num_masked], True, axis=1)
        return mask


@MASK_SAMPLERS.register("block")
class BlockMaskSampler(MaskSampler):
    """BEiT blockwise masking (unilm ``beit/masking_generator.py``) with BEiT v2's exact-count fix-up.

    Until the target count is reached, draw a rectangle with area ~ U(min_patches, min(remaining,
    max_patches)) and aspect ratio log-uniform in [min_aspect, 1 / min_aspect]; it must fit the grid
    and is accepted if it masks 1..remaining new patches. A block gets 10 tries; if all fail the loop
    stops (as BEiT v1 does) and random patches top the mask up to exactly ``num_masked``.

    Unlike BEiT v1, a rectangle may span the full grid height/width (BEiT requires ``h < height``),
    which matters on small grids such as CIFAR's 8x8.

    The loop runs over the whole batch at once: each iteration draws one rectangle for every row that
    is still masking, so the Python overhead is per iteration, not per image.

    Args:
      min_patches: smallest block area; clipped to ``num_masked`` so small grids still get blocks.
      max_patches: optional largest block area (None = no limit beyond the remaining count).
      min_aspect: smallest aspect ratio h / w, in (0, 1]; the largest is 1 / min_aspect.
    """

    name = "block"
    max_tries = 10  # BEiT's attempts per block before giving up

    def __init__(
        self,
        grid_size: tuple[int, int],
        mask_ratio: float,
        *,
        min_patches: int = 16,
        max_patches: int | None = None,
        min_aspect: float = 0.3,
    ):
        super().__init__(grid_size, mask_ratio)
        min_patches = Integer(min=1)(min_patches, "mask.min_patches", "e.g. 16 as in BEiT")
        max_patches = Optional(Integer(min=min_patches), "null (no limit)")(max_patches, "mask.max_patches")
        min_aspect = Number(gt=0, le=1)(min_aspect, "mask.min_aspect", "e.g. 0.3 as in BEiT")
        self.min_patches = min(int(min_patches), self.num_masked)
        self.max_patches = self.num_masked if max_patches is None else min(int(max_patches), self.num_masked)
        self.min_aspect = float(min_aspect)
        self._log_aspect = (math.log(self.min_aspect), -math.log(self.min_aspect))

    def _sample(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        blocks = self._blocks(rng, batch_size)
        return _fill_to_count(blocks.reshape(batch_size, self.num_patches), self.num_masked, rng)

    def _blocks(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """BEiT v1's blockwise loop: (batch_size, gh, gw) masks with at most num_masked True per row."""
        gh, gw = self.grid_size
        target = self.num_masked
        mask = np.zeros((batch_size, gh, gw), dtype=bool)
        count = np.zeros(batch_size, dtype=np.int64)
        tries = np.zeros(batch_size, dtype=np.int64)
        active = np.arange(batch_size)
        rows, cols = np.arange(gh), np.arange(gw)
        lo_aspect, hi_aspect = self._log_aspect

        while active.size:
            n = active.size
            u = rng.random((4, n))
            remaining = target - count[active]
            hi_area = np.minimum(remaining, self.max_patches)
            # U(min, hi) also when hi < min (as random.uniform in BEiT): such areas mostly overshoot
            # `remaining` and get rejected, which is what ends the loop near the target.
            area = self.min_patches + u[0] * (hi_area - self.min_patches)
            aspect = np.exp(lo_aspect + u[1] * (hi_aspect - lo_aspect))
            h = np.maximum(np.rint(np.sqrt(area * aspect)).astype(np.int64), 1)
            w = np.maximum(np.rint(np.sqrt(area / aspect)).astype(np.int64), 1)
            fits = (h <= gh) & (w <= gw)
            top = np.floor(u[2] * np.maximum(gh - h + 1, 1)).astype(np.int64)
            left = np.floor(u[3] * np.maximum(gw - w + 1, 1)).astype(np.int64)

            in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
            in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
            new = in_rows[:, :, None] & in_cols[:, None, :] & ~mask[active]
            added = new.sum(axis=(1, 2))
            accept = fits & (added >= 1) & (added <= remaining)

            acc = active[accept]
            mask[acc] |= new[accept]
            count[acc] += added[accept]
            tries[acc] = 0
            tries[active[~accept]] += 1
            keep = (count[active] < target) & (tries[active] < self.max_tries)
            active = active[keep]

        return mask


def make_mask_sampler(name: str, grid_size: tuple[int, int], mask_ratio: float, /, **options) -> MaskSampler:
    """Build a registered mask sampler, e.g. ``make_mask_sampler("block", (14, 14), 0.4, min_patches=16)``.

    Raises ConfigError for an unknown name, an option the sampler does not take, or a bad value.
    """
    return MASK_SAMPLERS.build(name, grid_size, mask_ratio, config=options, ignore=("name",))
