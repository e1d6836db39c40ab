"""What a pretrained masked-image model predicts: the stage behind `visualize.py`.

Loads the encoder + pretext head (and BatchNorm statistics) of a pretraining run's checkpoint, rebuilt from the
config saved in the checkpoint meta, and the run's tokenizer; takes the first test images, samples masks with the
run's mask sampler, and draws one PNG row per image: the image, the masked image (masked patches grey), the target
at the masked patches and the model's prediction there (visible patches faded, for context).

k-means tokens are drawn as their codebook patches and pixel targets as the predicted pixels. Both live in
per-patch-normalised space (zero mean, unit variance per patch), so each drawn patch is given back the mean and
std of the original patch (`denormalize_patches`), then the data mean/std (`denormalize_images`); a correct
token thus looks like a quantised version of the patch it replaces.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sslvit.errors import ConfigError

log = logging.getLogger(__name__)

COLUMNS = ("image", "masked", "target", "prediction")
OUTPUT_FILE = "mask_predictions.png"  # default output, inside the run dir
CELL_PX = 128  # small images are upscaled (nearest) by an integer factor to about this size
PAD_PX = 4  # white space between and around cells
HEADER_PX = 64  # title (two lines) and column labels
DPI = 100
MAX_PIXELS = 64 * 10**6  # the PNG's size limit: its float32 RGB grid alone is 768 MB
MASK_GREY = 0.5
FADE = 0.6  # visible patches in the target/prediction columns: this much of the way to white


# ------------------------------------------------------------------------------------------ pixels
def denormalize_images(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Data-normalised NHWC images -> [0, 1] display pixels (x * std + mean, clipped)."""
    c = images.shape[-1]
    mean = np.asarray(mean, np.float32)[:c]
    std = np.asarray(std, np.float32)[:c]
    return np.clip(np.asarray(images, np.float32) * std + mean, 0.0, 1.0)


def denormalize_patches(patches: np.ndarray, reference: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Inverse of `sslvit.targets.normalize_patches` with the statistics of `reference`.

    `patches` (..., D) are per-patch normalised (codebook entries, pixel predictions); `reference` (..., D) are the
    original patches they stand for. Returns patches * sqrt(var_ref + eps) + mean_ref, so
    `denormalize_patches(normalize_patches(x), x) == x`.
    """
    reference = np.asarray(reference, np.float32)
    mean = reference.mean(axis=-1, keepdims=True)
    var = reference.var(axis=-1, keepdims=True)
    return np.asarray(patches, np.float32) * np.sqrt(var + eps) + mean


def mask_pixels(mask: np.ndarray, grid_hw: tuple[int, int], patch_size: int) -> np.ndarray:
    """(B, N) patch mask -> (B, H, W, 1) pixel mask (row-major patch grid)."""
    b = mask.shape[0]
    m = np.asarray(mask, bool).reshape(b, grid_hw[0], grid_hw[1])
    return np.repeat(np.repeat(m, patch_size, axis=1), patch_size, axis=2)[..., None]


def composite(
    masked_content: np.ndarray, visible_content: np.ndarray, pixel_mask: np.ndarray, fade: float = FADE
) -> np.ndarray:
    """`masked_content` at masked pixels, `visible_content` faded towards white elsewhere."""
    return np.where(pixel_mask, masked_content, visible_content * (1.0 - fade) + fade)


def upscale(images: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(images, scale, axis=-3), scale, axis=-2) if scale > 1 else images


def _area(num_rows: int, image_px: int, scale: int) -> int:
    h, w = grid_size(num_rows, (image_px, image_px), scale)
    return h * w


def default_scale(image_px: int) -> int:
    return max(1, CELL_PX // image_px)


def grid_size(num_rows: int, image_hw: tuple[int, int], scale: int, num_cols: int = len(COLUMNS)) -> tuple[int, int]:
    """(height, width) in pixels of the PNG `visualize` writes: cells, padding and the header."""
    h, w = image_hw[0] * scale, image_hw[1] * scale
    return HEADER_PX + num_rows * h + (num_rows + 1) * PAD_PX, num_cols * w + (num_cols + 1) * PAD_PX


def make_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = PAD_PX) -> np.ndarray:
    """Equal-size HWC [0, 1] cells -> one white-padded (rows*h + pad*(rows+1), cols*w + pad*(cols+1), 3) array."""
    h, w = rows[0][0].shape[:2]
    ncols = len(rows[0])
    out = np.ones((len(rows) * h + (len(rows) + 1) * pad, ncols * w + (ncols + 1) * pad, 3), np.float32)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            if cell.shape[:2] != (h, w):
                raise ValueError(f"grid cell ({i}, {j}) has shape {cell.shape[:2]}, expected {(h, w)}")
            cell = np.repeat(cell, 3, axis=-1) if cell.shape[-1] == 1 else cell[..., :3]
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = cell
    return out


# ------------------------------------------------------------------------------------------ model
@dataclasses.dataclass
class LoadedRun:
    """A pretraining run's model, weights, target (with its tokenizer) and mask sampler, from its checkpoint."""

    run_dir: Path
    step: int
    config: dict  # the run's full config (checkpoint meta)
    model: Any  # MaskedImageModel
    variables: dict  # {'params', ['batch_stats']}
    target: Any  # sslvit.targets.Target
    target_state: dict  # tokenizer (k-means codebook), {} for pixels
    sampler: Any  # sslvit.masking.MaskSampler
    image_size: int
    patch_size: int
    grid_hw: tuple[int, int]
    data_cfg: Any  # the run's data group (sslvit.config.groups.DataConfig)


def load_run(run: str | os.PathLike, step: int | None = None) -> LoadedRun:
    """Rebuild the pretraining model of `run` with the pretraining stage's own builders, from the config saved in
    its checkpoint meta, and load its weights and tokenizer."""
    from sslvit import targets  # noqa: PLC0415
    from sslvit.checkpoint import load_checkpoint  # noqa: PLC0415
    from sslvit.pretrained import checkpoint_step  # noqa: PLC0415
    from sslvit.pretraining import Pretraining  # noqa: PLC0415
    from sslvit.rundir import run_dir_of_checkpoints  # noqa: PLC0415

    ckpt_dir, step = checkpoint_step(run, step)  # step=None: the latest usable one (past a damaged latest)
    step, trees, meta = load_checkpoint(ckpt_dir, step, subtrees=("params",), optional=("batch_stats",))
    params, batch_stats = trees["params"], trees.get("batch_stats") or {}  # no BatchNorm: no batch_stats entry
    if meta.get("stage") != "pretrain" or not isinstance(meta.get("config"), Mapping):
        raise ConfigError(
            f"run={os.fspath(run)!r} is a {meta.get('stage', 'unknown')!r} run: visualize needs a "
            f"pretraining run (made by pretrain.py; its checkpoint meta holds stage 'pretrain')"
        )
    if "head" not in params or "encoder" not in params:
        raise ConfigError(
            f"the checkpoint in {ckpt_dir} has no pretext head (params hold {sorted(params)}); pass the "
            f"dir of a pretraining run"
        )

    cfg = dict(meta["config"])
    cfg["target"] = dict(cfg["target"], path=None)  # the run's own tokenizer is loaded below
    stage = Pretraining(cfg, run_dir=None)
    run_dir = run_dir_of_checkpoints(ckpt_dir)
    target_state: dict = {}
    if stage.target.name == "kmeans":  # a target with a fitted state: the run's own copy of it
        target_state = stage.target.load(run_dir / targets.TOKENIZER_FILENAME, key="the run's tokenizer")
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    encoder = stage.encoder
    return LoadedRun(
        run_dir=run_dir,
        step=step,
        config=cfg,
        model=stage.model,
        variables=variables,
        target=stage.target,
        target_state=target_state,
        sampler=stage.sampler,
        image_size=stage.image_size,
        patch_size=encoder.patch_size,
        grid_hw=tuple(encoder.grid_size),
        data_cfg=stage.data_cfg,
    )


@dataclasses.dataclass
class Panels:
    """Display images (B, H, W, C) in [0, 1] for each column, and the masked-patch metric on these images."""

    image: np.ndarray
    masked: np.ndarray
    target: np.ndarray
    prediction: np.ndarray
    metric_name: str  # 'accuracy' (tokens) or 'mse' (pixels)
    metric: float

    def rows(self) -> list[list[np.ndarray]]:
        return [[self.image[i], self.masked[i], self.target[i], self.prediction[i]] for i in range(len(self.image))]


def _patch_images(
    patches: np.ndarray,
    reference: np.ndarray,
    normalized: bool,
    lr: LoadedRun,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """Per-patch vectors (B, N, D) -> display images, rescaled to the original patches' statistics if normalised."""
    from sslvit.targets import unpatchify  # noqa: PLC0415

    if normalized:
        patches = denormalize_patches(patches, reference)
    images = unpatchify(np.asarray(patches, np.float32), lr.patch_size, lr.grid_hw, lr.target.channels)
    return denormalize_images(images, mean, std)


def compute_panels(
    lr: LoadedRun, images: np.ndarray, mask: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> Panels:
    """Run the model on data-normalised `images` with `mask` (B, N) and draw the four columns."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from sslvit.targets import patchify  # noqa: PLC0415

    images = np.asarray(images, np.float32)
    mask = np.asarray(mask, bool)

    @jax.jit
    def run(variables, state, x, m):
        preds = lr.model.apply(variables, x, m, train=False)
        tokens = lr.target.compute(state, x)
        _, metrics = lr.target.loss(preds, tokens, m)
        return preds, tokens, metrics

    preds, tokens, metrics = jax.device_get(run(lr.variables, jax.tree.map(jnp.asarray, lr.target_state), images, mask))
    reference = np.asarray(patchify(images, lr.patch_size))  # the original patches, data-normalised
    if lr.target.name == "kmeans":
        codebook = np.asarray(lr.target_state["codebook"], np.float32)
        target_patches, pred_patches = codebook[tokens], codebook[np.argmax(preds, axis=-1)]
        normalized, metric_name = True, "accuracy"
    else:  # pixels: targets are (normalised) patches, predictions the same
        target_patches, pred_patches = tokens, preds
        normalized, metric_name = bool(getattr(lr.target, "normalize", False)), "mse"
    shown = denormalize_images(images, mean, std)
    px = mask_pixels(mask, lr.grid_hw, lr.patch_size)
    target_img = _patch_images(target_patches, reference, normalized, lr, mean, std)
    pred_img = _patch_images(pred_patches, reference, normalized, lr, mean, std)
    return Panels(
        image=shown,
        masked=np.where(px, MASK_GREY, shown),
        target=composite(target_img, shown, px),
        prediction=composite(pred_img, shown, px),
        metric_name=metric_name,
        metric=float(metrics[metric_name]),
    )


# ------------------------------------------------------------------------------------------ figure
def save_grid(
    rows: Sequence[Sequence[np.ndarray]], path: str | os.PathLike, title: str, columns: Sequence[str] = COLUMNS
) -> tuple[int, int]:
    """Write the cells as a PNG, pixel for pixel (no resampling), under a header with the title and column
    labels; returns its (height, width), which is `grid_size(...)`."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    grid = make_grid(rows)
    gh, gw = grid.shape[:2]
    height, width = HEADER_PX + gh, gw
    cell_w = rows[0][0].shape[1]
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    fig.figimage(grid, xo=0, yo=0, origin="upper")  # bottom-left placement, exact pixels
    fig.text(0.5, 1 - 4 / height, title, ha="center", va="top", fontsize=8, wrap=False)
    for j, name in enumerate(columns):
        x = (PAD_PX + j * (cell_w + PAD_PX) + cell_w / 2) / width
        fig.text(x, (gh + 3) / height, name, ha="center", va="bottom", fontsize=8, weight="bold")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    plt.close(fig)
    return height, width


# ------------------------------------------------------------------------------------------ stage
def visualize(cfg: Mapping, out: str | os.PathLike | None = None) -> dict:
    """Draw the grid for `cfg` (keys of conf/visualize.yaml: run, step, num_images, seed, split, data_dir, scale,
    out); returns {'path', 'metric_name', 'metric', 'num_images', 'step', 'size': (height, width)}."""
    from sslvit.config.stages import VisualizeConfig  # noqa: PLC0415
    from sslvit.paths import check_file  # noqa: PLC0415

    c = VisualizeConfig.parse(cfg)
    num_images, seed, scale = c.num_images, c.seed, c.scale
    given = out or c.out
    if given is not None:  # where the PNG goes is checked first, not after everything was computed
        check_file(given, "out")
    lr = load_run(c.run, c.step)
    path = Path(given or lr.run_dir / OUTPUT_FILE)
    if given is None:
        check_file(path, "out (default: the run dir)")
    scale = scale or default_scale(lr.image_size)
    height, width = grid_size(num_images, (lr.image_size, lr.image_size), scale)
    if height * width > MAX_PIXELS:
        fit = max((s for s in range(1, scale) if _area(num_images, lr.image_size, s) <= MAX_PIXELS), default=None)
        raise ConfigError(
            f"scale={scale} with num_images={num_images} of {lr.image_size}-px images makes a "
            f"{width}x{height} px PNG, over the {MAX_PIXELS // 10**6} Mpx limit: "
            + (f"use scale={fit} or less" if fit else "use fewer num_images")
        )

    from sslvit import data as data_lib  # noqa: PLC0415  (TensorFlow: only once the run is known to be good)

    dc = lr.data_cfg.replace(data_dir=c.data_dir) if c.data_dir else lr.data_cfg
    it = data_lib.make_eval_iterator(dc, c.split, batch_size=num_images, image_size=lr.image_size)
    batch = next(iter(it))
    images = np.asarray(batch["image"])[np.asarray(batch["valid"], bool)]
    mask = lr.sampler(np.random.default_rng(seed), len(images))
    panels = compute_panels(lr, images, mask, dc.mean, dc.std)

    rows = [[upscale(c, scale) for c in row] for row in panels.rows()]
    if panels.metric_name == "accuracy":
        chance = lr.target.chance_accuracy(lr.target_state)
        what = (
            f"masked-token accuracy on these {len(images)} images: {100 * panels.metric:.1f}% "
            f"(chance {100 * chance:.1f}%, {lr.target.num_outputs} k-means tokens)"
        )
    else:
        what = f"masked-patch MSE on these {len(images)} images: {panels.metric:.4f} (pixel target)"
    title = (
        f"{lr.run_dir.name} @ step {lr.step}: {lr.sampler.name} mask, {lr.sampler.num_masked}/"
        f"{lr.sampler.num_patches} patches\n{what}"
    )
    size = save_grid(rows, path, title)
    log.info("wrote %s (%dx%d px); %s", path, size[1], size[0], what)
    return {
        "path": str(path),
        "metric_name": panels.metric_name,
        "metric": panels.metric,
        "num_images": len(images),
        "step": lr.step,
        "size": size,
        "title": title,
    }


__all__ = [
    "COLUMNS",
    "LoadedRun",
    "Panels",
    "compute_panels",
    "composite",
    "denormalize_images",
    "denormalize_patches",
    "grid_size",
    "load_run",
    "make_grid",
    "mask_pixels",
    "save_grid",
    "visualize",
]
