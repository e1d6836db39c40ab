"""Process-level settings that must be made before JAX starts its threads.

Host allocator (CPU backend). XLA's CPU runtime allocates one temporary arena per execution of a compiled step
(1.6 GiB for the CIFAR-size pretraining step at batch 128) from a worker thread. glibc serves such a request with a
fresh `mmap` and gives it back with `munmap` when the step ends, so every step page-faults (and the kernel zeroes)
the whole arena again: ~415,000 minor faults per step, measured. Keeping all threads on the main malloc arena,
without mmap for large blocks and with a high trim threshold, lets the next step reuse the same memory: 0 faults
per step and ~+10% pretraining-step throughput on a 2-core CPU (bench/throughput.py). The cost is that the process
keeps its peak host memory until it exits, which is what a training process does anyway.

Only where JAX runs on the CPU: no GPU/TPU plugin installed, or `JAX_PLATFORMS=cpu`. On a GPU machine the host
allocator is not on the step's path, and one malloc arena for all threads slowed XLA's multi-threaded GPU
compilation so much that no pretraining step compiled within 50 s on an H100 (measured). Set
`SSLVIT_HOST_MALLOC=default` to leave glibc's defaults alone, `SSLVIT_HOST_MALLOC=keep` to apply it regardless.

Compiled steps persist (`enable_compile_cache`). The scripts keep JAX's persistent compilation cache in
`~/.cache/sslvit/jax` (`$XDG_CACHE_HOME`; at most 2 GiB, least recently used entries go first): a run that starts
again with the same step (a resume, a requeue, the next job of a sweep, the next script on the same encoder) loads
the executable instead of compiling it: on a 2-core CPU the default pretraining step takes 13-17 s to compile and
1.6-2.3 s to trace, lower and load from the cache. The executables are the same either way (JAX keys them by the
lowered program, devices, compile options and versions), so results do not change. `JAX_COMPILATION_CACHE_DIR`
chooses another dir, and set empty turns the cache off; `JAX_COMPILATION_CACHE_MAX_SIZE` (bytes, -1 unlimited)
another size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os
import sys
from pathlib import Path

from sslvit.paths import user_cache_dir

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False
CACHE_DIR_ENV, CACHE_SIZE_ENV = "JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE"
DEFAULT_CACHE_BYTES = 2 * 2**30

log = logging.getLogger(__name__)


def _runs_on_cpu() -> bool:
    """Whether JAX will use the CPU backend, decided without initialising (or importing) JAX: JAX_PLATFORMS, else
    whether an accelerator plugin is installed. GPU (CUDA, ROCm) and Metal plugins live in the `jax_plugins`
    namespace package, where JAX discovers them; TPUs come with `libtpu`. A module lookup, not a scan of the
    installed distributions: this runs at every script start."""
    platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", "")).strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu"))


def keep_host_memory() -> bool:
    """Make glibc malloc reuse freed large blocks instead of unmapping them (module docstring). Call before JAX
    creates its CPU client (before the first computation); later calls are no-ops. Returns whether it applied
    (False off Linux/glibc, where JAX will not run on the CPU, or with SSLVIT_HOST_MALLOC=default)."""
    global _applied
    if _applied:
        return True
    choice = os.environ.get("SSLVIT_HOST_MALLOC", "").lower()
    if choice == "default" or not sys.platform.startswith("linux") or (choice != "keep" and not _runs_on_cpu()):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Arena limit first: threads created from now on share the main arena, whose large blocks then come from
    # the heap (no mmap) and stay there when freed (trim only beyond 2 GiB free at the top).
    _applied = bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def compile_cache_dir() -> Path | None:
    """Where the scripts' compiled steps persist: `JAX_COMPILATION_CACHE_DIR` when set (empty: nowhere), else
    `~/.cache/sslvit/jax` (module docstring)."""
    if CACHE_DIR_ENV in os.environ:
        value = os.environ[CACHE_DIR_ENV].strip()
        return Path(value).expanduser() if value else None
    return user_cache_dir("jax")


def enable_compile_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in `compile_cache_dir()` (module docstring), before the first
    compile; returns the dir, or None when off. A dir that cannot be made or written leaves the cache off with one
    warning: a cache never stops a run."""
    path = compile_cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as e:
        log.warning(
            "compiled steps are not cached: %s (%s); set %s to a writable dir, or empty to turn this off",
            path,
            e.strerror or e,
            CACHE_DIR_ENV,
        )
        return None
    import jax  # noqa: PLC0415 - this module runs before JAX is imported (the allocator setting)

    jax.config.update("jax_compilation_cache_dir", str(path))
    if CACHE_DIR_ENV not in os.environ and CACHE_SIZE_ENV not in os.environ:  # a dir of the user's keeps its size
        jax.config.update("jax_compilation_cache_max_size", DEFAULT_CACHE_BYTES)
    return path
