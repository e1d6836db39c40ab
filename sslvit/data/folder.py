"""The `folder` source: the user's own images in `data.path/<split>/<class>/**/*.{jpg,jpeg,png}`; labels from the
sorted class directory names of the train split. Images are checked once at start-up (`data.verify_images`):
a corrupt file stops the run naming it, or is left out and counted (`data.on_corrupt`).

TensorFlow is imported when the examples are read, not when this module is imported.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sslvit.data.config import IMAGE_EXTENSIONS, DataConfig, DatasetInfo, check_num_classes, one_line
from sslvit.data.sources import SOURCES, Source
from sslvit.errors import ConfigError

log = logging.getLogger(__name__)

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
    from PIL import Image  # noqa: PLC0415

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
        return f"{type(e).__name__}: {one_line(e, 120)}"
    return None


# (path, size, mtime_ns) -> problem or None: a second scan of an unchanged folder re-reads no image.
_VERIFIED: dict[tuple[str, int, int], str | None] = {}


@dataclasses.dataclass(frozen=True)
class _FolderSplit:
    paths: np.ndarray  # str, in the canonical (seeded) order, corrupt files removed
    labels: np.ndarray  # int32
    skipped: tuple[str, ...]


@SOURCES.register("folder")
class FolderSource(Source):
    """Images in `path/<split>/<class>/**/*.{jpg,jpeg,png}`; labels from the sorted train class directories.

    The canonical order of a split is a fixed pseudo-random permutation of the sorted file list, so slices
    ('train[:10%]') and process shards mix all classes instead of taking the first few."""

    fixed_shape = None

    def __init__(self, dc: DataConfig):
        super().__init__(dc)
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
        check_num_classes(dc, len(self.class_names))
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
        from sslvit.data._tf import AUTOTUNE, tf  # noqa: PLC0415

        data = self._split(split, "split")
        sl = self._shard_range(len(data.paths), index, count, drop_remainder)
        paths, labels = data.paths[sl], data.labels[sl]
        if order_seed is not None:  # a full permutation of the file list costs nothing: no shuffle buffer needed
            perm = np.random.default_rng(order_seed).permutation(len(paths))
            paths, labels = paths[perm], labels[perm]
        ds = tf.data.Dataset.from_tensor_slices({"image": paths, "label": labels})
        ds = ds.map(lambda ex: {"image": tf.io.read_file(ex["image"]), "label": ex["label"]},
                    num_parallel_calls=AUTOTUNE)
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
