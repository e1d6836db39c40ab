"""Paths a user names (run dirs, output files): checked before anything is computed, each failure one
`ConfigError` line naming the key; and the atomic write every small result file goes through."""

from __future__ import annotations

import os
from pathlib import Path

from sslvit.errors import ConfigError


def absolute(path: str | os.PathLike) -> Path:
    """`path` absolute, `~` expanded (symlinks kept as given)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def user_cache_dir(*parts: str) -> Path:
    """`$XDG_CACHE_HOME/sslvit/<parts>` (`~/.cache/sslvit/...` by default): what the project caches per user (folder
    verification manifests of read-only datasets, compiled steps)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "sslvit", *parts)


def _why_unwritable(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
    except OSError:
        pass
    return "it is not writable (permission denied)"


def _check_ancestor(p: Path, path, key: str, fails: str, fix: str) -> None:
    """The nearest existing ancestor of `p` (which does not exist yet) must be a writable directory."""
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(
            f"{key}={os.fspath(path)} lies under {parent}, which is a file: choose a path under a directory"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={os.fspath(path)} {fails}: {parent} {_why_unwritable(parent)[3:]}; {fix}")


def check_dir(path: str | os.PathLike, key: str) -> Path:
    """`path` as an absolute dir path that is, or can be created as, a writable directory; one-line ConfigError
    otherwise (a file, a path under a file, no permission, a read-only file system). Creates nothing."""
    p = absolute(path)
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{key}={os.fspath(path)} is a file, not a directory: choose a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{key}={os.fspath(path)} cannot be written: {_why_unwritable(p)}; choose another directory"
            )
        return p
    _check_ancestor(p, path, key, "cannot be created", "choose another directory")
    return p


def check_file(path: str | os.PathLike, key: str) -> Path:
    """`path` as a file that can be written (its directory exists or can be created, and it is not a directory);
    one-line ConfigError otherwise. Creates nothing."""
    p = absolute(path)
    if p.is_dir():
        raise ConfigError(f"{key}={os.fspath(path)} is a directory: name a file, e.g. {os.fspath(path)}/grid.png")
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(f"{key}={os.fspath(path)} cannot be written: {_why_unwritable(p)}; choose another path")
    _check_ancestor(p, path, key, "cannot be written", "choose another path")
    return p


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and an atomic rename; a stop signal
    waits until the rename is done (no stray temporary file)."""
    from sslvit.signals import deferred  # noqa: PLC0415

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with deferred():
        tmp.write_text(text)
        os.replace(tmp, path)


__all__ = ["absolute", "atomic_write_text", "check_dir", "check_file"]
