"""The `folder` source: the user's own images in `data.path/<split>/<class>/**/*.{jpg,jpeg,png}`; labels from the
sorted class directory names of the train split.

Start-up costs a listing of the files, not a decode of every image. Images are checked (`data.verify_images`) once:
the outcome is kept in a verification manifest on disk (sslvit/data/manifest.py), keyed by each file's path, size and
mtime, so a later start (resume, requeue, sweep job, other processes) checks only new or changed files. A corrupt file
stops the run naming it, or is left out and counted (`data.on_corrupt`; the count goes into the run's results). The
processes of a multi-host run share the check: each checks every n-th file and they exchange the verdicts (one
all-gather per split), so no process checks the whole split. A file that fails to decode later anyway (changed since,
or `data.verify_images=false`) stops the run with one line naming it (sslvit/data/iterators.py).

Batches come from Pillow's pipeline (sslvit/data/pil_iterators.py) unless `data.pipeline=tf`; then TensorFlow is
imported when the examples are read, not when this module is imported.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import operator
import os
import re
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sslvit.data import manifest
from sslvit.data.config import IMAGE_EXTENSIONS, DataConfig, DatasetInfo, check_num_classes, one_line
from sslvit.data.manifest import Listing
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


@dataclasses.dataclass(frozen=True)
class _FolderSplit:
    paths: np.ndarray  # bytes (1 byte a character, not str's 4), in the canonical (seeded) order, corrupt files removed
    labels: np.ndarray  # int32
    skipped: tuple[str, ...]


# Scans already made by this process: (split dir, classes, check settings) -> (split, [(dir, mtime_ns)]). Reused while
# no directory of the split changed (a file added, removed or renamed changes its directory's mtime); in a multi-process
# run reused as they are, so that every process runs the same collectives in the same order.
_SCANS: dict[tuple, tuple[_FolderSplit, list[tuple[str, int]]]] = {}


def _process_group() -> tuple[int, int]:
    """(index, count) of this JAX process; (0, 1) when JAX is not even imported (then no multi-process run is on)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return 0, 1
    return jax.process_index(), jax.process_count()


def _list_split(split_dir: Path, classes: Sequence[str], index: dict[str, int]) -> tuple[Listing, list]:
    """The image files under `split_dir/<class>/` in the canonical order (classes sorted, then each directory's
    entries sorted by name, depth first: the order of `sorted(Path.rglob(...))`), with sizes and mtimes; and the
    directories visited with their mtimes. One `scandir` per directory and one `stat` per file."""
    rel: list[str] = []
    labels: list[int] = []
    size: list[int] = []
    mtime: list[int] = []
    dirs: list[tuple[str, int]] = [(str(split_dir), os.stat(split_dir).st_mtime_ns)]
    by_name = operator.attrgetter("name")

    def walk(path: str, prefix: str, label: int) -> None:
        with os.scandir(path) as it:
            entries = sorted(it, key=by_name)
        for e in entries:
            if e.is_dir():
                dirs.append((e.path, e.stat().st_mtime_ns))
                walk(e.path, f"{prefix}{e.name}/", label)
            elif e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".") and e.is_file():
                st = e.stat()
                rel.append(prefix + e.name)
                labels.append(label)
                size.append(st.st_size)
                mtime.append(st.st_mtime_ns)

    for c in classes:
        path = os.path.join(split_dir, c)
        dirs.append((path, os.stat(path).st_mtime_ns))
        walk(path, f"{c}/", index[c])
    listing = Listing(rel, np.asarray(labels, np.int32), np.asarray(size, np.int64), np.asarray(mtime, np.int64))
    return listing, dirs


def _unchanged(dirs: list[tuple[str, int]]) -> bool:
    try:
        return all(os.stat(d).st_mtime_ns == m for d, m in dirs)
    except OSError:
        return False


@SOURCES.register("folder")
class FolderSource(Source):
    """Images in `path/<split>/<class>/**/*.{jpg,jpeg,png}`; labels from the sorted train class directories.

    The canonical order of a split is a fixed pseudo-random permutation of the sorted file list, so slices
    ('train[:10%]') and process shards mix all classes instead of taking the first few."""

    fixed_shape = None

    @classmethod
    def iterators_for(cls, dc: DataConfig) -> str:
        return cls.iterators if dc.pipeline == "tf" else "sslvit.data.pil_iterators"

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
            raise ConfigError(f"'{top}' holds no class directories; put each class's images in {top}/<class_name>/")
        check_num_classes(dc, len(self.class_names))
        self._splits: dict[str, _FolderSplit] = {}
        train = self._split(dc.train_split, "data.train_split")
        test_dir, _, _ = _parse_folder_split(dc.test_split, "data.test_split")
        # A missing test split is allowed (pretraining needs none); make_eval_iterator rejects it.
        test = self._split(dc.test_split, "data.test_split") if (self.root / test_dir).is_dir() else None
        skipped = train.skipped + (test.skipped if test is not None else ())
        if skipped:
            log.warning(
                "data.on_corrupt=skip: left out %d corrupt image(s) under %s, e.g. %s",
                len(skipped),
                dc.path,
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
        dc = self.dc
        cache_key = (str(split_dir), self.class_names, dc.verify_images, dc.on_corrupt, dc.manifest_dir)
        cached = _SCANS.get(cache_key)
        if cached is not None and (_process_group()[1] > 1 or _unchanged(cached[1])):
            return cached[0]
        t0 = time.perf_counter()
        listing, dirs = _list_split(split_dir, extra, index)
        if not len(listing):
            raise ConfigError(
                f"'{split_dir}' holds no images ({'/'.join(IMAGE_EXTENSIONS)}) in class sub-directories; "
                f"expected {split_dir}/<class>/<image>"
            )
        prefix = f"{split_dir}{os.sep}"
        paths = np.array([os.fsencode(prefix + r) for r in listing.rel])
        listed = time.perf_counter() - t0
        skipped: tuple[str, ...] = ()
        keep = np.ones(len(listing), bool)
        if dc.verify_images:
            problems = self._check(name, listing, paths)
            if problems:
                bad = sorted(problems)
                first = os.fsdecode(paths[bad[0]])
                if dc.on_corrupt == "error":
                    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                    raise ConfigError(
                        f"corrupt or unreadable image '{first}' ({problems[bad[0]]}){more}; fix or delete it, "
                        "or set data.on_corrupt=skip to leave such files out"
                    )
                skipped = tuple(os.fsdecode(paths[i]) for i in bad)
                keep[bad] = False
                if not keep.any():
                    raise ConfigError(f"every image in '{split_dir}' is corrupt, e.g. '{first}'")
        log.info(
            "folder split %s: %d images listed in %.1fs%s",
            split_dir,
            len(listing),
            listed,
            f", checked in {time.perf_counter() - t0 - listed:.1f}s" if dc.verify_images else "",
        )
        paths, labels = paths[keep], listing.labels[keep]
        order = np.random.default_rng(0).permutation(len(paths))  # fixed: the canonical order of the split
        split = _FolderSplit(paths[order], labels[order], skipped)
        _SCANS[cache_key] = (split, dirs)
        return split

    def _check(self, name: str, listing: Listing, paths: np.ndarray) -> dict[int, str]:
        """Problems of the listed files, by index: from the manifest where a file is unchanged, else checked now
        (this process's share of them in a multi-process run); the manifest is then brought up to date."""
        dirs = manifest.manifest_dirs(self.root, self.dc.manifest_dir)
        blob = listing.blob()
        old = manifest.load(dirs, name)
        n = len(listing)
        known, recorded, exact = old.match(listing, blob) if old is not None else (np.zeros(n, bool), {}, False)
        pi, pc = _process_group()
        own = np.arange(pi, n, pc)  # every pc-th file, whatever this process's manifest says: same work split on all
        todo = own[~known[own]]
        if len(todo):
            log.info(
                "checking %d of %d images of %s (the others are in the verification manifest)%s",
                len(todo),
                n,
                self.root / name,
                f", process {pi} of {pc}" if pc > 1 else "",
            )
        found = _verify_files(paths[todo])
        problems = {i: p for i, p in recorded.items() if i % pc == pi}
        problems.update({int(todo[j]): p for j, p in found.items()})
        checked = len(todo)
        if pc > 1:
            bad, checked = _share_verdicts(n, zlib.crc32(blob), problems, checked, self.root / name)
            for i in bad - problems.keys():  # found by another process: the reason recorded, or read again (a few)
                problems[i] = (
                    recorded.get(i) or _image_problem(os.fsdecode(paths[i])) or "failed the check on another process"
                )
        if pi == 0 and not exact:
            manifest.save(dirs, name, manifest.Manifest.of(listing, problems))
        return problems

    def _shard_range(self, n: int, index: int, count: int, drop_remainder: bool) -> slice:
        if drop_remainder:  # equal shards: every process runs the same number of training steps
            per = n // count
            return slice(index * per, (index + 1) * per)
        return slice(index * n // count, (index + 1) * n // count)

    def split_size(self, split, index, count, drop_remainder):
        n = len(self._split(split, "split").paths)
        sl = self._shard_range(n, index, count, drop_remainder)
        return sl.stop - sl.start

    def file_shard(self, split, index, count, drop_remainder, order_seed) -> tuple[np.ndarray, np.ndarray]:
        """(paths as bytes, int32 labels) of process `index`'s shard of `split`, in the canonical order or, with
        `order_seed`, a permutation of it."""
        data = self._split(split, "split")
        sl = self._shard_range(len(data.paths), index, count, drop_remainder)
        paths, labels = data.paths[sl], data.labels[sl]
        if order_seed is not None:  # a full permutation of the file list costs nothing: no shuffle buffer needed
            perm = np.random.default_rng(order_seed).permutation(len(paths))
            paths, labels = paths[perm], labels[perm]
        return paths, labels

    def files(self, split, index, count, drop_remainder, order_seed):
        return [os.fsdecode(p) for p in self.file_shard(split, index, count, drop_remainder, order_seed)[0]]

    def examples(self, split, index, count, drop_remainder, order_seed):
        from sslvit.data._tf import AUTOTUNE, no_autograph, tf  # noqa: PLC0415

        paths, labels = self.file_shard(split, index, count, drop_remainder, order_seed)
        ds = tf.data.Dataset.from_tensor_slices({"image": paths, "label": labels})
        ds = ds.map(
            no_autograph(lambda ex: {"image": tf.io.read_file(ex["image"]), "label": ex["label"]}),
            num_parallel_calls=AUTOTUNE,
        )
        return ds, order_seed is not None


def _verify_files(paths: Sequence) -> dict[int, str]:
    """Problems of the images among `paths` (str or bytes), by position, checked in a thread pool (PIL releases the
    GIL while decoding)."""
    if not len(paths):
        return {}
    workers = min(32, 4 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        verdicts = pool.map(_image_problem, (os.fsdecode(p) for p in paths), chunksize=64)
        return {i: problem for i, problem in enumerate(verdicts) if problem is not None}


def _share_verdicts(n: int, crc: int, problems: dict[int, str], checked: int, where: Path) -> tuple[set[int], int]:
    """All processes' bad files (indices) and how many files they checked together: two all-gathers, which every
    process runs once per split scan. The processes must have listed the same files (a shared file system)."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    heads = np.asarray(multihost_utils.process_allgather(np.asarray([n, crc, checked], np.int64)))
    if not (heads[:, :2] == heads[0, :2]).all():
        raise ConfigError(
            f"the processes of this run list different files in '{where}' ({heads[:, 0].tolist()} "
            "images): data.path must be one file system shared by every host, unchanged while it runs"
        )
    flags = np.zeros(n, np.int8)
    flags[list(problems)] = 1
    every = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, n)
    return set(np.flatnonzero(every.any(axis=0)).tolist()), int(heads[:, 2].sum())


# A new kind of source = one class taking a DataConfig + one entry here; other names are tfds names.
