"""The verification manifest of a folder dataset: which files of a split were checked, and what was wrong with them.

Checking every image of an ImageNet-size folder takes many minutes; listing it takes seconds. So the result of the
check is kept on disk, one file per split, keyed by each file's relative path, size and modification time: a later
start (a resume, a requeued job, another sweep job, the other processes of a multi-host run) lists the split, finds
every unchanged file in the manifest and checks only new or changed ones.

Where it lives (`manifest_dirs`): `data.manifest_dir` when set; else `<data.path>/.sslvit/` when that is writable
(next to the data: shared by every host that reads it); else a per-dataset directory in the user's cache
(`$XDG_CACHE_HOME/sslvit/folders/<hash of the dataset path>/`, `~/.cache/...` by default), which is what a read-only
dataset gets. All of them are read (the first that holds a valid manifest wins): a manifest an administrator left in
a dataset before making it read-only serves every user.

Format: one uncompressed `.npz` (numpy only, no pickle), written aside and renamed (readers never see half a file; two
processes writing at once each leave a whole, valid manifest): relative paths joined by NUL (the one byte no file name
holds), sizes and mtimes (int64 ns), and the indices and reasons of the files that failed the check. `VERSION` changes
when the check changes, which makes old manifests stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from sslvit.paths import user_cache_dir

log = logging.getLogger(__name__)

VERSION = 1  # of the format and of the image check (sslvit/data/folder.py: _image_problem)
SUBDIR = ".sslvit"
SEP = b"\0"


@dataclasses.dataclass
class Listing:
    """The image files of one split, in the canonical (sorted) order: relative paths, labels, sizes, mtimes."""

    rel: list[str]
    labels: np.ndarray  # int32
    size: np.ndarray  # int64 bytes
    mtime: np.ndarray  # int64 ns

    def __len__(self) -> int:
        return len(self.rel)

    def blob(self) -> bytes:
        return SEP.join(os.fsencode(p) for p in self.rel)


@dataclasses.dataclass
class Manifest:
    """Checked files: `blob` (NUL-joined relative paths), their sizes and mtimes, and {index: problem} of the bad."""

    blob: bytes
    size: np.ndarray
    mtime: np.ndarray
    problems: dict[int, str]

    @classmethod
    def of(cls, listing: Listing, problems: dict[int, str]) -> "Manifest":
        return cls(listing.blob(), listing.size, listing.mtime, dict(problems))

    def match(self, listing: Listing, blob: bytes | None = None) -> tuple[np.ndarray, dict[int, str], bool]:
        """(known: bool per listed file, problems of the known files by listing index, whether the manifest records
        exactly the listed files). A file is known when its path, size and mtime are those recorded."""
        blob = listing.blob() if blob is None else blob
        if blob == self.blob and np.array_equal(listing.size, self.size) and np.array_equal(listing.mtime, self.mtime):
            return np.ones(len(listing), bool), dict(self.problems), True  # unchanged: the common case, no file work
        names = self.blob.split(SEP) if self.blob else []
        index = {name: i for i, name in enumerate(names)}
        known = np.zeros(len(listing), bool)
        problems = {}
        for j, rel in enumerate(listing.rel):
            i = index.get(os.fsencode(rel))
            if i is not None and self.size[i] == listing.size[j] and self.mtime[i] == listing.mtime[j]:
                known[j] = True
                if i in self.problems:
                    problems[j] = self.problems[i]
        return known, problems, False


def manifest_dirs(root: Path, manifest_dir: str | None) -> list[Path]:
    """Where the manifests of the dataset at `root` are read from, the one to write first (see the module doc)."""
    if manifest_dir is not None:
        return [Path(manifest_dir)]
    key = hashlib.sha1(os.fsencode(os.path.realpath(root))).hexdigest()[:16]
    beside, cached = root / SUBDIR, user_cache_dir("folders", key)
    writable = os.access(beside if beside.is_dir() else root, os.W_OK)
    return [beside, cached] if writable else [cached, beside]


def filename(split: str) -> str:
    return f"manifest-{split}.npz"


def load(dirs: list[Path], split: str) -> Manifest | None:
    """The first valid manifest of `split` in `dirs`, or None. A damaged or outdated file is ignored (and replaced)."""
    for d in dirs:
        path = d / filename(split)
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"]) != VERSION:
                    continue
                bad = z["bad_index"].astype(np.int64)
                reasons = z["bad_reason"].tobytes().split(SEP) if len(bad) else []
                return Manifest(
                    z["paths"].tobytes(),
                    z["size"].astype(np.int64),
                    z["mtime"].astype(np.int64),
                    {int(i): r.decode(errors="replace") for i, r in zip(bad, reasons)},
                )
        except Exception as e:
            log.warning("ignoring the unreadable verification manifest %s (%s)", path, e)
    return None


def save(dirs: list[Path], split: str, manifest: Manifest) -> Path | None:
    """Write `manifest` atomically into the first directory of `dirs` that takes it; None when none does (then the
    next start checks the images again, which is slow but correct)."""
    bad = sorted(manifest.problems)
    arrays = dict(
        version=np.asarray(VERSION),
        paths=np.frombuffer(manifest.blob, np.uint8),
        size=manifest.size,
        mtime=manifest.mtime,
        bad_index=np.asarray(bad, np.int64),
        bad_reason=np.frombuffer(SEP.join(manifest.problems[i].encode() for i in bad), np.uint8),
    )
    errors = []
    for d in dirs:
        path = d / filename(split)
        tmp = d / f".{path.name}.tmp{os.getpid()}"
        try:
            d.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
            return path
        except OSError as e:
            errors.append(f"{d}: {e.strerror or e}")
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    log.warning(
        "could not write the verification manifest of split %r (%s): the next start checks its images again; "
        "set data.manifest_dir to a writable directory",
        split,
        "; ".join(errors),
    )
    return None


__all__ = ["Listing", "Manifest", "VERSION", "filename", "load", "manifest_dirs", "save"]
