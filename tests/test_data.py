"""Tests for sslvit.data: the input pipelines (tf.data for tfds and image folders, Pillow's for image folders).

Integration tests read the real CIFAR-10 from $TFDS_DATA_DIR (skipped with the reason when it is not there);
unit tests use tfds.testing.mock_data and small image folders written into tmp_path.
"""

from __future__ import annotations

import collections
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cifar10_dir, requires_cifar10, run_without_tensorflow
from omegaconf import OmegaConf
from PIL import Image

from sslvit import data
from sslvit.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
ONE = dict(process_index=0, process_count=1)


def cifar_cfg(**overrides):
    cfg = OmegaConf.load(CONF / "cifar10.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- CIFAR-10 (real)


@requires_cifar10
def test_cifar_info_from_metadata():
    info = data.dataset_info(cifar_cfg())
    assert (info.num_classes, info.num_train, info.num_test) == (10, 50_000, 10_000)
    assert info.class_names[0] == "airplane" and info.class_names[-1] == "truck"
    assert info.image_shape == (32, 32, 3)
    assert data.dataset_info(cifar_cfg(train_split="train[:256]")).num_train == 256
    assert info.steps_per_epoch(128, process_count=2) == 25_000 // 128


@requires_cifar10
def test_cifar_train_batches_shapes_and_normalisation():
    cfg = cifar_cfg(train_split="train[:1024]")
    plain = data.make_train_iterator(cfg, batch_size=128, image_size=32, seed=0, augment=False, **ONE)
    images = np.concatenate([b["image"] for b in take(plain, 8)])
    # CIFAR-10's own statistics normalise it to roughly zero mean, unit variance per channel.
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=0.1)
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, atol=0.1)

    aug = data.make_train_iterator(cfg, batch_size=128, image_size=32, seed=0, **ONE)
    assert aug.steps_per_epoch == 8
    batch = next(aug)
    assert batch["image"].shape == (128, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (128,) and batch["label"].dtype == np.int32
    assert set(np.unique(batch["label"])) <= set(range(10))
    assert np.isfinite(batch["image"]).all()
    # Pixels stay within the normalised [0, 255] range after crop/resize interpolation.
    lo = (0 - np.array(cfg.mean)) / np.array(cfg.std)
    hi = (1 - np.array(cfg.mean)) / np.array(cfg.std)
    assert (batch["image"] >= lo - 1e-4).all() and (batch["image"] <= hi + 1e-4).all()

    # Another model resolution (fine-tuning at 48 px): both transforms give 48 x 48.
    for augment in (True, False):
        b = next(data.make_train_iterator(cfg, batch_size=16, image_size=48, seed=0, augment=augment, **ONE))
        assert b["image"].shape == (16, 48, 48, 3)


@requires_cifar10
def test_cifar_full_crop_is_identity_or_mirror():
    """crop_scale (1, 1) keeps the whole image: each augmented image is the plain one or its mirror image."""
    cfg = cifar_cfg(train_split="train[:256]")
    kwargs = dict(batch_size=128, image_size=32, seed=2, **ONE)
    aug = next(data.make_train_iterator(cfg, crop_scale=(1.0, 1.0), **kwargs))["image"]
    plain = next(data.make_train_iterator(cfg, augment=False, **kwargs))["image"]
    same = np.isclose(aug, plain, atol=1e-4).all(axis=(1, 2, 3))
    mirrored = np.isclose(aug, plain[:, :, ::-1], atol=1e-4).all(axis=(1, 2, 3))
    assert (same | mirrored).all()
    assert 0.3 < mirrored.mean() < 0.7


@requires_cifar10
def test_cifar_determinism_and_epochs_are_permutations():
    cfg = cifar_cfg(train_split="train[:256]")
    a = take(data.make_train_iterator(cfg, batch_size=64, image_size=32, seed=3, **ONE), 8)
    b = take(data.make_train_iterator(cfg, batch_size=64, image_size=32, seed=3, **ONE), 8)
    c = take(data.make_train_iterator(cfg, batch_size=64, image_size=32, seed=4, **ONE), 8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    assert not np.array_equal(a[0]["label"], c[0]["label"])

    # Each epoch (4 steps of 64 = the 256 examples) visits every example once, in a new order.
    reference = collections.Counter(
        int(y)
        for batch in data.make_eval_iterator(cfg, "train[:256]", batch_size=64, image_size=32, **ONE)
        for y in batch["label"]
    )
    epoch0 = np.concatenate([x["label"] for x in a[:4]])
    epoch1 = np.concatenate([x["label"] for x in a[4:]])
    assert collections.Counter(epoch0.tolist()) == reference == collections.Counter(epoch1.tolist())
    assert not np.array_equal(epoch0, epoch1)
    plain = take(data.make_train_iterator(cfg, batch_size=64, image_size=32, seed=3, augment=False, **ONE), 4)
    assert len({digest(im) for x in plain for im in x["image"]}) == 256


@requires_cifar10
@pytest.mark.parametrize("cache", [True, False])
def test_cifar_resume_equals_fresh_iterator(cache):
    """start_step=k yields batch k of a fresh iterator, bit for bit, also across epoch boundaries."""
    cfg = cifar_cfg(train_split="train[:256]", cache=cache, shuffle_buffer=100)
    fresh = take(data.make_train_iterator(cfg, batch_size=64, image_size=32, seed=7, **ONE), 10)
    for k in (3, 4, 6):  # end of epoch 0, start of epoch 1, mid epoch 1; the 2 batches span a boundary
        resumed = data.make_train_iterator(cfg, batch_size=64, image_size=32, seed=7, start_step=k, **ONE)
        assert resumed.step == k and resumed.epoch == k // 4
        for j, batch in enumerate(take(resumed, 2)):
            np.testing.assert_array_equal(batch["image"], fresh[k + j]["image"])
            np.testing.assert_array_equal(batch["label"], fresh[k + j]["label"])


@requires_cifar10
def test_cifar_eval_counts_each_example_once():
    import tensorflow_datasets as tfds

    cfg = cifar_cfg()
    raw = tfds.load("cifar10", split="test[:300]", data_dir=cifar10_dir(), batch_size=-1)
    raw_labels, raw_images = raw["label"].numpy(), raw["image"].numpy()
    expected = collections.Counter(raw_labels.tolist())

    it = data.make_eval_iterator(cfg, "test[:300]", batch_size=128, image_size=32, **ONE)
    batches = list(it)
    assert len(it) == len(batches) == 3
    assert all(b["image"].shape == (128, 32, 32, 3) and b["valid"].dtype == bool for b in batches)
    valid = np.concatenate([b["valid"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[valid]
    assert valid.sum() == 300 and not valid[300:].any()
    assert collections.Counter(labels.tolist()) == expected
    # No augmentation at the native size: exactly the stored pixels, normalised.
    first = (raw_images[0] / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(batches[0]["image"][0], first, atol=1e-5)

    # Sharded over 3 processes: the same number of batches each, every example exactly once overall.
    shards = [
        list(data.make_eval_iterator(cfg, "test[:300]", batch_size=64, image_size=32, process_index=i, process_count=3))
        for i in range(3)
    ]
    assert {len(s) for s in shards} == {2}
    seen = [
        (digest(im), int(y))
        for shard in shards
        for b in shard
        for im, y, v in zip(b["image"], b["label"], b["valid"])
        if v
    ]
    assert len(seen) == 300 and len(set(seen)) == len(set(digest(im) for im in raw_images))
    assert collections.Counter(y for _, y in seen) == expected


@requires_cifar10
def test_cifar_train_shards_are_disjoint():
    cfg = cifar_cfg(train_split="train[:256]")
    shards = []
    for pi in range(2):
        it = data.make_train_iterator(
            cfg, batch_size=32, image_size=32, seed=0, augment=False, process_index=pi, process_count=2
        )
        assert it.steps_per_epoch == 4 and it.num_examples == 128
        shards.append({digest(im) for b in take(it, 4) for im in b["image"]})
    assert len(shards[0]) == len(shards[1]) == 128 and not shards[0] & shards[1]
    # Default process index/count come from JAX (one process here).
    assert data.make_train_iterator(cfg, batch_size=256, image_size=32, seed=0).steps_per_epoch == 1


@requires_cifar10
def test_batch_larger_than_split_is_rejected():
    with pytest.raises(ConfigError, match="batch_size=512"):
        data.make_train_iterator(cifar_cfg(train_split="train[:256]"), batch_size=512, image_size=32, seed=0, **ONE)
    with pytest.raises(ConfigError, match="data.train_split='trian'"):
        data.dataset_info(cifar_cfg(train_split="trian"))
    with pytest.raises(ConfigError, match="data.num_classes=100"):
        data.dataset_info(cifar_cfg(num_classes=100))


# ------------------------------------------------------------------------------------------ tfds mock (no env)


def test_mock_tfds_pipeline(tmp_path):
    """The tfds code path end to end on tfds' own mock data (random PNGs with cifar10's features)."""
    import tensorflow_datasets as tfds

    n = 96
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))  # metadata only: mock_data reads split sizes
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0, filename_template=None)
                for name in ("train", "test")
            ]
        )
    )
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)

    cfg = cifar_cfg(data_dir="/nonexistent/ignored/by/mock", cache=False)
    with tfds.testing.mock_data(num_examples=n, data_dir=str(tmp_path)):
        info = data.dataset_info(cfg)
        assert (info.num_train, info.num_test, info.num_classes) == (n, n, 10)
        it = data.make_train_iterator(cfg, batch_size=32, image_size=24, seed=1, **ONE)
        batches = take(it, 4)  # crosses the epoch boundary (3 steps per epoch)
        assert it.steps_per_epoch == 3 and it.epoch == 1
        assert batches[0]["image"].shape == (32, 24, 24, 3) and batches[0]["label"].dtype == np.int32
        assert ((batches[0]["label"] >= 0) & (batches[0]["label"] < 10)).all()
        resumed = next(data.make_train_iterator(cfg, batch_size=32, image_size=24, seed=1, start_step=3, **ONE))
        np.testing.assert_array_equal(resumed["image"], batches[3]["image"])
        ev = list(data.make_eval_iterator(cfg, batch_size=40, image_size=24, **ONE))
        assert len(ev) == 3 and sum(int(b["valid"].sum()) for b in ev) == n


def test_missing_dataset_fails_fast_and_clearly(tmp_path):
    empty = tmp_path / "tfds"
    empty.mkdir()
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        data.dataset_info(cifar_cfg(data_dir=str(empty), download=False))
    message = str(err.value)
    assert f"dataset 'cifar10' not found in data_dir '{empty}'" in message
    assert "TFDS_DATA_DIR" in message and "\n" not in message
    assert time.monotonic() - start < 10


def test_missing_dataset_with_download_allowed_fails_fast_offline(tmp_path):
    if data.network_problem() is None:
        pytest.skip("this machine reaches the internet: tfds would really download CIFAR-10")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"could not be downloaded \(no network"):
        data.dataset_info(cifar_cfg(data_dir=str(tmp_path)))
    assert time.monotonic() - start < 15


def test_unknown_tfds_name():
    with pytest.raises(ConfigError, match=r"data.name='cifar1O' is not a tfds dataset \(did you mean cifar10"):
        data.dataset_info(cifar_cfg(name="cifar1O"))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"on_corrupt": "ignore"}, "data.on_corrupt='ignore' must be one of error, skip"),
        ({"crop_scale": [0.8, 0.2]}, r"data.crop_scale=\[0.8, 0.2\] must satisfy"),
        ({"mean": [125.3, 123.0, 113.9]}, "data.mean=.* in \\[0, 1\\] pixel units"),
        ({"std": [0.2, 0.2]}, "data.std=.* list of 3 numbers"),
        ({"shuffle_buffer": 0}, "data.shuffle_buffer=0 must be an integer >= 1"),
        ({"eval_crop_pct": 1.5}, r"data.eval_crop_pct=1.5 must be a number in \[0.25, 1\]"),
        ({"shufle_buffer": 10}, "data.shufle_buffer is not a key of data"),
    ],
)
def test_bad_config_values_rejected_in_one_line(overrides, match):
    cfg = {**OmegaConf.to_container(OmegaConf.load(CONF / "cifar10.yaml")), **overrides}
    with pytest.raises(ConfigError, match=match) as err:
        data.DataConfig.from_cfg(cfg)
    assert "\n" not in str(err.value)


def test_all_data_configs_parse(tmp_path):
    for name in ("cifar10", "imagenet2012", "folder"):
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        if name == "folder":
            with pytest.raises(ConfigError, match=r"data.path is not set: pass data.path=\.\.\. \(the folder"):
                data.DataConfig.from_cfg(cfg)
            cfg.path = str(tmp_path)
        dc = data.DataConfig.from_cfg(cfg)
        assert dc.name == name and dc.source_name == ("folder" if name == "folder" else "tfds")
    with pytest.raises(ConfigError, match="crop_scale"):
        next(data.make_train_iterator(cifar_cfg(), batch_size=8, image_size=32, seed=0, crop_scale=(0, 1), **ONE))


def test_rrc_windows_fit_and_cover_the_scale_range():
    import tensorflow as tf

    h = tf.constant([32] * 512 + [480] * 512)
    w = tf.constant([32] * 512 + [640] * 512)
    y, x, hh, ww = (v.numpy() for v in data.rrc_windows(tf.constant([1, 2], tf.int64), h, w, (0.2, 1.0)))
    h, w = h.numpy(), w.numpy()
    assert (y >= 0).all() and (x >= 0).all() and (y + hh <= h).all() and (x + ww <= w).all()
    frac = hh * ww / (h * w)
    assert frac.min() > 0.15 and frac.max() <= 1.0 and frac.std() > 0.15
    aspect = ww / hh
    assert (aspect > 0.6).all() and (aspect < 1.6).all()


# ------------------------------------------------------------------------------------------------ image folders


def _write(path: Path, color, size, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    img = np.clip(np.array(color)[None, None] + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(img.astype(np.uint8)).save(path, fmt)


@pytest.fixture
def folder(tmp_path):
    """2 classes; 'cat' images reddish, 'dog' images bluish; mixed sizes and formats."""
    root = tmp_path / "images"
    sizes = [(40, 30), (64, 64), (30, 50)]
    for split, count in (("train", 10), ("test", 5)):
        for cls, color in (("cat", (220, 30, 30)), ("dog", (30, 30, 220))):
            for i in range(count):
                fmt = "PNG" if i % 2 else "JPEG"
                ext = ".png" if fmt == "PNG" else (".jpg" if i % 4 else ".JPEG")
                _write(root / split / cls / f"{i}{ext}", color, sizes[i % 3], fmt)
    (root / "train" / "cat" / "notes.txt").write_text("not an image: ignored by extension")
    return root


def folder_cfg(root, **overrides):
    cfg = OmegaConf.load(CONF / "folder.yaml")
    cfg.path = str(root)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.fixture(params=["pil", "tf"])
def pipeline(request):
    """Both pipelines that read image files (data.pipeline): Pillow's (the folder default) and tf.data's."""
    return request.param


def _reddish(images):  # normalised images -> True where red dominates blue (a 'cat')
    return images[..., 0].mean(axis=(1, 2)) > images[..., 2].mean(axis=(1, 2))


def test_folder_labels_class_names_and_eval(folder, pipeline):
    cfg = folder_cfg(folder, pipeline=pipeline)
    info = data.dataset_info(cfg)
    assert info.class_names == ("cat", "dog") and info.num_classes == 2
    assert (info.num_train, info.num_test, info.num_skipped) == (20, 10, 0)

    batches = list(data.make_eval_iterator(cfg, batch_size=4, image_size=16, **ONE))
    assert len(batches) == 3  # 10 examples, padded to 12
    valid = np.concatenate([b["valid"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[valid]
    images = np.concatenate([b["image"] for b in batches])[valid]
    assert valid.sum() == 10 and sorted(labels.tolist()) == [0] * 5 + [1] * 5
    np.testing.assert_array_equal(_reddish(images), labels == 0)  # label 0 = 'cat' = the red images

    it = data.make_train_iterator(cfg, batch_size=8, image_size=16, seed=0, **ONE)
    assert it.steps_per_epoch == 2
    batch = next(it)
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
    np.testing.assert_array_equal(_reddish(batch["image"]), batch["label"] == 0)


@pytest.mark.parametrize("cache", [False, True])
def test_folder_deterministic_and_resumable(folder, cache, pipeline):
    cfg = folder_cfg(folder, cache=cache, pipeline=pipeline)
    fresh = take(data.make_train_iterator(cfg, batch_size=8, image_size=16, seed=5, **ONE), 5)
    again = take(data.make_train_iterator(cfg, batch_size=8, image_size=16, seed=5, **ONE), 5)
    for x, y in zip(fresh, again):
        np.testing.assert_array_equal(x["image"], y["image"])
    other = next(data.make_train_iterator(cfg, batch_size=8, image_size=16, seed=6, **ONE))
    assert not np.array_equal(other["image"], fresh[0]["image"])
    one_thread = take(
        data.make_train_iterator(
            folder_cfg(folder, cache=cache, threads=1, pipeline=pipeline), batch_size=8, image_size=16, seed=5, **ONE
        ),
        2,
    )  # a private pool of 1 thread
    for x, y in zip(one_thread, fresh):
        np.testing.assert_array_equal(x["image"], y["image"])
    for k in (1, 2, 3):  # 2 steps per epoch: k=2 starts epoch 1
        resumed = take(data.make_train_iterator(cfg, batch_size=8, image_size=16, seed=5, start_step=k, **ONE), 2)
        for j, batch in enumerate(resumed):
            np.testing.assert_array_equal(batch["image"], fresh[k + j]["image"])
            np.testing.assert_array_equal(batch["label"], fresh[k + j]["label"])


def test_folder_full_crop_is_identity_or_mirror(tmp_path, pipeline):
    ramp = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 1, 3))
    for i in range(8):
        path = tmp_path / "train" / "a" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(ramp, i, axis=0)).save(path)
    cfg = folder_cfg(tmp_path, eval_crop_pct=1.0, pipeline=pipeline)  # plain transform = the 16 x 16 image itself
    kwargs = dict(batch_size=8, image_size=16, seed=0, **ONE)
    aug = next(data.make_train_iterator(cfg, crop_scale=(1.0, 1.0), **kwargs))["image"]
    plain = next(data.make_train_iterator(cfg, augment=False, **kwargs))["image"]
    mirrored = np.isclose(aug, plain[:, :, ::-1], atol=1e-4).all(axis=(1, 2, 3))
    assert (mirrored | np.isclose(aug, plain, atol=1e-4).all(axis=(1, 2, 3))).all()
    assert 0 < mirrored.sum() < 8


def _corrupt(folder):
    good = folder / "train" / "dog" / "0.JPEG"
    bad = folder / "train" / "dog" / "broken.jpg"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated JPEG
    (folder / "test" / "cat" / "empty.png").write_bytes(b"")
    return bad


def test_folder_corrupt_image_error_names_the_file(folder):
    bad = _corrupt(folder)
    with pytest.raises(ConfigError, match=f"corrupt or unreadable image '{bad}'") as err:
        data.dataset_info(folder_cfg(folder))
    assert "data.on_corrupt=skip" in str(err.value) and "\n" not in str(err.value)


def test_folder_corrupt_images_skipped_and_counted(folder, pipeline):
    bad = _corrupt(folder)
    cfg = folder_cfg(folder, on_corrupt="skip", pipeline=pipeline)
    info = data.dataset_info(cfg)
    assert info.num_skipped == 2 and str(bad) in info.skipped_files
    assert (info.num_train, info.num_test) == (20, 10)
    ev = list(data.make_eval_iterator(cfg, batch_size=16, image_size=16, **ONE))
    assert sum(int(b["valid"].sum()) for b in ev) == 10
    it = data.make_train_iterator(cfg, batch_size=10, image_size=16, seed=0, **ONE)
    assert len(take(it, 4)) == 4  # two epochs without touching the broken files


def _new_start():
    """What a new process sees: no scan of this process to reuse (the on-disk manifest stays)."""
    from sslvit.data import folder as folder_source

    folder_source._SCANS.clear()


def _checked(caplog) -> list[tuple[int, int]]:
    """(checked, listed) of each 'checking N of M images' log line since the last clear."""
    import re

    found = [re.search(r"checking (\d+) of (\d+) images", r.getMessage()) for r in caplog.records]
    return [(int(m.group(1)), int(m.group(2))) for m in found if m]


def test_folder_manifest_spares_the_check_at_the_next_start(folder, caplog):
    """The first start checks every image and writes the verdicts beside the data; a later start checks only what is
    new or changed, and still leaves out (and counts) the corrupt file it checked before."""
    import logging

    caplog.set_level(logging.INFO, logger="sslvit.data.folder")
    cfg = folder_cfg(folder, on_corrupt="skip")
    bad = _corrupt(folder)
    first = data.dataset_info(cfg)
    assert _checked(caplog) == [(21, 21), (11, 11)] and first.num_skipped == 2
    assert sorted(p.name for p in (folder / ".sslvit").iterdir()) == ["manifest-test.npz", "manifest-train.npz"]
    # The canonical order is that of sorted(rglob): runs started before the manifest existed read the same order.
    files = data.create_source(cfg).files("train", 0, 1, False, None)
    old_order = sorted(str(p) for p in (folder / "train").rglob("*") if p.suffix in (".jpg", ".JPEG", ".png"))
    old_order = [p for p in (str(q) for q in sorted((folder / "train").rglob("*"))) if p in old_order and p != str(bad)]
    assert [old_order[i] for i in np.random.default_rng(0).permutation(len(old_order))] == files

    caplog.clear()
    _new_start()
    again = data.dataset_info(cfg)
    assert _checked(caplog) == [] and again == first  # nothing decoded, the same verdicts

    # One changed file (now corrupt) and one new file: only those two are checked.
    (folder / "train" / "cat" / "1.png").write_bytes(b"not a png any more")
    _write(folder / "train" / "cat" / "new.jpg", (200, 0, 0), (20, 20), "JPEG")
    caplog.clear()
    _new_start()
    info = data.dataset_info(cfg)
    assert _checked(caplog) == [(2, 22)]
    assert info.num_skipped == 3 and str(folder / "train" / "cat" / "1.png") in info.skipped_files
    assert info.num_train == 20
    with pytest.raises(ConfigError, match="corrupt or unreadable image"):  # on_corrupt=error sees the manifest's too
        _new_start()
        data.dataset_info(folder_cfg(folder))


def test_folder_manifest_where_the_data_is_not_writable(folder, tmp_path, monkeypatch, caplog):
    """When no manifest can be written beside the data (here `.sslvit` is a file, as on a read-only data set), it goes
    to the user's cache; with data.manifest_dir it goes there."""
    import logging

    caplog.set_level(logging.INFO, logger="sslvit.data.folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (folder / ".sslvit").write_text("in the way")
    data.dataset_info(folder_cfg(folder))
    assert len(list((tmp_path / "cache" / "sslvit" / "folders").glob("*/manifest-train.npz"))) == 1
    caplog.clear()
    _new_start()
    data.dataset_info(folder_cfg(folder))
    assert _checked(caplog) == []
    own = tmp_path / "manifests"
    _new_start()
    data.dataset_info(folder_cfg(folder, manifest_dir=str(own)))
    assert sorted(p.name for p in own.iterdir()) == ["manifest-test.npz", "manifest-train.npz"]


@pytest.mark.parametrize("verify", [False, True])
def test_folder_image_failing_to_decode_is_named(folder, verify, pipeline):
    """An image that fails to decode in the pipeline (not checked: data.verify_images=false; or changed after the
    check) stops training and evaluation with one line naming it."""
    cfg = folder_cfg(folder, verify_images=verify, pipeline=pipeline)
    data.dataset_info(cfg)  # checked (verify=true) while still intact
    bad = folder / "test" / "dog" / "3.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated after the check
    folder_train = folder / "train" / "cat" / "0.JPEG"
    folder_train.write_bytes(b"\xff\xd8\xff" + b"\0" * 64)
    if verify:  # a changed file is checked again at a new start: the check, not the pipeline, names it now
        _new_start()
        with pytest.raises(ConfigError, match="corrupt or unreadable image"):
            data.dataset_info(cfg)
        return
    with pytest.raises(ConfigError, match=f"image '{bad}' cannot be decoded") as err:
        list(data.make_eval_iterator(cfg, batch_size=4, image_size=16, **ONE))
    assert "data.verify_images=true data.on_corrupt=skip" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=f"image '{folder_train}' cannot be decoded"):
        take(data.make_train_iterator(cfg, batch_size=4, image_size=16, seed=0, **ONE), 10)


def test_folder_split_slices_and_shards(folder, pipeline):
    cfg = folder_cfg(folder, train_split="train[:50%]", pipeline=pipeline)
    assert data.dataset_info(cfg).num_train == 10
    ev = [
        list(data.make_eval_iterator(cfg, "train", batch_size=4, image_size=8, process_index=i, process_count=3))
        for i in range(3)
    ]
    assert {len(s) for s in ev} == {2}  # 20 examples -> shards of 6/7/7 -> 2 batches each
    assert sum(int(b["valid"].sum()) for s in ev for b in s) == 20


def test_folder_train_shards_are_disjoint_and_cover_the_split(folder, pipeline):
    """Two processes' first epochs (plain transform: one image per file) read disjoint halves of the split."""
    cfg = folder_cfg(folder, pipeline=pipeline)
    seen = []
    for pi in range(2):
        it = data.make_train_iterator(
            cfg, batch_size=5, image_size=16, seed=1, augment=False, process_index=pi, process_count=2
        )
        assert it.steps_per_epoch == 2
        seen.append({digest(x) for b in take(it, 2) for x in b["image"]})
    assert len(seen[0]) == len(seen[1]) == 10 and not seen[0] & seen[1]


def test_folder_bad_layouts(tmp_path, folder):
    with pytest.raises(ConfigError, match="data.path=.* does not exist"):
        data.dataset_info(folder_cfg(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="data.path is not set"):
        data.dataset_info(OmegaConf.load(CONF / "folder.yaml"))
    (tmp_path / "flat" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no class directories"):
        data.dataset_info(folder_cfg(tmp_path / "flat"))
    (tmp_path / "flat" / "train" / "a").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        data.dataset_info(folder_cfg(tmp_path / "flat"))
    _write(folder / "test" / "bird" / "0.png", (0, 255, 0), (8, 8), "PNG")
    with pytest.raises(ConfigError, match="class directory that 'train' lacks"):
        data.dataset_info(folder_cfg(folder))
    with pytest.raises(ConfigError, match="data.num_classes=3 but"):
        data.dataset_info(folder_cfg(folder, num_classes=3, test_split="missing"))
    with pytest.raises(ConfigError, match="does not exist"):
        data.make_eval_iterator(folder_cfg(folder, test_split="missing"), batch_size=4, image_size=8, **ONE)


# ------------------------------------------------------------------------------------------------ Pillow pipeline


def test_pil_rrc_window_fits_and_covers_the_scale_range():
    from sslvit.data.pil_iterators import rrc_window

    for h, w in ((32, 32), (480, 640), (300, 200)):
        windows = np.array([rrc_window(np.random.default_rng([7, i]), h, w, (0.2, 1.0)) for i in range(512)])
        y, x, hh, ww = windows.T
        assert (y >= 0).all() and (x >= 0).all() and (y + hh <= h).all() and (x + ww <= w).all()
        frac = hh * ww / (h * w)
        assert frac.min() > 0.15 and frac.max() <= 1.0 and frac.std() > 0.1
        aspect = ww / hh
        assert (aspect > 0.6).all() and (aspect < 1.6).all()
        assert len({(a, b) for a, b in zip(y, x)}) > 100  # positions vary
    # 50 x 500: no draw fits (aspects are within [3/4, 4/3]): the central crop, its aspect clipped to 4/3
    assert {rrc_window(np.random.default_rng(i), 50, 500, (0.2, 1.0)) for i in range(20)} == {(0, 216, 50, 67)}


def test_pil_reduced_jpeg_decode_matches_a_full_decode(tmp_path):
    """A large JPEG resampled to a small size is decoded at a reduced DCT scale: what comes out matches a full-size
    decode resized with the same window to within a few levels (both antialiased)."""
    from sslvit.data.pil_iterators import center_window, load_window

    yy, xx = np.mgrid[0:480, 0:640]
    img = np.stack([128 + 100 * np.sin(xx / 40), 128 + 100 * np.cos(yy / 30), (xx + yy) * 0.15 + 40], -1)
    path = tmp_path / "big.jpg"
    Image.fromarray(img.astype(np.uint8)).save(path, quality=95)
    window = lambda h, w: center_window(h, w, 32, 0.875)  # noqa: E731
    fast = load_window(str(path), 32, window).astype(float)
    with Image.open(path) as im:  # the full decode: no draft
        full = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR, box=_box(window(480, 640))))
    assert fast.shape == (32, 32, 3)
    assert np.abs(fast - full).mean() < 2.0 and np.abs(fast - full).max() < 16
    # A window smaller than S x S in the reduced image is never what is resampled: 1/8 would be 60 x 80 here
    crop = load_window(str(path), 200, lambda h, w: (0, 0, 200, 200)).astype(float)
    np.testing.assert_allclose(crop, img[:200, :200], atol=12)


def test_pil_any_image_mode_becomes_rgb(tmp_path):
    """Greyscale and CMYK JPEGs, palette and RGBA PNGs (all found in real datasets) come out as RGB of the right
    colour."""
    from sslvit.data.pil_iterators import center_window, load_window

    red = Image.new("RGB", (48, 40), (200, 20, 20))
    images = {
        "grey.jpg": (Image.new("L", (48, 40), 120), (120, 120, 120)),
        "cmyk.jpg": (red.convert("CMYK"), (200, 20, 20)),
        "palette.png": (red.convert("P"), (200, 20, 20)),
        "rgba.png": (Image.new("RGBA", (48, 40), (200, 20, 20, 128)), (200, 20, 20)),
    }
    for name, (im, colour) in images.items():
        im.save(tmp_path / name)
        out = load_window(str(tmp_path / name), 16, lambda h, w: center_window(h, w, 16, 1.0))
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8, name
        np.testing.assert_allclose(out.reshape(-1, 3).mean(0), colour, atol=6, err_msg=name)


def _box(t):
    top, left, bottom, right = t
    return left, top, right, bottom


def test_pil_and_tf_pipelines_read_the_same_files_in_the_same_order(folder):
    """The two pipelines share the epoch order (seeded by (seed, epoch, process)): the same labels batch after batch;
    evaluation images agree to within resampling differences."""
    kwargs = dict(batch_size=4, image_size=16, seed=3, **ONE)
    pil = take(data.make_train_iterator(folder_cfg(folder, pipeline="pil"), **kwargs), 6)
    tf = take(data.make_train_iterator(folder_cfg(folder, pipeline="tf"), **kwargs), 6)
    for a, b in zip(pil, tf):
        np.testing.assert_array_equal(a["label"], b["label"])
    ev = [
        list(data.make_eval_iterator(folder_cfg(folder, pipeline=p), batch_size=4, image_size=16, **ONE))
        for p in ("pil", "tf")
    ]
    for a, b in zip(*ev):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["valid"], b["valid"])
        assert np.abs(a["image"] - b["image"]).mean() < 0.05  # normalised units: ~3 levels of 255


def test_pil_pipeline_threads_stop_on_close(folder):
    """The decoding threads an iterator started are gone after `close()`, after a whole evaluation pass, and soon
    after an evaluation iterator is dropped part-way (threads of other tests' iterators may still be ending)."""
    import threading

    def new_threads(before):
        return {t for t in threading.enumerate() if t.name.startswith("sslvit-decode")} - before

    before = new_threads(set())
    it = data.make_train_iterator(folder_cfg(folder), batch_size=4, image_size=16, seed=0, **ONE)
    next(it)
    started = new_threads(before)
    assert started
    it.close()
    assert not any(t.is_alive() for t in started)
    ev = data.make_eval_iterator(folder_cfg(folder), batch_size=4, image_size=16, **ONE)
    assert len(list(ev)) == 3 and not new_threads(before)  # a finished pass stops its threads itself
    ev = data.make_eval_iterator(folder_cfg(folder), batch_size=2, image_size=16, **ONE)
    next(ev)  # an evaluation that stops early drops its iterator: the batches decoded ahead are cancelled
    started = new_threads(before)
    assert started
    del ev
    for t in started:
        t.join(10)
    assert not any(t.is_alive() for t in started)


def test_pipeline_pil_is_refused_for_tfds_records():
    with pytest.raises(ConfigError, match="data.pipeline=pil decodes image files") as err:
        data.DataConfig.from_cfg(cifar_cfg(pipeline="pil"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="data.pipeline"):
        data.DataConfig.from_cfg(cifar_cfg(pipeline="opencv"))


@pytest.mark.slow
def test_folder_stages_run_with_tensorflow_blocked(tmp_path):
    """On a host with only the JAX stack, pretraining, probe and fine-tuning run on an image folder (the Pillow
    pipeline), loading no TensorFlow module."""
    root = tmp_path / "images"
    for split, count in (("train", 64), ("test", 32)):
        for cls, color in (("cat", (220, 30, 30)), ("dog", (30, 30, 220))):
            for i in range(count):
                _write(root / split / cls / f"{i}.jpg", color, ((40, 30), (24, 24), (30, 50))[i % 3], "JPEG")
    overrides = ["data=folder", f"data.path={root}", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"]
    out = run_without_tensorflow(overrides, tmp_path / "runs")
    assert out["tensorflow_modules"] == []
    pre, probe, ft = out["results"]["pretrain"], out["results"]["probe"], out["results"]["finetune"]
    assert pre["steps"] == 4 and np.isfinite(pre["train_loss"]) and pre["test_batches"] == 2
    assert probe["num_train"] == 128 and probe["num_test"] == 64 and probe["best_top1"] > 0.9  # red vs blue
    assert ft["steps"] == 4 and np.isfinite(ft["train_loss"]) and ft["test_examples"] == 64
