"""Tests for sslvit.visualize: patch/image de-normalisation and the grid's exact layout on synthetic data, and the
whole stage on the tiny real pretraining run (`pretrain_run`, skipped without CIFAR-10)."""

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from sslvit.errors import ConfigError
from sslvit.targets import normalize_patches, patchify
from sslvit.visualize import (
    COLUMNS,
    HEADER_PX,
    MASK_GREY,
    PAD_PX,
    composite,
    default_scale,
    denormalize_images,
    denormalize_patches,
    grid_size,
    load_run,
    mask_pixels,
    save_grid,
    upscale,
    visualize,
)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def test_denormalize_patches_inverts_normalize():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 48)).astype(np.float32) * rng.uniform(0.1, 3, (3, 5, 1)) + rng.normal(size=(3, 5, 1))
    np.testing.assert_allclose(denormalize_patches(normalize_patches(x), x), x, rtol=1e-5, atol=1e-5)
    # a codebook entry (unit-variance pattern) drawn for a patch takes that patch's mean and std
    code = normalize_patches(rng.normal(size=(48,)).astype(np.float32))
    shown = denormalize_patches(np.broadcast_to(code, x.shape), x)
    np.testing.assert_allclose(shown.mean(-1), x.mean(-1), atol=1e-5)
    np.testing.assert_allclose(shown.std(-1), np.sqrt(x.var(-1) + 1e-6), rtol=1e-4)
    # a flat patch (variance 0) stays flat at its value instead of blowing up
    flat = np.full((1, 1, 48), 0.7, np.float32)
    np.testing.assert_allclose(denormalize_patches(np.ones_like(flat), flat), 0.7 + 1e-3, atol=1e-6)


def test_denormalize_images():
    pixels = np.random.default_rng(1).uniform(size=(2, 4, 4, 3)).astype(np.float32)
    normalised = (pixels - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    np.testing.assert_allclose(denormalize_images(normalised, CIFAR_MEAN, CIFAR_STD), pixels, atol=1e-6)
    assert denormalize_images(np.full((1, 1, 1, 3), 100.0), CIFAR_MEAN, CIFAR_STD).max() == 1.0  # clipped


def test_mask_pixels_row_major_and_composite():
    mask = np.zeros((1, 6), bool)
    mask[0, 4] = True  # 2x3 grid: row 1, column 1
    px = mask_pixels(mask, (2, 3), patch_size=2)
    assert px.shape == (1, 4, 6, 1)
    assert px[0, 2:4, 2:4].all() and px.sum() == 4
    a, b = np.zeros((1, 4, 6, 3)), np.full((1, 4, 6, 3), 0.5)
    out = composite(a, b, px, fade=0.6)
    assert (out[0, 2:4, 2:4] == 0).all() and np.allclose(out[0, 0, 0], 0.5 * 0.4 + 0.6)


def test_grid_png_is_exact(tmp_path):
    """The PNG has the size `grid_size` promises and holds the cells pixel for pixel (no resampling)."""
    rng = np.random.default_rng(2)
    cells = rng.uniform(size=(3, 4, 8, 8, 3)).astype(np.float32)
    scale = 3
    rows = [[upscale(c, scale) for c in row] for row in cells]
    path = tmp_path / "g.png"
    size = save_grid(rows, path, "title line 1\nline 2")
    assert size == grid_size(3, (8, 8), scale) == (HEADER_PX + 3 * 24 + 4 * PAD_PX, 4 * 24 + 5 * PAD_PX)
    with Image.open(path) as im:
        assert (im.size[1], im.size[0]) == size
        png = np.asarray(im.convert("RGB"), np.float32) / 255
    for i in range(3):
        for j in range(len(COLUMNS)):
            y, x = HEADER_PX + PAD_PX + i * (24 + PAD_PX), PAD_PX + j * (24 + PAD_PX)
            np.testing.assert_allclose(png[y : y + 24, x : x + 24], rows[i][j], atol=1 / 255 + 1e-6)
    assert png[:HEADER_PX].min() < 0.5  # the header holds text


def test_bad_input(tmp_path):
    with pytest.raises(ConfigError, match=r"num_images=0 must be an integer in \[1, 256\]"):
        visualize({"run": str(tmp_path), "num_images": 0})
    with pytest.raises(ConfigError, match="does not exist"):
        visualize({"run": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="run is not set"):
        visualize({"run": "???"})  # conf/visualize.yaml without run=...
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        load_run(tmp_path)


def test_pixel_target_panels():
    """Pixel target (per-patch normalised): the target column's masked patches are the original pixels again, the
    visible ones faded; the prediction is drawn at masked patches only; the metric is the MSE at masked patches."""
    import jax

    from sslvit.masking import make_mask_sampler
    from sslvit.models import build_vit
    from sslvit.models.mim import MaskedImageModel
    from sslvit.targets import make_target
    from sslvit.visualize import LoadedRun, compute_panels

    enc = build_vit(
        {
            "model": {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64},
            "stem": {"name": "linear"},
        },
        num_classes=0,
        use_mask_token=True,
    )
    target = make_target("pixel", patch_size=4, normalize=True)
    model = MaskedImageModel(enc, target.num_outputs)
    images = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype(np.float32)
    sampler = make_mask_sampler("random", (4, 4), 0.5)
    mask = sampler(np.random.default_rng(0), 2)
    variables = jax.jit(model.init)(jax.random.key(0), images[:1], mask[:1])
    lr = LoadedRun(
        run_dir=None,
        step=0,
        config={},
        model=model,
        variables=variables,
        target=target,
        target_state={},
        sampler=sampler,
        image_size=16,
        patch_size=4,
        grid_hw=(4, 4),
        data_cfg=None,
    )
    p = compute_panels(lr, images, mask, CIFAR_MEAN, CIFAR_STD)
    shown = denormalize_images(images, CIFAR_MEAN, CIFAR_STD)
    px = mask_pixels(mask, (4, 4), 4)[..., 0]
    np.testing.assert_allclose(p.image, shown)
    np.testing.assert_allclose(p.target[px], shown[px], atol=1e-4)  # normalised pixels, rescaled back
    np.testing.assert_allclose(p.target[~px], shown[~px] * 0.4 + 0.6, atol=1e-6)
    np.testing.assert_allclose(p.prediction[~px], p.target[~px])
    assert (p.masked[px] == MASK_GREY).all() and p.metric_name == "mse"
    preds = jax.jit(model.apply)(variables, images, mask)
    want = ((np.asarray(preds) - normalize_patches(patchify(images, 4))) ** 2).mean(-1)[mask].mean()
    assert p.metric == pytest.approx(float(want), rel=1e-4)


def _cells(png: np.ndarray, n: int, cell: int) -> np.ndarray:
    """(n, 4, cell, cell, 3) cells of a grid PNG."""

    def cell_at(i, j):
        y, x = HEADER_PX + PAD_PX + i * (cell + PAD_PX), PAD_PX + j * (cell + PAD_PX)
        return png[y : y + cell, x : x + cell]

    return np.stack([np.stack([cell_at(i, j) for j in range(len(COLUMNS))]) for i in range(n)])


def test_visualize_pretraining_run(pretrain_run, hydra_compose, tmp_path):
    out = tmp_path / "grid.png"
    cfg = hydra_compose("visualize", [f"run='{pretrain_run}'", "num_images=3", f"out='{out}'", "seed=5"])
    res = visualize(OmegaConf.to_container(cfg, resolve=True))
    lr = load_run(pretrain_run)
    scale = default_scale(32)
    assert scale == 4 and res["step"] == 60 and res["num_images"] == 3
    with Image.open(out) as im:
        assert (im.size[1], im.size[0]) == res["size"] == grid_size(3, (32, 32), scale)
        png = np.asarray(im.convert("RGB"), np.float32) / 255
    cells = _cells(png, 3, 32 * scale)[..., ::scale, ::scale, :]  # back to 32x32 (nearest upscaling)

    # column 1 is the de-normalised test image; column 2 greys exactly the patches the run's sampler masks
    from sslvit import data as data_lib

    dc = lr.data_cfg
    images = next(iter(data_lib.make_eval_iterator(dc, batch_size=3, image_size=32)))["image"]
    np.testing.assert_allclose(cells[:, 0], denormalize_images(images, dc.mean, dc.std), atol=1.5 / 255)
    mask = lr.sampler(np.random.default_rng(5), 3)
    assert mask.sum(1).tolist() == [lr.sampler.num_masked] * 3
    px = mask_pixels(mask, (8, 8), 4)[..., 0]
    assert np.allclose(cells[:, 1][px], MASK_GREY, atol=1 / 255)
    assert not np.allclose(cells[:, 1][~px], MASK_GREY, atol=1 / 255)

    # a k-means token is drawn as its codebook patch rescaled to the original patch: the target column's masked
    # patches are the quantised originals, so they are close to them (much closer than to a shuffled image)
    orig = patchify(cells[:, 0], 4)
    target = patchify(cells[:, 2], 4)
    err = np.abs(target - orig).mean(-1)[mask]
    shuffled = np.abs(target - np.roll(orig, 1, axis=0)).mean(-1)[mask]
    assert err.mean() < 0.5 * shuffled.mean()
    # the title's accuracy is the fraction of masked patches whose predicted token is drawn as the target one
    pred = patchify(cells[:, 3], 4)
    same = np.abs(pred - target).max(-1)[mask] < 1.5 / 255
    assert res["metric_name"] == "accuracy"
    assert res["metric"] == pytest.approx(same.mean(), abs=1 / mask.sum())
    assert f"{100 * res['metric']:.1f}%" in res["title"]
