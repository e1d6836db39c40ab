"""Input pipeline (tf.data) shared by pretraining, linear probe and fine-tuning.

Two kinds of source, chosen by `data.name` (a registry, `SOURCES`; any name not in it is a tfds name):

- tensorflow-datasets by name (`cifar10`, `imagenet2012`, ...), read from `data.data_dir`, else
  `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`;
- `folder`: the user's own images, `data.path/train/<class>/**/*.{jpg,jpeg,png}` and `.../test/<class>/...`,
  labels from the sorted class directory names of the train split.

Training batches are a pure function of `(seed, step)`: epoch `e` is shuffled with seeds derived from
`(seed, e, process_index)` and augmented with stateless random ops keyed by those seeds and the position in
the epoch, so an iterator created with `start_step=k` yields exactly the batches a fresh iterator yields from
its k-th step on (bit-exact resume). Evaluation is one pass, padded to whole batches with a `valid` mask, and
every process runs the same number of batches (collectives stay in lockstep).

TensorFlow only feeds the input pipeline: importing this module hides every GPU from it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import logging
import math
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # keep TensorFlow's INFO chatter out of training logs
import tensorflow as tf  # noqa: E402

try:  # TF must never grab GPU memory that JAX needs; fails harmlessly if TF already initialised its devices
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
    pass

import tensorflow_datasets as tfds  # noqa: E402

from sslvit.errors import ConfigError  # noqa: E402

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ON_CORRUPT = ("error", "skip")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)  # random-resized-crop aspect ratios, as in torchvision/BEiT
_AUTOTUNE = tf.data.AUTOTUNE


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` config group, validated. Built from any mapping/attribute object by `DataConfig.from_cfg`."""

    name: str
    data_dir: str | None = None  # tfds data dir; None -> $TFDS_DATA_DIR -> ~/tensorflow_datasets
    path: str | None = None  # folder datasets: root holding train/<class>/ and test/<class>/
    train_split: str = "train"  # tfds split spec (slices such as 'train[:256]' allowed), or folder sub-dir
    test_split: str = "test"
    num_classes: int | None = None  # None -> from the dataset; otherwise must match it
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per channel, [0, 1] pixel units
    std: tuple[float, float, float] = IMAGENET_STD
    shuffle_buffer: int = 10_000
    crop_scale: tuple[float, float] = (0.2, 1.0)  # random-resized-crop area fraction [min, max]
    eval_crop_pct: float = 1.0  # eval: resize the shorter side to image_size / eval_crop_pct, centre-crop
    flip: bool = True  # random horizontal flip when augmenting
    cache: bool = False  # keep the decoded split in memory (small datasets)
    download: bool = True  # try tfds download_and_prepare when the dataset is not prepared
    on_corrupt: str = "error"  # folder datasets: 'error' names the file; 'skip' drops and counts it
    verify_images: bool = True  # folder datasets: check every image up front (needed for on_corrupt)
    image_key: str = "image"  # tfds feature names
    label_key: str = "label"

    @classmethod
    def from_cfg(cls, cfg: Any) -> DataConfig:
        """Validates a `data` config (DictConfig, dict, or attribute object); raises one-line ConfigErrors."""
        if isinstance(cfg, DataConfig):
            return cfg
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if isinstance(cfg, Mapping):
            unknown = sorted(set(map(str, cfg.keys())) - set(fields))
            if unknown:
                raise ConfigError(
                    f"data.{unknown[0]} is not a data config key; known keys: {', '.join(fields)}"
                )
            get = lambda key, default: cfg.get(key, default)  # noqa: E731
        else:
            get = lambda key, default: getattr(cfg, key, default)  # noqa: E731
        raw = {
            key: get(key, f.default if f.default is not dataclasses.MISSING else None)
            for key, f in fields.items()
        }

        name = raw["name"]
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                f"data.name={name!r} is not a dataset name; use a tfds name (e.g. cifar10, imagenet2012) "
                "or 'folder' with data.path"
            )
        for key in ("data_dir", "path"):
            if raw[key] is not None and not isinstance(raw[key], (str, os.PathLike)):
                raise ConfigError(f"data.{key}={raw[key]!r} must be a directory path or null")
            if raw[key] is not None:
                raw[key] = os.path.expanduser(os.fspath(raw[key]))
        for key in ("train_split", "test_split", "image_key", "label_key"):
            if not isinstance(raw[key], str) or not raw[key]:
                raise ConfigError(f"data.{key}={raw[key]!r} must be a non-empty string")
        if raw["num_classes"] is not None:
            raw["num_classes"] = _check_int(raw["num_classes"], "data.num_classes", 1, "or null (from the dataset)")
        raw["shuffle_buffer"] = _check_int(raw["shuffle_buffer"], "data.shuffle_buffer", 1)
        for key, example in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            values = _float_tuple(raw[key], f"data.{key}", 3, f"e.g. {list(example)}")
            if any(v > 1.0 for v in values) or (key == "std" and any(v <= 0 for v in values)):
                raise ConfigError(
                    f"data.{key}={list(values)} must be per-channel values in [0, 1] pixel units"
                    f"{' and > 0' if key == 'std' else ''} (divide 0-255 statistics by 255), e.g. {list(example)}"
                )
            raw[key] = values
        raw["crop_scale"] = check_crop_scale(raw["crop_scale"], "data.crop_scale")
        pct = raw["eval_crop_pct"]
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct <= 1:
            raise ConfigError(f"data.eval_crop_pct={pct!r} must be in (0, 1], e.g. 1.0 (CIFAR) or 0.875 (ImageNet)")
        raw["eval_crop_pct"] = float(pct)
        for key in ("flip", "cache", "download", "verify_images"):
            if not isinstance(raw[key], (bool, np.bool_)):
                raise ConfigError(f"data.{key}={raw[key]!r} must be true or false")
            raw[key] = bool(raw[key])
        if raw["on_corrupt"] not in ON_CORRUPT:
            raise ConfigError(
                f"data.on_corrupt={raw['on_corrupt']!r} is not one of {', '.join(ON_CORRUPT)}; use error (stop, "
                "naming the file) or skip (drop corrupt images and count them)"
            )
        return cls(**raw)


def _check_int(value: Any, key: str, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}{(' ' + hint) if hint else ''}")
    return int(value)


def _float_tuple(value: Any, key: str, length: int, hint: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in value if not isinstance(v, bool))
        if len(values) != length or len(values) != len(value):
            raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be a list of {length} numbers, {hint}") from None
    return values


def check_crop_scale(value: Any, key: str = "crop_scale") -> tuple[float, float]:
    """Validates a random-resized-crop area range [min, max] with 0 < min <= max <= 1."""
    lo, hi = _float_tuple(value, key, 2, "e.g. [0.2, 1.0]")
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"{key}={[lo, hi]} must satisfy 0 < min <= max <= 1, e.g. [0.2, 1.0] or [0.08, 1.0]")
    return lo, hi


def _one_line(exc: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Defaults to JAX's process index/count (imported lazily: only multi-host callers need it)."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_count = _check_int(process_count, "process_count", 1)
    process_index = _check_int(process_index, "process_index", 0)
    if process_index >= process_count:
        raise ConfigError(f"process_index={process_index} must be < process_count={process_count}")
    return process_index, process_count


# --------------------------------------------------------------------------------------------------------------
# Dataset info
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the loops need to know about a dataset, read from metadata (no pass over the data)."""

    name: str
    num_classes: int
    num_train: int  # examples in data.train_split (all processes together; slices applied)
    num_test: int  # examples in data.test_split (0 for a folder dataset without that sub-directory)
    class_names: tuple[str, ...]
    image_shape: tuple[int | None, int | None, int]  # (H, W, 3); None where sizes vary
    train_split: str
    test_split: str
    skipped_files: tuple[str, ...] = ()  # folder datasets with on_corrupt=skip: corrupt images left out

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)

    def steps_per_epoch(self, batch_size: int, process_count: int = 1) -> int:
        """Training steps per epoch at a per-process `batch_size` (each process reads num_train // count)."""
        return (self.num_train // process_count) // batch_size


def dataset_info(cfg: Any) -> DatasetInfo:
    """Reads a dataset's metadata (tfds: prepared dataset_info.json; folder: a directory scan), validating it."""
    return _make_source(DataConfig.from_cfg(cfg)).info


# --------------------------------------------------------------------------------------------------------------
# Sources: deterministic tf.data datasets of {'image': encoded bytes or uint8 (H, W, 3), 'label': int32}
# --------------------------------------------------------------------------------------------------------------


class _Source:
    """A dataset's splits, sharded over processes, in a deterministic order."""

    info: DatasetInfo
    fixed_shape: tuple[int, int, int] | None  # every image has this decoded shape: enables batched augmentation

    def split_size(self, split: str, index: int, count: int, drop_remainder: bool) -> int:
        raise NotImplementedError

    def examples(
        self, split: str, index: int, count: int, drop_remainder: bool, order_seed: int | None
    ) -> tuple[tf.data.Dataset, bool]:
        """Process `index`'s shard of `split`, and whether it is already fully shuffled (by `order_seed`)."""
        raise NotImplementedError


def _resolve_data_dir(dc: DataConfig) -> str:
    # Resolved at call time, not tfds import time, so a changed TFDS_DATA_DIR is honoured.
    return dc.data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _network_problem(timeout: float = 3.0) -> str | None:
    """Why downloading is hopeless (no route to the internet), or None if it may work.

    tfds has no fast offline check of its own and can stall in retries; one short TCP connect tells. Behind a
    proxy the direct connect says nothing, so then tfds is left to try."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=timeout).close()
    except OSError as e:
        return f"no network: {_one_line(e, 80)}"
    return None


def _tfds_builder(dc: DataConfig) -> Any:
    """A tfds builder whose data is prepared in the data dir (downloading it if allowed and possible)."""
    data_dir = _resolve_data_dir(dc)
    try:
        builder = tfds.builder(dc.name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(dc.name.split("/")[0].split(":")[0], known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"data.name={dc.name!r} is not a tfds dataset{hint}; use a name from tfds.list_builders(), "
            "or data=folder data.path=<dir> for your own images"
        ) from None
    except Exception as e:  # e.g. a dataset whose builder code needs a missing package
        raise ConfigError(f"data.name={dc.name!r}: tfds cannot build this dataset ({_one_line(e)})") from None
    if builder.is_prepared():
        return builder
    if not dc.download:
        why = "data.download=false"
    else:
        why = _network_problem()
        if why is None:
            try:
                builder.download_and_prepare()
            except Exception as e:  # manual-download datasets (imagenet2012), server errors, missing packages
                why = f"{type(e).__name__}: {_one_line(e)}"
            else:
                if builder.is_prepared():
                    return builder
                why = "download_and_prepare left no prepared data"
    raise ConfigError(
        f"dataset {dc.name!r} not found in data_dir {data_dir!r} and could not be downloaded ({why}); "
        "set data.data_dir or TFDS_DATA_DIR to a directory holding prepared tfds data"
    )


class TfdsSource(_Source):
    """A tensorflow-datasets dataset; process shards via `tfds.even_splits`."""

    def __init__(self, dc: DataConfig):
        self.dc = dc
        self.builder = _tfds_builder(dc)
        info = self.builder.info
        features = info.features
        for key, role in ((dc.image_key, "image"), (dc.label_key, "label")):
            if key not in features:
                raise ConfigError(
                    f"data.{role}_key={key!r} is not a feature of {dc.name}; its features: {', '.join(features)}"
                )
        label = features[dc.label_key]
        if not isinstance(label, tfds.features.ClassLabel):
            raise ConfigError(f"data.label_key={dc.label_key!r} of {dc.name} is not a class label feature")
        sizes = {}
        for key in ("train_split", "test_split"):
            spec = getattr(dc, key)
            try:
                sizes[key] = info.splits[spec].num_examples
            except (KeyError, ValueError, AssertionError) as e:
                raise ConfigError(
                    f"data.{key}={spec!r} is not a valid split of {dc.name} ({_one_line(e, 100)}); "
                    f"its splits: {', '.join(info.splits)} (slices such as 'train[:10%]' work)"
                ) from None
        _check_num_classes(dc, label.num_classes)
        shape = tuple(features[dc.image_key].shape)
        self.fixed_shape = (shape[0], shape[1], 3) if None not in shape[:2] else None
        self.info = DatasetInfo(
            name=dc.name,
            num_classes=label.num_classes,
            num_train=sizes["train_split"],
            num_test=sizes["test_split"],
            class_names=tuple(label.names),
            image_shape=(shape[0], shape[1], 3),
            train_split=dc.train_split,
            test_split=dc.test_split,
        )

    def _shard(self, split: str, index: int, count: int, drop_remainder: bool) -> Any:
        if count == 1:
            return split
        return tfds.even_splits(split, n=count, drop_remainder=drop_remainder)[index]

    def split_size(self, split: str, index: int, count: int, drop_remainder: bool) -> int:
        try:
            return self.builder.info.splits[self._shard(split, index, count, drop_remainder)].num_examples
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(
                f"split {split!r} is not valid for {self.dc.name} ({_one_line(e, 100)}); "
                f"its splits: {', '.join(self.builder.info.splits)}"
            ) from None

    def examples(self, split, index, count, drop_remainder, order_seed):
        read_config = tfds.ReadConfig(
            shuffle_seed=order_seed, try_autocache=False, interleave_cycle_length=16, skip_prefetch=True
        )
        ds = self.builder.as_dataset(
            split=self._shard(split, index, count, drop_remainder),
            shuffle_files=order_seed is not None,
            decoders={self.dc.image_key: tfds.decode.SkipDecoding()},  # decoded by us: fused crop for JPEG
            read_config=read_config,
        )
        fixed = self.fixed_shape

        def parse(ex):
            image = ex[self.dc.image_key]
            if fixed is not None:  # small fixed-size images: decode once here (cacheable, batch-augmentable)
                image = tf.ensure_shape(_decode(image), fixed)
            return {"image": image, "label": tf.cast(ex[self.dc.label_key], tf.int32)}

        # The file order is shuffled per epoch (order_seed), examples still need the shuffle buffer.
        return ds.map(parse, num_parallel_calls=_AUTOTUNE), False


def _check_num_classes(dc: DataConfig, actual: int) -> None:
    if dc.num_classes is not None and dc.num_classes != actual:
        raise ConfigError(
            f"data.num_classes={dc.num_classes} but {dc.name} has {actual} classes; "
            f"set data.num_classes={actual} or null"
        )


_SPLIT_RE = re.compile(r"^([^\[\]/]+?)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")


def _parse_folder_split(spec: str, key: str) -> tuple[str, str | None, str | None]:
    m = _SPLIT_RE.match(spec.strip())
    if not m:
        raise ConfigError(f"{key}={spec!r} must be a sub-directory name, optionally sliced: 'train', 'train[:80%]'")
    return m.group(1), m.group(2), m.group(3)


def _slice_bound(bound: str | None, n: int) -> int | None:
    if bound is None:
        return None
    if bound.endswith("%"):
        return int(round(n * int(bound[:-1]) / 100))
    return int(bound)


def _image_problem(path: str) -> str | None:
    """Why `path` is not a decodable image, or None. Cheap but complete enough for TF's decoders:

    PNG: `verify()` checks every chunk's CRC without inflating; JPEG: decoding at 1/8 scale (DCT scaling) still
    walks the whole entropy-coded stream, so truncation and broken markers are caught for a fraction of a full
    decode. Anything else PIL cannot open (empty files, text named .jpg, unsupported formats) is rejected too."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()
            elif im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
            elif im.format in ("GIF", "BMP"):
                im.load()
            else:
                return f"unsupported image format {im.format}"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, UnidentifiedImageError, ...)
        return f"{type(e).__name__}: {_one_line(e, 120)}"
    return None


# (path, size, mtime_ns) -> problem or None: a second scan of an unchanged folder re-reads no image.
_VERIFIED: dict[tuple[str, int, int], str | None] = {}


@dataclasses.dataclass(frozen=True)
class _FolderSplit:
    paths: np.ndarray  # str, in the canonical (seeded) order, corrupt files removed
    labels: np.ndarray  # int32
    skipped: tuple[str, ...]


class FolderSource(_Source):
    """Images in `path/<split>/<class>/**/*.{jpg,jpeg,png}`; labels from the sorted train class directories.

    The canonical order of a split is a fixed pseudo-random permutation of the sorted file list, so slices
    ('train[:10%]') and process shards mix all classes instead of taking the first few."""

    fixed_shape = None

    def __init__(self, dc: DataConfig):
        self.dc = dc
        if dc.path is None:
            raise ConfigError("data.path is not set; set data.path to a folder holding train/<class>/*.jpg|png")
        self.root = Path(dc.path)
        if not self.root.is_dir():
            raise ConfigError(
                f"data.path={dc.path!r} does not exist or is not a directory; set data.path to a folder holding "
                "train/<class>/*.jpg|png and test/<class>/*.jpg|png"
            )
        train_dir, _, _ = _parse_folder_split(dc.train_split, "data.train_split")
        top = self.root / train_dir
        if not top.is_dir():
            raise ConfigError(
                f"data.path={dc.path!r} has no '{train_dir}' sub-directory (data.train_split); expected "
                f"{dc.path}/{train_dir}/<class>/*.jpg|png"
            )
        self.class_names = tuple(sorted(p.name for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")))
        if not self.class_names:
            raise ConfigError(
                f"'{top}' holds no class directories; put each class's images in {top}/<class_name>/"
            )
        _check_num_classes(dc, len(self.class_names))
        self._splits: dict[str, _FolderSplit] = {}
        train = self._split(dc.train_split, "data.train_split")
        test_dir, _, _ = _parse_folder_split(dc.test_split, "data.test_split")
        # A missing test split is allowed (pretraining needs none); make_eval_iterator rejects it.
        test = self._split(dc.test_split, "data.test_split") if (self.root / test_dir).is_dir() else None
        skipped = train.skipped + (test.skipped if test is not None else ())
        if skipped:
            log.warning(
                "data.on_corrupt=skip: left out %d corrupt image(s) under %s, e.g. %s", len(skipped), dc.path,
                ", ".join(skipped[:3]),
            )
        self.info = DatasetInfo(
            name=f"folder:{dc.path}",
            num_classes=len(self.class_names),
            num_train=len(train.paths),
            num_test=len(test.paths) if test is not None else 0,
            class_names=self.class_names,
            image_shape=(None, None, 3),
            train_split=dc.train_split,
            test_split=dc.test_split,
            skipped_files=skipped,
        )

    def _split(self, spec: str, key: str) -> _FolderSplit:
        if spec in self._splits:
            return self._splits[spec]
        name, start, stop = _parse_folder_split(spec, key)
        full = self._splits.get(name) or self._scan(name, key)
        self._splits[name] = full
        n = len(full.paths)
        sl = slice(_slice_bound(start, n), _slice_bound(stop, n))
        part = _FolderSplit(full.paths[sl], full.labels[sl], full.skipped)
        if len(part.paths) == 0:
            raise ConfigError(f"{key}={spec!r} selects no images out of {n} in '{self.root / name}'")
        self._splits[spec] = part
        return part

    def _scan(self, name: str, key: str) -> _FolderSplit:
        split_dir = self.root / name
        if not split_dir.is_dir():
            raise ConfigError(
                f"split {name!r} of data.path={self.dc.path!r}: '{split_dir}' does not exist; create it or set "
                f"{key if key.startswith('data.') else 'data.train_split/data.test_split'} to an existing sub-directory"
            )
        index = {c: i for i, c in enumerate(self.class_names)}
        extra = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [c for c in extra if c not in index]
        if unknown:
            raise ConfigError(
                f"'{split_dir / unknown[0]}' is a class directory that {self.dc.train_split!r} lacks; the classes "
                f"are the train split's: {', '.join(self.class_names)}"
            )
        files: list[tuple[str, int]] = []
        for c in extra:
            for p in sorted((split_dir / c).rglob("*")):
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."):
                    files.append((str(p), index[c]))
        if not files:
            raise ConfigError(
                f"'{split_dir}' holds no images ({'/'.join(IMAGE_EXTENSIONS)}) in class sub-directories; "
                f"expected {split_dir}/<class>/<image>"
            )
        skipped: tuple[str, ...] = ()
        if self.dc.verify_images:
            problems = _verify_files([f for f, _ in files])
            if problems:
                bad = sorted(problems)
                if self.dc.on_corrupt == "error":
                    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                    raise ConfigError(
                        f"corrupt or unreadable image '{bad[0]}' ({problems[bad[0]]}){more}; fix or delete it, "
                        "or set data.on_corrupt=skip to leave such files out"
                    )
                skipped = tuple(bad)
                files = [(f, y) for f, y in files if f not in problems]
                if not files:
                    raise ConfigError(f"every image in '{split_dir}' is corrupt, e.g. '{bad[0]}'")
        order = np.random.default_rng(0).permutation(len(files))  # fixed: the canonical order of the split
        paths = np.array([files[i][0] for i in order])
        labels = np.array([files[i][1] for i in order], dtype=np.int32)
        return _FolderSplit(paths, labels, skipped)

    def _shard_range(self, n: int, index: int, count: int, drop_remainder: bool) -> slice:
        if drop_remainder:  # equal shards: every process runs the same number of training steps
            per = n // count
            return slice(index * per, (index + 1) * per)
        return slice(index * n // count, (index + 1) * n // count)

    def split_size(self, split, index, count, drop_remainder):
        n = len(self._split(split, "split").paths)
        sl = self._shard_range(n, index, count, drop_remainder)
        return sl.stop - sl.start

    def examples(self, split, index, count, drop_remainder, order_seed):
        data = self._split(split, "split")
        sl = self._shard_range(len(data.paths), index, count, drop_remainder)
        paths, labels = data.paths[sl], data.labels[sl]
        if order_seed is not None:  # a full permutation of the file list costs nothing: no shuffle buffer needed
            perm = np.random.default_rng(order_seed).permutation(len(paths))
            paths, labels = paths[perm], labels[perm]
        ds = tf.data.Dataset.from_tensor_slices({"image": paths, "label": labels})
        ds = ds.map(lambda ex: {"image": tf.io.read_file(ex["image"]), "label": ex["label"]},
                    num_parallel_calls=_AUTOTUNE)
        return ds, order_seed is not None


def _verify_files(paths: Sequence[str]) -> dict[str, str]:
    """Problems of the images among `paths`, checked in a thread pool (PIL releases the GIL while decoding)."""
    keys = {}
    for p in paths:
        st = os.stat(p)
        keys[p] = (p, st.st_size, st.st_mtime_ns)
    todo = [p for p in paths if keys[p] not in _VERIFIED]
    if todo:
        workers = min(32, 4 * (os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for p, problem in zip(todo, pool.map(_image_problem, todo, chunksize=64)):
                _VERIFIED[keys[p]] = problem
    return {p: _VERIFIED[keys[p]] for p in paths if _VERIFIED[keys[p]] is not None}


# A new kind of source = one class taking a DataConfig + one entry here; other names are tfds names.
SOURCES: dict[str, Callable[[DataConfig], _Source]] = {"folder": FolderSource}


def _make_source(dc: DataConfig) -> _Source:
    return SOURCES.get(dc.name, TfdsSource)(dc)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing (pure TF functions)
# --------------------------------------------------------------------------------------------------------------


def _decode(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes (JPEG/PNG/GIF/BMP) -> uint8 (H, W, 3); grayscale and RGBA become RGB."""
    return tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)


def rrc_windows(
    seed: tf.Tensor,
    heights: tf.Tensor,
    widths: tf.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = ASPECT_RATIO_RANGE,
    attempts: int = 10,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Random-resized-crop windows, torchvision's algorithm vectorised over a batch; stateless in `seed`.

    Up to `attempts` draws of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first that fits wins,
    else the largest central crop with its aspect clipped into `ratio`. Returns int32 (y, x, h, w), each (B,).
    """
    heights = tf.cast(heights, tf.float32)
    widths = tf.cast(widths, tf.float32)
    batch = tf.shape(heights)[0]
    seed_try, seed_pos = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    u = tf.random.stateless_uniform(tf.stack([batch, attempts, 2]), seed_try)
    area = (heights * widths)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = tf.round(tf.sqrt(area * aspect))
    h = tf.round(tf.sqrt(area / aspect))
    fits = (w >= 1) & (h >= 1) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    w = tf.gather(w, first, batch_dims=1)
    h = tf.gather(h, first, batch_dims=1)
    found = tf.reduce_any(fits, axis=1)
    in_ratio = widths / heights
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(heights * ratio[1]), widths)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(widths / ratio[0]), heights)
    w = tf.where(found, w, fallback_w)
    h = tf.where(found, h, fallback_h)
    pos = tf.random.stateless_uniform(tf.stack([batch, 2]), seed_pos)
    y = tf.where(found, tf.floor(pos[:, 0] * (heights - h + 1)), tf.floor((heights - h) / 2))
    x = tf.where(found, tf.floor(pos[:, 1] * (widths - w + 1)), tf.floor((widths - w) / 2))
    y = tf.minimum(y, heights - h)
    x = tf.minimum(x, widths - w)
    return tuple(tf.cast(v, tf.int32) for v in (y, x, h, w))


def _flip_mask(seed: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
    return tf.random.stateless_uniform(tf.reshape(batch, [1]), seed) < 0.5


def augment_batch(
    images: tf.Tensor, seed: tf.Tensor, image_size: int, scale: tuple[float, float], flip: bool
) -> tf.Tensor:
    """Random-resized-crop (+ flip) of equally sized uint8 images (B, H, W, 3) -> float32 (B, S, S, 3), 0..255.

    One `crop_and_resize` for the whole batch instead of a crop and a resize per image.
    The box uses its align-corners convention from the first to the last pixel centre of each window, so
    every sample lies inside the image (no black border) and a full window at S == H is the identity. It does
    not antialias: fine for the up-/mild down-scaling of small images this path serves."""
    seed_crop, seed_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.shape(images)
    # Static sizes where known keep shapes static downstream (and grappler's cost model quiet).
    batch, height, width = (images.shape[i] if images.shape[i] is not None else shape[i] for i in range(3))
    y, x, h, w = rrc_windows(seed_crop, tf.fill([batch], height), tf.fill([batch], width), scale)
    hm1 = tf.cast(tf.maximum(height - 1, 1), tf.float32)
    wm1 = tf.cast(tf.maximum(width - 1, 1), tf.float32)
    y, x, h, w = (tf.cast(v, tf.float32) for v in (y, x, h, w))
    left, right = x / wm1, (x + w - 1) / wm1
    if flip:  # a box with x1 > x2 samples the mirrored crop: the flip costs nothing
        flipped = _flip_mask(seed_flip, batch)
        left, right = tf.where(flipped, right, left), tf.where(flipped, left, right)
    boxes = tf.stack([y / hm1, left, (y + h - 1) / hm1, right], axis=1)
    # uint8 in, float32 out: no separate cast pass over the batch.
    return tf.image.crop_and_resize(images, boxes, tf.range(batch), [image_size, image_size], method="bilinear")


def augment_example(
    image: tf.Tensor, seed: tf.Tensor, image_size: int, scale: tuple[float, float], flip: bool
) -> tf.Tensor:
    """Random-resized-crop (+ flip) of one image of any size -> float32 (S, S, 3), 0..255.

    `image` is encoded bytes or uint8 (H, W, 3). JPEGs are decoded only inside the crop window
    (`decode_and_crop_jpeg`), which spares most of the decode of large images; the resize antialiases."""
    seed_crop, seed_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

    def window(shape):
        y, x, h, w = rrc_windows(seed_crop, shape[:1], shape[1:2], scale)
        return y[0], x[0], h[0], w[0]

    def crop_decoded(img):
        y, x, h, w = window(tf.shape(img))
        return img[y : y + h, x : x + w]

    if image.dtype == tf.string:

        def jpeg():
            y, x, h, w = window(tf.image.extract_jpeg_shape(image))
            return tf.image.decode_and_crop_jpeg(image, tf.stack([y, x, h, w]), channels=3)

        crop = tf.cond(tf.io.is_jpeg(image), jpeg, lambda: crop_decoded(_decode(image)))
    else:
        crop = crop_decoded(image)
    out = tf.image.resize(crop, [image_size, image_size], method="bilinear", antialias=True)
    if flip:
        out = tf.cond(_flip_mask(seed_flip, tf.constant(1))[0], lambda: tf.reverse(out, axis=[1]), lambda: out)
    return tf.ensure_shape(out, [image_size, image_size, 3])


def center_crop_resize(image: tf.Tensor, image_size: int, crop_pct: float = 1.0) -> tf.Tensor:
    """Evaluation transform: shorter side -> round(S / crop_pct), then the central S x S. Works on (H, W, 3)
    and (B, H, W, 3), uint8 or float; returns float32 0..255. An S x S input passes through unchanged."""
    if image.dtype == tf.string:
        image = _decode(image)
    static = image.shape[-3:-1]
    if static[0] == image_size and static[1] == image_size:
        return tf.cast(image, tf.float32)
    shape = tf.shape(image)
    h = tf.cast(shape[-3], tf.float32)
    w = tf.cast(shape[-2], tf.float32)
    short = tf.round(image_size / crop_pct)
    factor = short / tf.minimum(h, w)
    new_h = tf.cast(tf.maximum(tf.round(h * factor), image_size), tf.int32)
    new_w = tf.cast(tf.maximum(tf.round(w * factor), image_size), tf.int32)
    image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
    top = (new_h - image_size) // 2
    left = (new_w - image_size) // 2
    image = image[..., top : top + image_size, left : left + image_size, :]
    return tf.ensure_shape(image, [*image.shape[:-3], image_size, image_size, 3])


def _normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """float32 0..255 -> (x / 255 - mean) / std, as one multiply-add."""
    std = np.asarray(std, np.float32)
    scale = tf.constant(1.0 / (255.0 * std), tf.float32)
    shift = tf.constant(-np.asarray(mean, np.float32) / std, tf.float32)
    return tf.cast(image, tf.float32) * scale + shift


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True  # parallel maps keep their input order: batches depend on (seed, step) only
    return options


# --------------------------------------------------------------------------------------------------------------
# Iterators
# --------------------------------------------------------------------------------------------------------------


def _epoch_seeds(seed: int, epoch: int, process_index: int) -> tuple[int, int, int]:
    """(shuffle buffer, file order, augmentation) seeds of one epoch on one process: independent streams."""
    a, b, c = np.random.SeedSequence([seed, epoch, process_index]).generate_state(3, dtype=np.uint32)
    return int(a), int(b), int(c)


class TrainIterator(Iterator[dict]):
    """Endless training batches {'image': float32 (B, S, S, 3), 'label': int32 (B,)}, step after step.

    `step` is the index of the next batch; batch k is the same whether reached by k calls of `next` or by
    `make_train_iterator(..., start_step=k)`."""

    def __init__(self, epoch_dataset: Callable[[int, int], tf.data.Dataset], steps_per_epoch: int, start_step: int,
                 num_examples: int):
        self._epoch_dataset = epoch_dataset
        self.steps_per_epoch = steps_per_epoch
        self.num_examples = num_examples  # this process's shard of the training split
        self.step = start_step
        self._it: Iterator[dict] | None = None

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            # Each epoch is its own pipeline, seeded by the epoch number: that is what makes
            # (epoch, offset) resumable; the refill of the shuffle buffer at the boundary is short.
            self._it = self._epoch_dataset(self.epoch, self.step % self.steps_per_epoch).as_numpy_iterator()
        try:
            batch = next(self._it)
        except StopIteration:
            raise RuntimeError(
                f"the training split ended before step {self.step} of epoch {self.epoch} "
                f"({self.steps_per_epoch} steps expected): its metadata does not match its data"
            ) from None
        self.step += 1
        if self.step % self.steps_per_epoch == 0:
            self._it = None  # epoch done (the rest, < one batch, is dropped)
        return batch


class EvalIterator(Iterator[dict]):
    """One pass: {'image', 'label', 'valid': bool (B,)}; the last batches are padded (valid False).

    `len()` is the number of batches, the same on every process."""

    def __init__(self, ds: tf.data.Dataset, num_batches: int, num_examples: int):
        self._it = ds.as_numpy_iterator()
        self.num_batches = num_batches
        self.num_examples = num_examples  # real examples on this process

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> EvalIterator:
        return self

    def __next__(self) -> dict:
        return next(self._it)


def make_train_iterator(
    cfg: Any,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    start_step: int = 0,
    augment: bool = True,
    crop_scale: Sequence[float] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """Endless, deterministic, resumable training batches of this process's shard of `data.train_split`.

    batch_size: per process. Each epoch is a fresh permutation seeded by (seed, epoch, process); the last
    partial batch of an epoch is dropped. augment: random-resized-crop (area `crop_scale`, default
    data.crop_scale) + horizontal flip (data.flip); else the evaluation transform. start_step: resume point.
    """
    dc = DataConfig.from_cfg(cfg)
    batch_size = _check_int(batch_size, "batch_size", 1)
    image_size = _check_int(image_size, "image_size", 1)
    seed = _check_int(seed, "seed", 0)
    start_step = _check_int(start_step, "start_step", 0)
    scale = dc.crop_scale if crop_scale is None else check_crop_scale(crop_scale, "crop_scale")
    pi, pc = _processes(process_index, process_count)
    source = _make_source(dc)
    n = source.split_size(dc.train_split, pi, pc, True)
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size={batch_size} (per process) exceeds the {n} training examples of process {pi}'s shard of "
            f"data.train_split={dc.train_split!r}; lower the batch size or use a larger split"
        )
    base = source.examples(dc.train_split, pi, pc, True, None)[0].cache() if dc.cache else None
    buffer = min(dc.shuffle_buffer, n)
    fixed = source.fixed_shape

    def epoch_dataset(epoch: int, offset: int) -> tf.data.Dataset:
        shuffle_seed, order_seed, aug_seed = _epoch_seeds(seed, epoch, pi)
        if base is not None:
            ds, shuffled = base, False
        else:
            ds, shuffled = source.examples(dc.train_split, pi, pc, True, order_seed)
        if not shuffled:
            ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        skip = offset * batch_size  # resume inside the epoch: skip before the costly decode/augment
        if fixed is not None:
            # Equal-sized images: batch first, then augment the whole batch, keyed by (epoch, step in epoch).
            ds = ds.skip(skip).batch(batch_size, drop_remainder=True).enumerate(start=offset)

            def transform(i, b):
                key = tf.stack([tf.constant(aug_seed, tf.int64), i])
                if augment:
                    image = augment_batch(b["image"], key, image_size, scale, dc.flip)
                else:
                    image = center_crop_resize(b["image"], image_size, dc.eval_crop_pct)
                return {"image": _normalize(image, dc.mean, dc.std), "label": b["label"]}

            ds = ds.map(transform, num_parallel_calls=_AUTOTUNE)
        else:
            # Images of any size: crop each (JPEG: decode only the window), keyed by (epoch, position).
            ds = ds.enumerate().skip(skip)

            def transform_one(i, ex):
                key = tf.stack([tf.constant(aug_seed, tf.int64), i])
                if augment:
                    image = augment_example(ex["image"], key, image_size, scale, dc.flip)
                else:
                    image = center_crop_resize(ex["image"], image_size, dc.eval_crop_pct)
                return {"image": image, "label": ex["label"]}

            ds = ds.map(transform_one, num_parallel_calls=_AUTOTUNE)
            ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=_AUTOTUNE)
            ds = ds.map(lambda b: {"image": _normalize(b["image"], dc.mean, dc.std), "label": b["label"]})
        return ds.prefetch(_AUTOTUNE).with_options(_options())

    return TrainIterator(epoch_dataset, steps_per_epoch, start_step, n)


def make_eval_iterator(
    cfg: Any,
    split: str | None = None,
    *,
    batch_size: int,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalIterator:
    """One pass over this process's shard of `split` (default data.test_split), no augmentation.

    Every example is seen exactly once over all processes. Batches have static shape: the tail is padded
    with zero images, label 0 and valid=False, and every process yields the same number of batches."""
    dc = DataConfig.from_cfg(cfg)
    split = dc.test_split if split is None else split
    if not isinstance(split, str) or not split:
        raise ConfigError(f"split={split!r} must be a split name such as 'test' or 'validation'")
    batch_size = _check_int(batch_size, "batch_size", 1)
    image_size = _check_int(image_size, "image_size", 1)
    pi, pc = _processes(process_index, process_count)
    source = _make_source(dc)
    sizes = [source.split_size(split, i, pc, False) for i in range(pc)]
    if max(sizes) == 0:
        raise ConfigError(f"split {split!r} of {dc.name} holds no examples; set data.test_split to another split")
    n = sizes[pi]
    num_batches = -(-max(sizes) // batch_size)
    ds, _ = source.examples(split, pi, pc, False, None)
    ds = ds.map(
        lambda ex: {
            "image": center_crop_resize(ex["image"], image_size, dc.eval_crop_pct),
            "label": ex["label"],
            "valid": tf.constant(True),
        },
        num_parallel_calls=_AUTOTUNE,
    )
    pad = num_batches * batch_size - n
    if pad:
        filler = {
            "image": tf.zeros([image_size, image_size, 3], tf.float32),
            "label": tf.constant(0, tf.int32),
            "valid": tf.constant(False),
        }
        ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(pad))
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda b: {**b, "image": _normalize(b["image"], dc.mean, dc.std)}, num_parallel_calls=_AUTOTUNE)
    ds = ds.prefetch(_AUTOTUNE).with_options(_options())
    return EvalIterator(ds, num_batches, n)


__all__ = [
    "DataConfig",
    "DatasetInfo",
    "EvalIterator",
    "FolderSource",
    "SOURCES",
    "TfdsSource",
    "TrainIterator",
    "augment_batch",
    "augment_example",
    "center_crop_resize",
    "check_crop_scale",
    "dataset_info",
    "make_eval_iterator",
    "make_train_iterator",
    "rrc_windows",
]
