"""Linear probe: the pieces on synthetic features (layers, pooling, standardisation, classifiers, k-NN), then a probe
of a short real pretraining run on CIFAR-10 that beats chance, its random-init baseline, and a folder dataset."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from sslvit.config.groups import KnnOptions, ProbeOptions
from sslvit.errors import ConfigError
from sslvit.probe import (
    POOLINGS,
    LinearProbe,
    default_layers,
    get_pooling,
    knn_accuracy,
    linear_probe,
    probe_accuracy,
    resolve_layers,
    standardize,
    train_linear_probes,
)
from sslvit.probe.store import DiskFeatures, FeatureWriter, Standardized, feature_stats


def test_layers_default_and_validation():
    assert default_layers(2) == [1, 2] and default_layers(4) == [1, 2, 3, 4]
    assert default_layers(6) == [2, 4, 6] and default_layers(12) == [2, 4, 6, 8, 10, 12]
    assert default_layers(7) == [1, 3, 5, 7]
    assert resolve_layers(None, 6) == [2, 4, 6]
    assert resolve_layers([-1, 3, 3], 6) == [3, 6] and resolve_layers(2, 6) == [2]
    for bad in ([0], [7], [-7], ["a"], [], [True]):
        with pytest.raises(ConfigError, match="layers="):
            resolve_layers(bad, 6)


def test_pooling():
    tokens = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)  # (B, 1+N, D)
    np.testing.assert_array_equal(get_pooling("cls")(tokens), tokens[:, 0])
    np.testing.assert_allclose(get_pooling("mean")(tokens), tokens[:, 1:].mean(1))
    assert get_pooling("cls+mean")(tokens).shape == (2, 8)
    with pytest.raises(ConfigError, match=r"pool='max' is not a probe pooling: choose one of cls, cls\+mean, mean"):
        get_pooling("max")
    assert set(POOLINGS) == {"cls", "mean", "cls+mean"}
    assert [POOLINGS.get(n).width for n in ("cls", "mean", "cls+mean")] == [1, 1, 2]


def test_standardize_uses_train_statistics():
    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 5.0, size=(2, 500, 4)).astype(np.float32)
    test = rng.normal(3.0, 5.0, size=(2, 100, 4)).astype(np.float32)
    s_train, s_test = standardize(train, test)
    np.testing.assert_allclose(s_train.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(s_train.std(1), 1, atol=1e-3)
    mean, std = train.mean(1, keepdims=True), train.std(1, keepdims=True)
    np.testing.assert_allclose(s_test, (test - mean) / std, rtol=1e-3, atol=1e-3)


def test_classifiers_and_knn_on_synthetic_features():
    """Layer 0 carries the class (separable clusters), layer 1 is noise: each layer's own classifier and k-NN
    must tell them apart, i.e. the per-layer classifiers are trained independently."""
    rng = np.random.default_rng(0)
    n_classes, n, f = 4, 800, 16
    centers = rng.normal(size=(n_classes, f)) * 3
    y = rng.integers(0, n_classes, n).astype(np.int32)
    x = np.stack([centers[y] + rng.normal(size=(n, f)), rng.normal(size=(n, f))]).astype(np.float32)
    xtr, xte = standardize(x[:, :600], x[:, 600:])
    cfg = ProbeOptions.parse({"epochs": 10, "batch_size": 64, "lr": 1e-2})
    params = train_linear_probes(xtr, y[:600], n_classes, cfg, progress=False)
    assert params["w"].shape == (2, f, n_classes)
    acc = probe_accuracy(params, xte, y[600:])
    assert acc[0] > 0.95 and acc[1] < 0.45
    knn = knn_accuracy(xtr, y[:600], xte, y[600:], n_classes, k=10, chunk=64)
    assert knn[0] > 0.95 and knn[1] < 0.45


def _disk_copy(x: np.ndarray, directory, parts=(700, 500)) -> DiskFeatures:
    """x (L, n, F) written as a 2-process run writes it: each part's rows, out of order within the part."""
    start = 0
    for p, rows in enumerate(parts):
        w = FeatureWriter(directory, p)
        for a in sorted(range(0, rows, 128), reverse=True):
            b = min(a + 128, rows)
            w.write(a, x[:, start + a : start + b].transpose(1, 0, 2))
        w.close()
        start += rows
    return DiskFeatures(directory, parts, x.shape[0], x.shape[2])


def test_features_on_disk_train_like_features_in_memory(tmp_path):
    """The same classifiers, accuracies and k-NN from features on disk as from the same features in memory, with a
    memory budget that holds them all (one window: a permutation of the whole split per epoch) and with one that holds
    a fraction (shuffled chunks); the statistics are those of the whole-array standardisation."""
    import sslvit.probe.classifiers as classifiers

    rng = np.random.default_rng(0)
    n_classes, n, f = 4, 1200, 8
    y = rng.integers(0, n_classes, n).astype(np.int32)
    x = np.stack([np.eye(n_classes, f)[y] * 3 + rng.normal(size=(n, f)), rng.normal(size=(n, f))]).astype(np.float32)
    disk = _disk_copy(x, tmp_path / "train")
    np.testing.assert_array_equal(disk.read(650, 760), x[:, 650:760])  # across the two files
    mean, std = feature_stats(disk)
    np.testing.assert_allclose(mean[:, 0], x.mean(1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std[:, 0], x.std(1), rtol=1e-5)
    in_memory = standardize(x)[0]
    on_disk = Standardized(disk, mean, std)
    np.testing.assert_array_equal(on_disk.read(0, n), in_memory)

    cfg = ProbeOptions.parse({"epochs": 3, "batch_size": 64, "lr": 1e-2})
    row_bytes = 2 * f * 4
    for memory in (None, 2 * 300 * row_bytes):  # all rows, then windows of 300 rows out of 1200
        plan = classifiers.plan_windows(n, row_bytes, 64, 3, 0, memory)
        assert len(plan.windows[0]) == (1 if memory is None else 4)
        a = train_linear_probes(in_memory, y, n_classes, cfg, progress=False, memory_bytes=memory)
        b = train_linear_probes(on_disk, y, n_classes, cfg, progress=False, memory_bytes=memory)
        np.testing.assert_array_equal(a["w"], b["w"])
        np.testing.assert_array_equal(probe_accuracy(a, in_memory, y), probe_accuracy(b, on_disk, y))
        assert probe_accuracy(b, on_disk, y)[0] > 0.9
    # k-NN: a budget of 2 query blocks and bank chunks finds the same neighbours as one pass over everything.
    assert (
        knn_accuracy(on_disk, y, on_disk, y, n_classes, k=5, memory_bytes=2 * 600 * row_bytes).tolist()
        == knn_accuracy(in_memory, y, in_memory, y, n_classes, k=5).tolist()
    )
    with pytest.raises(ConfigError, match="probe.memory_mb=.* fewer than probe.batch_size=64"):
        classifiers.plan_windows(n, row_bytes, 64, 1, 0, 2 * 10 * row_bytes)


def test_probe_config_validation():
    for group, cfg, match in (
        (ProbeOptions, {"epochs": 0}, "probe.epochs=0 must be an integer >= 1"),
        (ProbeOptions, {"lr": -1}, r"probe.lr=-1 must be a number in \(0, 10\)"),
        (KnnOptions, {"k": 0}, "knn.k=0 must be an integer >= 1"),
        (ProbeOptions, {"epoch": 3}, "probe.epoch is not a key of probe: the keys are"),
    ):
        with pytest.raises(ConfigError, match=match):
            group.parse(cfg)


# ---------------------------------------------------------------------------------------- with a real run
def _probe_overrides(run, *extra):
    return [
        f"run={run}",
        "data.train_split='train[:1024]'",
        "data.test_split='test[:500]'",
        "probe.epochs=20",
        "progress=false",
        *extra,
    ]


def test_probe_of_pretraining_run_beats_chance(pretrain_run, hydra_compose, tmp_path):
    from sslvit.checkpoint import load_params

    cfg = hydra_compose("linear_probe", _probe_overrides(pretrain_run))
    probe = LinearProbe(cfg, tmp_path)
    assert probe.layers == [1, 2] and probe.encoder_cfg["model"]["dim"] == 64  # rebuilt from the saved config
    # The probed encoder holds the checkpoint's weights.
    saved = load_params(pretrain_run)[0]["encoder"]
    params = probe.variables()["params"]
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["attn"]["qkv_kernel"]), saved["layers"]["attn"]["qkv_kernel"]
    )

    results = probe.run()
    assert results["num_train"] == 1024 and results["num_test"] == 500 and results["feature_dim"] == 128
    assert set(results["top1"]) == {"1", "2"} and set(results["knn_top1"]) == {"1", "2"}
    assert results["best_top1"] == max(results["top1"].values()) > 0.2  # chance: 0.1
    assert results["best_knn_top1"] > 0.15
    assert json.loads((tmp_path / "results.json").read_text())["best_top1"] == results["best_top1"]

    # The random-init baseline: same architecture, other weights, other features.
    base = LinearProbe(hydra_compose("linear_probe", _probe_overrides(pretrain_run, "random_init=true")), tmp_path)
    base_params = base.variables()["params"]
    assert not np.array_equal(
        np.asarray(base_params["layers"]["attn"]["qkv_kernel"]), saved["layers"]["attn"]["qkv_kernel"]
    )


def test_probe_streamed_from_disk_equals_the_in_memory_path(pretrain_run, hydra_compose, tmp_path):
    """The stage (features streamed to the run dir, statistics and windows read back from disk) gives exactly the
    results of the in-memory path on the same split: features in memory, standardised, the same classifiers. With a
    budget of a fraction of the features it streams shuffled chunks and still probes well above chance."""
    import jax

    from sslvit import data as data_lib
    from sslvit.probe import extract_features, make_feature_fn
    from sslvit.train import make_mesh, replicated

    overrides = [
        f"run={pretrain_run}",
        "data.train_split='train[:1024]'",
        "data.test_split='test[:300]'",
        "probe.epochs=5",
        "knn.k=10",
        "progress=false",
    ]
    probe = LinearProbe(hydra_compose("linear_probe", overrides), tmp_path / "disk")
    results = probe.run()
    assert results["windows_per_epoch"] == 1 and results["feature_bytes"] == (1024 + 300) * 2 * 128 * 4
    assert not (tmp_path / "disk" / "features").exists()  # removed once the probe is done

    mesh = make_mesh()
    variables = jax.device_put(probe.variables(), replicated(mesh))
    fn = make_feature_fn(probe.model, probe.layers, probe.pool)
    feats = [
        extract_features(
            fn,
            variables,
            data_lib.make_eval_iterator(probe.data_cfg, split, batch_size=256, image_size=32),
            mesh=mesh,
            progress=False,
        )
        for split in ("train[:1024]", "test[:300]")
    ]
    (xtr, ytr), (xte, yte) = feats
    xtr, xte = standardize(xtr, xte)
    params = train_linear_probes(xtr, ytr, 10, probe.config.probe, seed=0, progress=False)
    expect = {str(layer): float(a) for layer, a in zip(probe.layers, probe_accuracy(params, xte, yte))}
    knn = knn_accuracy(xtr, ytr, xte, yte, 10, k=10)
    assert results["top1"] == expect
    assert results["knn_top1"] == {str(layer): float(a) for layer, a in zip(probe.layers, knn)}

    # 1024 rows of 1 KiB: 0.25 MiB holds windows of 128 rows, 8 windows per epoch.
    with pytest.raises(ConfigError, match="probe.memory_mb=0.25 holds 128 examples .* fewer than probe.batch_size=256"):
        LinearProbe(hydra_compose("linear_probe", overrides + ["probe.memory_mb=0.25"]), tmp_path / "bad").run()
    assert not (tmp_path / "bad").exists()  # before the run dir is made
    small = LinearProbe(
        hydra_compose("linear_probe", overrides + ["probe.memory_mb=0.25", "probe.batch_size=64"]), tmp_path / "small"
    )
    streamed = small.run()
    assert streamed["windows_per_epoch"] == 8 and streamed["knn_top1"] == results["knn_top1"]  # k-NN: same neighbours
    assert streamed["best_top1"] > 0.2 and streamed["top1"] != results["top1"]


def test_probe_on_a_folder_dataset(pretrain_run, hydra_compose, tmp_path):
    """Transfer to the user's own images: two classes of 40x40 PNGs (reddish vs bluish), resized to 32 px."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 10)):
        for c, name in enumerate(("red", "blue")):
            d = tmp_path / "images" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 120, size=(40, 40, 3))
                img[..., 0 if c == 0 else 2] += 120
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
    out = tmp_path / "out"
    results = linear_probe(
        hydra_compose(
            "linear_probe",
            [
                f"run={pretrain_run}",
                "data=folder",
                f"data.path={tmp_path / 'images'}",
                "batch_size=16",
                "probe.epochs=30",
                "probe.batch_size=16",
                "knn.k=5",
                "layers=[-1]",
                "pool=mean",
                "progress=false",
            ],
        ),
        out,
    )
    assert results["num_classes"] == 2 and results["num_train"] == 48 and results["num_test"] == 20
    assert results["layers"] == [2] and results["best_top1"] >= 0.9 and results["best_knn_top1"] >= 0.9
    # Augmented probing: features of new crops and flips every epoch (colour survives them).
    augmented = linear_probe(
        hydra_compose(
            "linear_probe",
            [
                f"run={pretrain_run}",
                "data=folder",
                f"data.path={tmp_path / 'images'}",
                "batch_size=16",
                "probe.epochs=30",
                "probe.batch_size=16",
                "knn.k=5",
                "layers=[-1]",
                "pool=mean",
                "progress=false",
                "probe.augment=true",
                "probe.crop_scale=[0.3,1.0]",
            ],
        ),
        tmp_path / "augmented",
    )
    assert augmented["augment"] is True and augmented["best_top1"] >= 0.9


def test_bad_probe_input(hydra_compose, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        LinearProbe(hydra_compose("linear_probe", [f"run={tmp_path / 'empty'}"]), tmp_path / "out")
    with pytest.raises(ConfigError, match="pool='token' is not a probe pooling"):
        LinearProbe(hydra_compose("linear_probe", [f"run={tmp_path / 'empty'}", "pool=token"]), tmp_path / "out")
