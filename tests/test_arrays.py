"""The arrays source (`.npz` datasets in memory, no TensorFlow) and its on-device training path: the files the
materialize tool writes hold the tfds dataset exactly, the host iterators are deterministic and resumable, the
device path makes the host iterators' batches, bad files are one-line errors, and pretraining, probe and
fine-tuning run end to end with TensorFlow blocked from import."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import requires_cifar10, run_without_tensorflow
from omegaconf import OmegaConf

from sslvit import data
from sslvit.data import ondevice
from sslvit.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
ONE = dict(process_index=0, process_count=1)


def arrays_cfg(path, **overrides):
    cfg = OmegaConf.load(CONF / "cifar10_arrays.yaml")
    cfg.path = str(path)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def write(path: Path, name: str, images, labels, **extra):
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / f"{name}.npz", image=images, label=labels, **extra)


# ------------------------------------------------------------------------------------------------ the files
@requires_cifar10
def test_materialized_arrays_hold_the_tfds_dataset(cifar10_arrays, tfds_cifar10):
    """`python -m sslvit.data.materialize` writes what tfds reads: evaluation batches of the arrays source equal
    the tf.data pipeline's, image for image, label for label; the class names travel with the file."""
    info = data.dataset_info(arrays_cfg(cifar10_arrays))
    assert (info.num_classes, info.num_train, info.num_test, info.image_shape) == (10, 2048, 512, (32, 32, 3))
    assert info.class_names[0] == "airplane" and info.class_names[-1] == "truck"
    tf_cfg = OmegaConf.load(CONF / "cifar10.yaml")
    tf_cfg.test_split = "test[:512]"
    kw = dict(batch_size=200, image_size=32, **ONE)
    ours, theirs = (
        list(data.make_eval_iterator(arrays_cfg(cifar10_arrays), **kw)),
        list(data.make_eval_iterator(tf_cfg, **kw)),
    )
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a["valid"], b["valid"])
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_allclose(a["image"], b["image"], atol=1e-5)
    assert sum(int(b["valid"].sum()) for b in ours) == 512


def test_bad_files_and_keys_are_one_line_errors(tmp_path):
    images, labels = np.zeros((8, 4, 4, 3), np.uint8), np.arange(8) % 2
    write(tmp_path / "ok", "train", images, labels)
    write(tmp_path / "float", "train", images.astype(np.float32), labels)
    write(tmp_path / "short", "train", images, labels[:5])
    write(tmp_path / "nolabel", "train", images, labels)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train.npz").write_bytes(b"not a zip file")
    cases = [
        (dict(path=str(tmp_path / "missing")), "data.path=.*does not exist"),
        (
            dict(path=str(tmp_path / "ok"), train_split="training"),
            r"data.train_split='training': no file .*splits "
            r"here: train",
        ),
        (dict(path=str(tmp_path / "float")), r"'image' must be uint8 \(N, H, W, 3\), got float32"),
        (dict(path=str(tmp_path / "short")), r"'label' must be integers \(N,\) with N = 8"),
        (dict(path=str(tmp_path / "nolabel"), label_key="y"), "has no array 'y' \\(data.label_key\\)"),
        (dict(path=str(tmp_path / "broken")), "is not a readable .npz file"),
        (dict(path=str(tmp_path / "ok"), train_split="train[8:]"), r"selects no examples out of 8"),
        (dict(path=str(tmp_path / "ok"), num_classes=3), "data.num_classes=3 but cifar10 has 2 classes"),
    ]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match) as err:
            data.dataset_info(arrays_cfg(overrides.pop("path"), **{"num_classes": None, **overrides}))
        assert "\n" not in str(err.value)
    cfg = arrays_cfg(tmp_path / "ok")
    cfg.path = None
    with pytest.raises(ConfigError, match="data.path is not set"):
        data.dataset_info(cfg)


def test_slices_shards_greyscale_and_resize(tmp_path):
    """Split slices and process shards select the intended rows; greyscale files read as RGB; evaluation at another
    size centre-crops and resizes (8 px digits-sized images probed at 32 px)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 8, 8, 1), dtype=np.uint8)
    write(tmp_path, "train", images, np.arange(100) % 10)
    write(tmp_path, "test", images[:30], np.arange(30) % 10)
    cfg = arrays_cfg(
        tmp_path,
        train_split="train[10:60%]",
        test_split="test[:25]",
        num_classes=None,
        mean=[0.0, 0.0, 0.0],
        std=[1.0, 1.0, 1.0],
    )
    info = data.dataset_info(cfg)
    assert (info.num_train, info.num_test, info.num_classes, info.image_shape) == (50, 25, 10, (8, 8, 3))
    source = data.create_source(cfg)
    shards = [source.arrays(cfg.train_split, i, 3, True)["label"] for i in range(3)]
    assert [len(s) for s in shards] == [16, 16, 16]
    np.testing.assert_array_equal(np.concatenate(shards), (np.arange(10, 58) % 10))
    plain = list(data.make_eval_iterator(cfg, batch_size=10, image_size=8, **ONE))
    assert len(plain) == 3 and [int(b["valid"].sum()) for b in plain] == [10, 10, 5]
    np.testing.assert_allclose(plain[0]["image"][..., 1] * 255, images[:10, ..., 0], atol=1e-4)  # grey -> RGB
    big = next(data.make_eval_iterator(cfg, batch_size=10, image_size=32, **ONE))["image"]
    assert big.shape == (10, 32, 32, 3)
    np.testing.assert_allclose(big.mean(axis=(1, 2)), plain[0]["image"].mean(axis=(1, 2)), atol=0.02)


# ------------------------------------------------------------------------------------------------ training batches
def test_rrc_windows_fit_and_cover_the_scale_range():
    y, x, h, w = (np.asarray(v) for v in ondevice.rrc_windows(jax.random.key(1), 4096, 32, 48, (0.2, 1.0)))
    assert (y >= 0).all() and (x >= 0).all() and (y + h <= 32).all() and (x + w <= 48).all()
    assert (h >= 1).all() and (w >= 1).all() and (np.round(h) == h).all()
    frac = h * w / (32 * 48)
    assert frac.min() > 0.15 and frac.max() <= 1.0 and frac.std() > 0.15
    assert (w / h > 0.6).all() and (w / h < 1.6).all()


@requires_cifar10
def test_full_crop_is_identity_or_mirror(cifar10_arrays):
    """crop_scale (1, 1) keeps the whole image: each augmented image is the plain one or its mirror image."""
    cfg = arrays_cfg(cifar10_arrays)
    kw = dict(batch_size=128, image_size=32, seed=2, **ONE)
    aug = next(data.make_train_iterator(cfg, crop_scale=(1.0, 1.0), **kw))["image"]
    plain = next(data.make_train_iterator(cfg, augment=False, **kw))["image"]
    same = np.isclose(aug, plain, atol=1e-4).all(axis=(1, 2, 3))
    mirrored = np.isclose(aug, plain[:, :, ::-1], atol=1e-4).all(axis=(1, 2, 3))
    assert (same | mirrored).all() and 0.3 < mirrored.mean() < 0.7


@requires_cifar10
def test_host_batches_are_deterministic_resumable_and_epochs_are_permutations(cifar10_arrays):
    cfg = arrays_cfg(cifar10_arrays, train_split="train[:256]")
    kw = dict(batch_size=64, image_size=32, **ONE)
    a = [next(it) for it in [data.make_train_iterator(cfg, seed=3, **kw)] for _ in range(8)]
    b = data.make_train_iterator(cfg, seed=3, start_step=5, **kw)
    for i in range(5, 8):
        batch = next(b)
        np.testing.assert_array_equal(batch["image"], a[i]["image"])
        np.testing.assert_array_equal(batch["label"], a[i]["label"])
    other = next(data.make_train_iterator(cfg, seed=4, **kw))
    assert not np.array_equal(other["label"], a[0]["label"])
    # Each epoch (4 steps of 64 = the 256 images) shows every image once, in another order each epoch.
    plain = data.make_train_iterator(cfg, seed=3, augment=False, **kw)
    epochs = [np.concatenate([next(plain)["image"] for _ in range(4)]) for _ in range(2)]
    rows = [{r.tobytes() for r in e} for e in epochs]
    assert len(rows[0]) == 256 and rows[0] == rows[1]
    assert not np.array_equal(epochs[0], epochs[1])
    assert a[0]["image"].dtype == np.float32 and abs(float(epochs[0].mean())) < 0.3  # normalised


@requires_cifar10
@pytest.mark.parametrize("with_labels", [False, True])
def test_device_path_makes_the_host_iterators_batches(cifar10_arrays, with_labels):
    """Step k of the device path (index batch -> gather, crop, flip, normalise inside the step, keyed by the step's
    key) equals batch k of the host iterator, for pretraining (images) and fine-tuning (images and labels)."""
    cfg = data.DataConfig.from_cfg(arrays_cfg(cifar10_arrays, train_split="train[:512]"))
    from sslvit.data.arrays import device_data

    dd = device_data(cfg, batch_size=64, image_size=32, crop_scale=(0.08, 1.0), seed=7, with_labels=with_labels)
    host = data.make_train_iterator(cfg, batch_size=64, image_size=32, seed=7, crop_scale=(0.08, 1.0), **ONE)
    transform = jax.jit(dd.transform)
    for step, (index_batch, expected) in enumerate(zip(dd.index_batches(0), host)):
        made = transform(dd.arrays(), {**index_batch, "mask": np.zeros(64, bool)}, ondevice.step_key(7, step))
        assert sorted(made) == (["image", "label", "mask"] if with_labels else ["image", "mask"])
        np.testing.assert_allclose(np.asarray(made["image"]), expected["image"], atol=1e-5)
        if with_labels:
            np.testing.assert_array_equal(np.asarray(made["label"]), expected["label"])
        if step == 9:  # past the first epoch (8 steps)
            break
    # The step's key as the train step derives it: fold_in(key(seed), step), then the augmentation stream.
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 3), ondevice.AUGMENT_STREAM)
    assert np.array_equal(jax.random.key_data(key), jax.random.key_data(ondevice.step_key(7, 3)))
    # Two processes take the two halves of the same global batch.
    halves = [next(dd.index_batches(5, i, 2))["index"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), next(dd.index_batches(5))["index"])


# ------------------------------------------------------------------------------------------------ end to end
@requires_cifar10
@pytest.mark.slow
def test_pretrain_probe_and_finetune_run_with_tensorflow_blocked(cifar10_arrays, tmp_path):
    """On a host with only the JAX stack: `import tensorflow` fails (sys.modules entries set to None) and the three
    stages still run on the arrays source, loading no TensorFlow module."""
    out = run_without_tensorflow(
        [
            "data=cifar10_arrays",
            f"data.path={cifar10_arrays}",
            "data.train_split='train[:512]'",
            "data.test_split='test[:100]'",
        ],
        tmp_path,
    )
    assert out["tensorflow_modules"] == []
    pre, probe, ft = out["results"]["pretrain"], out["results"]["probe"], out["results"]["finetune"]
    assert pre["steps"] == 4 and np.isfinite(pre["train_loss"]) and pre["test_batches"] == 2
    assert probe["num_train"] == 512 and probe["num_test"] == 100 and 0 <= probe["best_top1"] <= 1
    assert ft["steps"] == 4 and np.isfinite(ft["train_loss"]) and ft["test_examples"] == 64
    for stage in ("pretrain", "finetune"):
        assert (tmp_path / stage / "checkpoints" / "4").is_dir() and (tmp_path / stage / "metrics.jsonl").is_file()
