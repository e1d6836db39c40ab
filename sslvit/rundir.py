"""A run dir: its layout, who owns it, and the writes a stage makes into it.

    <run dir>/
      .stage              the stage the dir belongs to (one line), written when the run first writes
      .lock               locked by the process running in the dir for the run's life; says which one (JSON)
      .hydra/             the resolved config, overrides and Hydra's config, written when the run first writes
      <stage>.log         the run's log (Hydra's job log, through `RunLogHandler`)
      checkpoints/<step>/ orbax checkpoints: the train state and its meta (sslvit/checkpoint.py)
      metrics.jsonl       one JSON object per logged step (sslvit/metrics.py)
      tb/                 TensorBoard event files
      tokenizer.npz       the pretraining target's fitted state (k-means codebook)
      results.json        the stage's final results, written once it has finished

The rules, checked by `RunDir.claim` before a run writes anything (each refusal is one `RunDirError` line):

- the path must be a directory, or creatable as one, and writable (not a file, not under a file, not on a read-only
  file system);
- a run dir belongs to one stage: a pretraining run's dir is never a probe's, and the other way round;
- one run at a time: the run holds an exclusive lock (`flock` on `.lock`) for its whole life. The kernel releases
  it on any exit, kill -9 included, so the lock of a dead process is stale by construction and the next run takes
  it. In a multi-process run, process 0 holds it and the others check that it is held (`RunDir.open`);
- a dir that holds a run's files (checkpoints, tokenizer, metrics, results) is continued only with `resume=true`;
  a stage without `resume` (the linear probe) refuses a dir that holds finished results.

Nothing goes into an existing run dir before the run *commits* (`commit()`: for a resumed training run, after
its checkpoint was restored): until then the job log is held in memory (`RunLogHandler`) and the resolved config
(`hold_records`) waits, so a refused or failed start leaves the dir byte for byte as it was. A new dir (one that
was empty when the run took it) is written from the start: the log of a failed first attempt is worth keeping.

Only the main process writes files of its own; checkpoints are written collectively by orbax.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import weakref
from pathlib import Path
from typing import Any, Mapping

from sslvit.errors import ConfigError
from sslvit.paths import absolute as _key
from sslvit.paths import atomic_write_text, check_dir

RESULTS_FILE = "results.json"
CHECKPOINT_SUBDIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
TOKENIZER_FILE = "tokenizer.npz"
HYDRA_SUBDIR = ".hydra"
STAGE_FILE = ".stage"
LOCK_FILE = ".lock"

# What a run makes (a dir holding any of them is continued only with resume=true), and the stages whose job logs
# (`<stage>.log`) name the owner of a dir made before STAGE_FILE existed.
RUN_FILES = (CHECKPOINT_SUBDIR, TOKENIZER_FILE, METRICS_FILE, TB_DIR, RESULTS_FILE)
STAGES = ("pretrain", "finetune", "linear_probe")

log = logging.getLogger(__name__)


class RunDirError(ConfigError):
    """A run dir that this run may not use (another stage's, in use, holding a run without resume=true, unwritable).
    Raised before anything is written into it."""


# ------------------------------------------------------------------------------------------------ state
class _Claim:
    """This process's hold on a run dir: the locked file descriptor (None where the filesystem has no locks)."""

    def __init__(self, fd: int | None, fresh: bool):
        self.fd, self.fresh = fd, fresh
        self.said = False  # whether the lock file says who holds it (written once the dir may be written)


_CLAIMS: dict[Path, _Claim] = {}  # run dirs this process has claimed (and locked)
_WRITABLE: set[Path] = set()  # run dirs this process may write into: new when claimed, or committed
_RECORDS: dict[Path, dict[str, str]] = {}  # files to write into a run dir when it commits (.hydra/*.yaml)
_LOG_HANDLERS: "weakref.WeakSet[RunLogHandler]" = weakref.WeakSet()


def may_write(path: str | os.PathLike) -> bool:
    """Whether this process may write into the run dir `path` now: it was new when this run took it, or the run
    has committed (module docstring)."""
    return _key(path) in _WRITABLE


def hold_records(path: str | os.PathLike, files: Mapping[str, str]) -> None:
    """Text files (relative path -> content) to write into the run dir `path` when its run commits."""
    _RECORDS.setdefault(_key(path), {}).update(files)


def _is_empty(path: Path) -> bool:
    """No entry but a lock file (what a refused or failed claim of a new dir leaves)."""
    try:
        return all(p.name == LOCK_FILE for p in path.iterdir())
    except FileNotFoundError:
        return True


def _created(path: Path, key: str) -> None:
    """mkdir -p with the failures check_dir cannot foresee (root on a read-only or special file system) as one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "it is on a read-only file system" if e.errno == errno.EROFS else (e.strerror or str(e)).lower()
        raise RunDirError(f"{key}={path} cannot be created: {why}; choose another directory") from e


# ------------------------------------------------------------------------------------------------ run dir
class RunDir:
    """The directory of one run of one stage (`pretrain`, `finetune`, `linear_probe`). `key` names the dir in
    messages as the user sets it (`hydra.run.dir`)."""

    def __init__(self, path: str | os.PathLike, stage: str, *, key: str = "hydra.run.dir"):
        self.path = _key(path)
        self.stage = stage
        self.key = key

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_SUBDIR

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE

    def checkpoint_steps(self) -> list[int]:
        """The finalized checkpoint steps on disk, read from the directory names (cheap: no orbax, no JAX)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit() and p.is_dir())

    def owner(self) -> str | None:
        """The stage this dir belongs to: its STAGE_FILE; for dirs made before that file existed, the stage in
        results.json, else the job log's name, else 'pretrain' when a tokenizer lies there; None for a dir that
        holds no run."""
        marker = self.path / STAGE_FILE
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if marker.is_file():
                return marker.read_text().strip() or None
        with contextlib.suppress(OSError, ValueError):
            stage = json.loads(self.results_file.read_text()).get("stage")
            if isinstance(stage, str):
                return stage
        for stage in STAGES:
            if (self.path / f"{stage}.log").is_file():
                return stage
        return "pretrain" if self.tokenizer_file.exists() else None

    def run_files(self) -> list[str]:
        """The names of RUN_FILES present here (an empty checkpoints/ or tb/ does not count)."""
        out = []
        for name in RUN_FILES:
            p = self.path / name
            if p.is_file() or (p.is_dir() and any(p.iterdir())):
                out.append(name)
        return out

    # -- claiming --------------------------------------------------------------------------------------------
    def claim(self, *, resume: bool | None) -> None:
        """Check the rules of the module docstring and take the lock; `resume=None` for a stage that cannot resume.
        A refusal is one ConfigError line (a RunDirError, or check_dir's for the path) and leaves an existing dir as
        it was. JAX-free: the Hydra callback calls it before the run starts; a second call by the same process is a
        no-op."""
        if self.path in _CLAIMS:
            return
        check_dir(self.path, self.key)
        existed = self.path.is_dir()
        if existed:
            self._check_owner()
            self._check_contents(resume)  # before the lock file is made: a refused dir is left untouched
        _created(self.path, self.key)
        fd = self._lock()
        try:
            fresh = _is_empty(self.path)
            if existed and not fresh:
                self._check_owner()  # again, under the lock: another run may have written in between
                self._check_contents(resume)
        except BaseException:
            _unlock(fd)
            raise
        _CLAIMS[self.path] = _Claim(fd, fresh)
        if fresh:
            _WRITABLE.add(self.path)
            self._say_who()

    def _check_owner(self) -> None:
        owner = self.owner()
        if owner is not None and owner != self.stage:
            raise RunDirError(
                f"{self.key}={self.path} holds a {owner} run: a run dir belongs to one stage; choose "
                f"another {self.key} for this {self.stage} run"
            )

    def _check_contents(self, resume: bool | None) -> None:
        files = self.run_files()
        if resume or not files:
            return
        if resume is None:  # a stage that cannot resume: only a finished run is in the way
            if RESULTS_FILE in files:
                raise RunDirError(
                    f"{self.key}={self.path} holds a finished {self.stage} run ({RESULTS_FILE}): choose "
                    f"another {self.key}"
                )
            return
        if CHECKPOINT_SUBDIR in files:
            raise RunDirError(
                f"{self.path} already holds checkpoints: pass resume=true to continue that run, or "
                f"choose another {self.key}"
            )
        raise RunDirError(
            f"{self.path} holds files of an earlier {self.stage} run ({', '.join(files)}) but no "
            f"checkpoint: pass resume=true to continue it (from step 0, keeping them), or choose "
            f"another {self.key}"
        )

    def _lock(self) -> int | None:
        """Open and lock LOCK_FILE (non-blocking); RunDirError naming the holder when another process has it."""
        path = self.path / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(
                f"{self.key}={self.path}: cannot create its lock file ({e.strerror}); choose another directory"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            os.close(fd)
            raise RunDirError(
                f"{self.key}={self.path} is in use by another run ({holder}): wait for it to end, or "
                f"choose another {self.key}"
            ) from None
        except OSError as e:  # a filesystem without flock (e.g. Lustre mounted without -o flock)
            os.close(fd)
            log.warning(
                "cannot lock %s (%s): runs started into this dir at the same time are not detected", path, e.strerror
            )
            return None
        return fd

    def open(self, *, resume: bool | None) -> None:
        """`claim` on the main process; in a multi-process run the others learn its outcome (a refusal raises on
        every process) and then check that the lock is held. Call after `jax.distributed` is initialised."""
        import jax  # noqa: PLC0415

        if jax.process_count() == 1:
            self.claim(resume=resume)
            return
        import numpy as np  # noqa: PLC0415
        from jax.experimental import multihost_utils  # noqa: PLC0415

        from sslvit.distributed import is_main_process  # noqa: PLC0415

        error = None
        if is_main_process():
            try:
                self.claim(resume=resume)
            except ConfigError as e:  # every refusal: the others must hear of it, not wait in the broadcast
                error = e
        elif self.path in _CLAIMS:  # claimed before JAX knew the process index (SLURM task ids): give it back
            self.close()
        refused = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if error is not None:
            raise error
        if refused:
            raise RunDirError(f"process 0 refused {self.key}={self.path} (its error says why)")
        if jax.process_index() != 0:
            self._check_held()

    def _say_who(self) -> None:
        """Write who holds the lock into the lock file, once the dir may be written (a refused run must not)."""
        claim = _CLAIMS.get(self.path)
        if claim is None or claim.fd is None or claim.said:
            return
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "stage": self.stage,
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": sys.argv,
        }
        os.ftruncate(claim.fd, 0)
        os.pwrite(claim.fd, (json.dumps(info) + "\n").encode(), 0)
        claim.said = True

    def _check_held(self) -> None:
        """On processes other than 0: the lock file is there and locked (by process 0)."""
        path = self.path / LOCK_FILE
        if not path.is_file():
            raise RunDirError(
                f"process 0 locked {self.path} but this process sees no {LOCK_FILE} there: every process "
                f"needs the same {self.key} on a filesystem all hosts share"
            )
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # held: as it should be
        except OSError:
            return  # no locks on this filesystem: nothing to check
        finally:
            os.close(fd)
        log.warning(
            "%s is not locked as process 0 should hold it: is %s on a filesystem whose locks all hosts see?",
            path,
            self.key,
        )

    # -- writing ---------------------------------------------------------------------------------------------
    def commit(self) -> None:
        """From here on the run writes into its dir: the stage marker, the held records (.hydra/) and the held log
        lines go to disk (main process: files; every process: its log)."""
        from sslvit.distributed import is_main_process  # noqa: PLC0415
        from sslvit.signals import deferred  # noqa: PLC0415

        if is_main_process():
            with deferred():
                marker = self.path / STAGE_FILE
                if not marker.is_file():
                    atomic_write_text(marker, self.stage + "\n")
                for rel, text in _RECORDS.pop(self.path, {}).items():
                    out = self.path / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(out, text)
        _WRITABLE.add(self.path)
        self._say_who()
        for handler in list(_LOG_HANDLERS):
            if handler.dir == self.path:
                handler.write_held()

    def write_results(self, results: Mapping[str, Any]) -> Path:
        """`results.json`, written aside and renamed (a reader never sees half a file); main process only."""
        from sslvit.distributed import is_main_process  # noqa: PLC0415

        path = self.results_file
        if is_main_process():
            atomic_write_text(path, json.dumps(results, indent=2))
        return path

    def close(self) -> None:
        """Release the lock (the kernel would at exit); the dir stays this stage's."""
        claim = _CLAIMS.pop(self.path, None)
        if claim is not None:
            _unlock(claim.fd)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, stage={self.stage!r})"


def _unlock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _holder(lock_file: Path) -> str:
    """Who holds a lock, from what it wrote into the lock file (a run that has not committed yet has not written
    there: what the file says may be its predecessor's, recognisable by a process that is gone)."""
    starting = "a run that is starting"
    try:
        info = json.loads(lock_file.read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return starting
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return starting
        except PermissionError:
            pass
    return f"pid {pid} on {host}, a {info.get('stage', '?')} run since {info.get('since', '?')}"


def run_dir_of_checkpoints(ckpt_dir: Path) -> Path:
    """The run dir holding a checkpoint dir (`<run>/checkpoints` -> `<run>`; a bare checkpoint dir is its own)."""
    return ckpt_dir.parent if ckpt_dir.name == CHECKPOINT_SUBDIR else ckpt_dir


# ------------------------------------------------------------------------------------------------ the job log
class RunLogHandler(logging.FileHandler):
    """Hydra's job log file (`hydra.job_logging.handlers.file.class`), which writes into an existing run dir only once
    the run commits: records are held in memory until then, and dropped if the run never does (it was refused, or
    failed before changing anything), so the dir's log holds the runs that happened. In a new dir it writes at
    once. The file is opened on the first write."""

    def __init__(
        self, filename: str, mode: str = "a", encoding: str | None = None, delay: bool = True, errors: str | None = None
    ):
        super().__init__(filename, mode, encoding, delay=True, errors=errors)
        self.dir = Path(self.baseFilename).parent
        if _is_empty(self.dir) and self.dir not in _CLAIMS:  # a new dir (a sweep job's), not claimed by a run yet
            _WRITABLE.add(self.dir)
        self._held: list[logging.LogRecord] | None = []
        _LOG_HANDLERS.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        if self._held is not None:
            if self.dir not in _WRITABLE:
                if len(self._held) < 100_000:
                    self._held.append(record)
                return
            self.write_held()
        super().emit(record)

    def write_held(self) -> None:
        """Write the held records; from now on write at once. (Not `release`: that is the handler's lock.)"""
        held, self._held = self._held, None
        for record in held or ():
            super().emit(record)
