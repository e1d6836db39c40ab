"""Checkpoints: an orbax ``CheckpointManager`` holding, per step, the train state pytree and a small JSON meta.

Layout of ``directory`` (orbax's)::

    <directory>/<step>/state/...   the train state (params, optimizer state, rng keys, ...), OCDBT/zarr
    <directory>/<step>/meta/...    a JSON dict: resolved model config, data position, tokenizer path, ...

Guarantees:

- **Atomic.** orbax writes a step into ``<step>.orbax-checkpoint-tmp*`` and renames it on finalize; only
  finalized steps are listed, so a save interrupted by ``kill -9`` is never taken as the latest (a stale tmp dir
  of the same step is replaced when that step is saved again).
- **Damage falls back.** ``restore(step=None)`` (and ``load_params``/``load_checkpoint`` with ``step=None``) tries
  the latest finalized step; if it cannot be read (a file truncated or deleted), it logs a warning naming it and
  uses the previous one. A damaged step asked for by number is an error that names the latest usable step.
  The asyncio noise orbax's readers leave behind when a read fails ("Event loop is closed", once per pending read)
  is kept off stderr (`_quiet_closed_loop_noise`).
- **Async.** Saves are asynchronous (orbax copies device arrays to host before ``save`` returns, so the caller may
  donate or overwrite them right away); ``wait()``/``close()`` block until every save is on disk.
- **Multi-host.** orbax writes collectively; this module writes nothing itself.

Typed PRNG keys (``jax.random.key``) are stored as their key data and restored as typed keys when the template
has a typed key; the template-free ``load_params`` returns their raw ``uint32`` key data.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from typing import Any, Callable, Mapping, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sslvit.errors import ConfigError
from sslvit.rundir import CHECKPOINT_SUBDIR  # readers accept a run dir or its checkpoints dir

__all__ = ["CHECKPOINT_SUBDIR", "Checkpointer", "find_checkpoint_dir", "load_checkpoint", "load_meta", "load_params"]

log = logging.getLogger(__name__)


def _quiet_closed_loop_noise() -> None:
    """Drop one kind of unraisable exception: RuntimeError('Event loop is closed') from asyncio's
    `call_soon_threadsafe`. When one array of a checkpoint cannot be read, orbax's restore fails and closes its event
    loop while tensorstore still completes the other reads; each completion then reports the closed loop, one
    traceback per array (thousands for a real model), burying the one line that says what happened. Everything
    else goes to the previous hook."""
    previous = sys.unraisablehook

    def hook(unraisable):
        exc = unraisable.exc_value
        if (
            isinstance(exc, RuntimeError)
            and str(exc) == "Event loop is closed"
            and any(f.name == "call_soon_threadsafe" for f in traceback.extract_tb(exc.__traceback__))
        ):
            return
        previous(unraisable)

    sys.unraisablehook = hook


_quiet_closed_loop_noise()

STATE, META = "state", "meta"  # orbax item names inside each step directory

T = TypeVar("T")


def _abs_path(directory: str | os.PathLike) -> epath.Path:
    """Absolute path (orbax requires one; Hydra runs change cwd). Remote URLs (gs://...) are left as they are."""
    s = os.fspath(directory)
    return epath.Path(s if "://" in s else os.path.abspath(os.path.expanduser(s)))


def find_checkpoint_dir(directory: str | os.PathLike) -> epath.Path:
    """The checkpoint directory for ``directory``: itself, or its ``checkpoints/`` subdir when given a run dir."""
    path = _abs_path(directory)
    sub = path / CHECKPOINT_SUBDIR
    return sub if sub.is_dir() else path


def _manager(directory: epath.Path, state_handler, **options) -> ocp.CheckpointManager:
    # create=False: a manager that only reads must not create directories (orbax makes them on the first save).
    return ocp.CheckpointManager(
        directory,
        item_handlers={STATE: state_handler, META: ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False, **options),
    )


def _brief(e: BaseException) -> str:
    """One short line for an orbax/tensorstore exception (theirs span many lines with the full spec)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


def _no_checkpoint(directory: epath.Path, why: str) -> ConfigError:
    return ConfigError(
        f"no checkpoint in {directory}: {why}; run pretrain.py first or pass the run dir of a finished run"
    )


def _first_usable(directory: epath.Path, steps: list[int], step: int | None, load: Callable[[int], T]) -> tuple[int, T]:
    """``(s, load(s))`` for ``step``, or for the latest step that loads, warning about each damaged one skipped.

    A ``ConfigError`` from ``load`` (the checkpoint holds another model) is not damage and propagates at once.
    """
    if not steps:
        why = "the directory does not exist" if not directory.exists() else "it holds no finalized checkpoint"
        raise _no_checkpoint(directory, why)
    if step is not None:
        if step not in steps:
            raise ConfigError(
                f"no checkpoint for step {step} in {directory}: it holds steps {steps}; pass one of "
                f"those, or step=null for the latest"
            )
        try:
            return step, load(step)
        except ConfigError:
            raise
        except Exception as e:
            usable = _latest_loading([s for s in steps if s != step], load)
            fix = (
                f"pass step={usable} (the latest usable one) or step=null"
                if usable is not None
                else f"no other step ({[s for s in steps if s != step]}) is usable either: restore an intact copy"
            )
            raise ConfigError(f"checkpoint {directory / str(step)} is damaged ({_brief(e)}); {fix}") from e
    candidates = sorted(steps, reverse=True)
    first_error = None
    for i, s in enumerate(candidates):
        try:
            return s, load(s)
        except ConfigError:
            raise
        except Exception as e:
            first_error = first_error or e
            nxt = f"falling back to step {candidates[i + 1]}" if i + 1 < len(candidates) else "no older one left"
            log.warning("checkpoint %s is damaged (%s); %s", directory / str(s), _brief(e), nxt)
    raise ConfigError(
        f"no usable checkpoint in {directory}: all of steps {steps} are damaged (latest: "
        f"{_brief(first_error)}); restore an intact copy or start a new run"
    ) from first_error


def _latest_loading(steps: list[int], load: Callable[[int], Any]) -> int | None:
    """The latest of `steps` that loads (what to suggest instead of a damaged one), or None."""
    for s in sorted(steps, reverse=True):
        try:
            load(s)
            return s
        except Exception:
            continue
    return None


def _leaf_shape(x) -> tuple[int, ...]:
    """Shape of a template leaf as stored: a typed PRNG key is stored as its key data (one more axis)."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, x).shape)
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _flat(tree) -> dict[str, Any]:
    """``{"params/layers/qkv": leaf}`` over orbax's serialised form of ``tree`` (dataclasses/namedtuples -> dicts)."""
    flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True))
    return {"/".join(map(str, k)): v for k, v in flat.items() if v is not None}


def _check_same_tree(directory: epath.Path, stored, target) -> None:
    """ConfigError naming the first leaf where the checkpoint's tree (``stored``, orbax metadata) and ``target``
    differ in path or shape. Dtypes may differ: orbax casts to the template's dtype on restore."""
    have, want = _flat(stored), _flat(target)
    problems = []
    for path, leaf in want.items():
        if path not in have:
            problems.append(f"{path} (expected shape {_leaf_shape(leaf)}) is missing from the checkpoint")
        elif tuple(have[path].shape) != _leaf_shape(leaf):
            problems.append(f"{path} has shape {tuple(have[path].shape)} but the model expects {_leaf_shape(leaf)}")
    problems += [
        f"the checkpoint has {p} (shape {tuple(have[p].shape)}), which the model does not"
        for p in have
        if p not in want
    ]
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise ConfigError(
            f"checkpoint in {directory} holds a different model: {problems[0]}{more}; build the model "
            f"from the config saved with the checkpoint (Checkpointer.restore_meta) or point to a run "
            f"of this model"
        )


class Checkpointer:
    """Save/restore the train state pytree plus a JSON meta dict, every ``save_interval_steps`` steps.

    ``Checkpointer`` writes nothing until ``save`` is called, so it is also safe for reading a directory another
    process is still training into.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ConfigError(f"max_to_keep={max_to_keep!r} must be an integer >= 1 (or None to keep all)")
        if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ConfigError(f"save_interval_steps={save_interval_steps!r} must be an integer >= 1")
        self.directory = _abs_path(directory)
        self.restored_step: int | None = None  # the step the last restore() loaded (after any fallback)
        self._mgr = _manager(
            self.directory,
            ocp.StandardCheckpointHandler(),
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
        )
        self._damaged: set[int] = set()  # steps restore() found unreadable: a new save of that step replaces them

    # -- writing -------------------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` would write (interval reached, step not saved yet)."""
        return self._mgr.should_save(int(step))

    def save(self, step: int, state: Any, *, meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Save ``state`` (any pytree of jax/numpy arrays and scalars) and ``meta`` (JSON-serialisable) as ``step``.

        Writes when ``step`` is a multiple of ``save_interval_steps`` or ``force``; returns whether it wrote.
        A step that is already saved is left alone (returns False), unless ``restore`` found it damaged.
        Asynchronous: returns once the arrays are copied to host memory; ``wait()`` for the write.
        """
        step = int(step)
        try:  # validate and detach meta now: a failure inside orbax's background write would surface late
            meta = json.loads(json.dumps(dict(meta or {})))
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint meta must be JSON-serialisable (str/int/float/bool/list/dict): {e}") from e
        if step in self._mgr.all_steps():
            if step not in self._damaged:
                log.info("checkpoint for step %d already exists in %s; not saving it again", step, self.directory)
                return False
            log.warning("replacing damaged checkpoint %s", self.directory / str(step))
            self._mgr.wait_until_finished()
            self._mgr.delete(step)
            self._damaged.discard(step)
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)})
        return bool(self._mgr.save(step, args=args, force=force))

    def wait(self) -> None:
        """Block until every pending asynchronous save is finalized on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """``wait()``, then release orbax's resources. Call before the process exits."""
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Finalized steps on disk, ascending (interrupted saves are not listed). Waits for pending saves."""
        # Settle our own pending saves, then re-list: another process may have saved since we last looked.
        self._mgr.wait_until_finished()
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The latest finalized step, or None. Not checked for damage: ``restore`` does that."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, step: int | None = None, *, target: Any) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step`` (None: the latest usable one, falling back past damaged ones).

        ``target`` is the state's template: a concrete state or an abstract one (``jax.eval_shape``, leaves
        ``jax.ShapeDtypeStruct``); restored arrays take its structure, dtypes and shardings (give the
        ShapeDtypeStructs a ``sharding`` for multi-device states). Raises ConfigError if the checkpoint holds
        another tree (the message names the first differing leaf), or when there is no checkpoint.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)

        def load(s: int):
            stored = self._mgr.item_metadata(s)[STATE]
            if stored is None:
                raise FileNotFoundError(f"state metadata of step {s} is missing")
            _check_same_tree(self.directory, stored.tree, abstract)
            out = self._mgr.restore(
                s, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()})
            )
            return out[STATE], dict(out[META] or {})

        steps = self.all_steps()
        self.restored_step, (state, meta) = self._load(steps, step, load)
        log.info("restored checkpoint %s", self.directory / str(self.restored_step))
        return state, meta

    def restore_meta(self, step: int | None = None) -> dict:
        """Only the meta dict of ``step`` (None: the latest readable one); cheap, needs no template."""

        def load(s: int) -> dict:
            return dict(self._mgr.restore(s, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META] or {})

        return self._load(self.all_steps(), step, load)[1]

    def _load(self, steps: list[int], step: int | None, load: Callable[[int], T]) -> tuple[int, T]:
        def tracked(s: int) -> T:
            try:
                return load(s)
            except ConfigError:
                raise
            except Exception:
                self._damaged.add(s)
                raise

        return _first_usable(self.directory, steps, step, tracked)


def load_params(
    directory: str | os.PathLike, step: int | None = None, *, subtree: str | None = "params"
) -> tuple[Any, dict]:
    """``(tree, meta)`` from a checkpoint, without a template: nested dicts/lists of numpy arrays.

    ``directory`` is a checkpoint dir or a run dir holding ``checkpoints/``; ``step=None`` takes the latest usable
    step. ``subtree`` restores only that top-level entry of the saved state (default ``"params"``: skips the
    optimizer state); None restores all of it. For probes and fine-tuning, which pick the encoder out of it.
    """
    if subtree is None:
        _, trees, meta = load_checkpoint(directory, step, subtrees=None)
        return trees, meta
    _, trees, meta = load_checkpoint(directory, step, subtrees=(subtree,))
    return trees[subtree], meta


def load_checkpoint(
    directory: str | os.PathLike,
    step: int | None = None,
    *,
    subtrees: tuple[str, ...] | None = ("params",),
    optional: tuple[str, ...] = (),
) -> tuple[int, dict, dict]:
    """``(step, {name: tree}, meta)`` of one checkpoint, read in one pass without a template (numpy arrays).

    ``step=None`` takes the latest usable step, falling back past damaged ones; the step returned is the one read,
    so that everything taken from a checkpoint comes from the same step. ``subtrees``: the top-level entries of the
    saved state to read (each must exist), plus those of ``optional`` that exist; None: the whole state (returned
    as the dict itself).
    """
    path = find_checkpoint_dir(directory)
    mgr = _manager(path, ocp.PyTreeCheckpointHandler())
    try:

        def load(s: int):
            stored = mgr.item_metadata(s)[STATE]
            if stored is None:
                raise FileNotFoundError(f"state metadata of step {s} is missing")
            tree = stored.tree
            if subtrees is not None:
                keys = sorted(tree) if isinstance(tree, Mapping) else []
                for name in subtrees:
                    if name not in keys:
                        raise ConfigError(
                            f"checkpoint {path / str(s)} has no '{name}' in its state (it has {keys}); "
                            f"pass subtree= one of those, or subtree=None for the whole state"
                        )
                tree = {name: tree[name] for name in (*subtrees, *optional) if name in keys}
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            out = mgr.restore(
                s,
                args=ocp.args.Composite(
                    **{
                        STATE: ocp.args.PyTreeRestore(item=tree, restore_args=restore_args, partial_restore=True),
                        META: ocp.args.JsonRestore(),
                    }
                ),
            )
            return dict(out[STATE]), dict(out[META] or {})

        s, (trees, meta) = _first_usable(path, sorted(mgr.all_steps()), step, load)
        return s, trees, meta
    finally:
        mgr.close()


def load_meta(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The meta dict of a checkpoint (a checkpoint dir or a run dir holding ``checkpoints/``)."""
    ckpt = Checkpointer(find_checkpoint_dir(directory), max_to_keep=None)
    try:
        return ckpt.restore_meta(step)
    finally:
        ckpt.close()
