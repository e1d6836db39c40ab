"""What every training stage shares: the train state, one jitted step (gradient accumulation, non-finite guard),
data-parallel sharding over a device mesh, device prefetch, and the loop (logging, checkpoints, resume,
preemption).

A stage (pretraining, fine-tuning) supplies a pure `loss_fn(params, batch_stats, batch, rng, consts) ->
(loss, (metrics, new_batch_stats))` and a host iterator of batches; everything else is here. `consts` are arrays
the step reads but never changes (e.g. the tokenizer's codebook): arguments, not constants baked into the HLO.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sslvit import signals
from sslvit.distributed import is_main_process
from sslvit.finetune_modes import merge

log = logging.getLogger(__name__)


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any  # the trainable parameters (the optimiser sees only these)
    frozen: Any  # parameters that do not train: no gradient, no optimiser state
    batch_stats: Any  # BatchNorm running statistics ({} without BatchNorm)
    opt_state: Any
    nonfinite_total: jax.Array  # steps skipped because the loss or a gradient was not finite
    nonfinite_streak: jax.Array  # ... of which consecutive up to now

    @classmethod
    def create(cls, params, frozen, batch_stats, optimizer) -> "TrainState":
        def zero():  # distinct buffers: one shared array would be donated twice
            return jnp.zeros((), jnp.int32)

        return cls(
            step=zero(),
            params=params,
            frozen=frozen,
            batch_stats=batch_stats or {},
            opt_state=optimizer.init(params),
            nonfinite_total=zero(),
            nonfinite_streak=zero(),
        )

    def all_params(self):
        return merge(self.params, self.frozen)


LossFn = Callable[[Any, Any, Mapping[str, jax.Array], jax.Array, Any], tuple[jax.Array, tuple[dict, Any]]]


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    seed: int,
    accum_steps: int = 1,
    schedule: Optional[optax.Schedule] = None,
):
    """A pure train step `(state, batch, consts) -> (state, metrics)`.

    Randomness is `fold_in(key(seed), step)`: a resumed run draws the same dropout / drop-path masks. With
    `accum_steps > 1` the batch is split into micro-batches whose gradients are averaged (scan), so small machines
    run the recipes' batch sizes. A step whose loss or gradient norm is not finite changes nothing but the
    non-finite counters.
    """
    base_key = jax.random.key(seed)

    def grads_of(params, frozen, batch_stats, batch, rng, consts):
        def f(p):
            return loss_fn(merge(p, frozen), batch_stats, batch, rng, consts)

        (loss, (metrics, new_stats)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return loss, metrics, new_stats, grads

    def step_fn(state: TrainState, batch, consts=None):
        rng = jax.random.fold_in(base_key, state.step)
        if accum_steps == 1:
            loss, metrics, new_stats, grads = grads_of(
                state.params, state.frozen, state.batch_stats, batch, rng, consts
            )
        else:
            # Micro-batch j takes rows j, j+A, j+2A...: each device keeps its own rows (no resharding).
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, accum_steps, *x.shape[1:]), 0, 1), batch)

            def body(carry, xs):
                g_sum, stats, l_sum, m_sum = carry
                j, mb = xs
                loss, metrics, stats, grads = grads_of(
                    state.params, state.frozen, stats, mb, jax.random.fold_in(rng, j), consts
                )
                g_sum = jax.tree.map(jnp.add, g_sum, grads)
                m_sum = jax.tree.map(jnp.add, m_sum, metrics)
                return (g_sum, stats, l_sum + loss, m_sum), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            first = jax.tree.map(lambda x: x[0], micro)
            m_shape = jax.eval_shape(
                lambda: grads_of(state.params, state.frozen, state.batch_stats, first, rng, consts)[1]
            )
            m_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            (grads, new_stats, loss, metrics), _ = jax.lax.scan(
                body, (zeros, state.batch_stats, jnp.zeros((), jnp.float32), m_zero), (jnp.arange(accum_steps), micro)
            )
            grads = jax.tree.map(lambda g: g / accum_steps, grads)
            loss = loss / accum_steps
            metrics = jax.tree.map(lambda m: m / accum_steps, metrics)

        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def keep_if_ok(new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_ok(new_params, state.params),
            opt_state=keep_if_ok(new_opt_state, state.opt_state),
            batch_stats=keep_if_ok(new_stats, state.batch_stats),
            nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32),
            nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1),
        )
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, nonfinite_steps=new_state.nonfinite_total)
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return new_state, metrics

    return step_fn


# ------------------------------------------------------------------------------------------------ sharding
def make_mesh() -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh over every device of every process. Auto axes: XLA propagates the batch sharding
    through the model (explicit sharding-in-types would need annotations on every reshape)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """A process's local rows -> one global array sharded over the batch axis (works across hosts)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


class DevicePrefetcher(Iterator[dict]):
    """The next `size` batches prepared and transferred in a background thread, started at construction. An error
    of the host iterator is raised by the `next` that would have returned its batch.

    `close()` stops the thread and waits for it: the host iterator is closed in that thread, so a tf.data iterator
    is torn down before the process can exit. (A thread still inside TensorFlow's C++ code when Python finalises is
    ended by the interpreter as it comes back, which aborts the whole process: "terminate called ... exception not
    rethrown".) The thread also ends by itself when the iterator does."""

    _DONE = object()

    def __init__(self, host_batches: Iterator[Mapping[str, np.ndarray]], sharding: NamedSharding, size: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, args=(host_batches, sharding), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, host_batches, sharding) -> None:
        try:
            for batch in host_batches:
                if not self._put(to_global(batch, sharding)):
                    return
            self._put(self._DONE)
        except BaseException as e:  # surface the error in the consumer
            self._put(e)
        finally:
            close = getattr(host_batches, "close", None)  # a generator: its pipeline goes now, in this thread
            if close is not None:
                close()

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> dict:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is self._DONE:
            self._finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item

    def close(self, timeout: float = 120.0) -> None:
        """Stop the thread and wait for it (at most `timeout` seconds: a batch being read is finished first)."""
        self._stop.set()
        self._finished = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the input thread did not stop within %.0f s", timeout)

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prefetch_to_device(
    host_batches: Iterator[Mapping[str, np.ndarray]], sharding: NamedSharding, size: int = 2
) -> DevicePrefetcher:
    """Prepare and transfer the next batches in a background thread while the device computes (`DevicePrefetcher`)."""
    return DevicePrefetcher(host_batches, sharding, size)


# ------------------------------------------------------------------------------------------------ the loop
class Preempted(Exception):
    """SIGTERM (or Ctrl-C) arrived; a checkpoint of the current step was saved."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step}; a checkpoint was saved: run the same command with resume=true")
        self.step = step


class NonFiniteError(RuntimeError):
    pass


def _on_any_process(flag: bool) -> bool:
    """`flag` OR-ed over processes. A signal reaches the processes of a multi-host job at slightly different
    steps, but the checkpoint save is collective: all must stop after the same step. One tiny all-gather per step
    (multi-process runs only)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def fit(
    *,
    state: TrainState,
    step_fn,
    batches: Iterator[dict],
    total_steps: int,
    checkpointer,
    writer,
    consts=None,
    log_every: int,
    ckpt_every: int,
    images_per_step: int,
    meta: dict,
    max_nonfinite_streak: int = 20,
    progress: bool = True,
    desc: str = "train",
    evaluators: Sequence[tuple[int, Any]] = (),
) -> tuple[TrainState, dict]:
    """Run `step_fn` from `state.step` to `total_steps`. Logs every `log_every` steps (the only host reads),
    checkpoints every `ckpt_every` steps and at the end; SIGTERM/Ctrl-C saves the current step and raises
    `Preempted`; too many consecutive non-finite steps raises NonFiniteError naming the last good checkpoint.

    `evaluators`: (every, evaluator) pairs; `evaluator.run(state)` yields (name, value) pairs (sslvit/evaluators.py)
    after every `every`-th step and the last one, logged in that step's row and shown in the progress bar. Their time
    is left out of `images_per_sec`."""
    from tqdm import tqdm  # noqa: PLC0415

    start = int(jax.device_get(state.step))
    is_main = is_main_process()
    bar = tqdm(total=total_steps, initial=start, desc=desc, disable=not (progress and is_main), dynamic_ncols=True)
    last: dict = {}
    shown: dict = {}
    t_last, step_last = time.perf_counter(), start
    signals.phase("training loop")
    with signals.stop_signals() as stopper, stopper.deferred() as stop:
        for step in range(start, total_steps):
            batch = next(batches)
            state, metrics = step_fn(state, batch, consts)
            done = step + 1
            row = {}
            if done % log_every == 0 or done == total_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                metrics["images_per_sec"] = images_per_step * (done - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, done
                shown.update(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_sec']:.0f}")
                row = last = metrics
            due = [ev for every, ev in evaluators if every and (done % every == 0 or done == total_steps)]
            if due:
                t0 = time.perf_counter()
                values = {name: float(value) for ev in due for name, value in ev.run(state)}
                t_last += time.perf_counter() - t0  # images/s measures training, not evaluation
                shown.update({name.rsplit("/", 1)[-1]: f"{value:.4f}" for name, value in values.items()})
                row = {**row, **values}
            if row:
                writer.write(done, row)
                bar.set_postfix(shown)
            if done % log_every == 0 or done == total_steps:
                streak = int(jax.device_get(state.nonfinite_streak))
                if streak >= max_nonfinite_streak:
                    # Skipped steps leave the state untouched, so every saved checkpoint holds finite parameters.
                    good = checkpointer.latest_step()
                    where = (
                        f"the last good checkpoint is step {good} in {checkpointer.directory}"
                        if good is not None
                        else "no checkpoint was saved yet"
                    )
                    raise NonFiniteError(
                        f"{streak} consecutive steps had a non-finite loss or gradient (up to step {done}, "
                        f"{int(jax.device_get(state.nonfinite_total))} in all); stopping: {where}. Lower optim.lr, "
                        f"raise optim.warmup_steps or use model.dtype=float32, then run again with resume=true"
                    )
            bar.update(1)
            if _on_any_process(stop.received is not None):
                checkpointer.save(done, state, meta=meta, force=True)
                checkpointer.wait()
                writer.flush()
                bar.close()
                _preempted(stop, done)
            if done % ckpt_every == 0 and done != total_steps:
                checkpointer.save(done, state, meta=meta)
        checkpointer.save(total_steps, state, meta=meta, force=True)
        checkpointer.wait()
        writer.flush()
        bar.close()
        if _on_any_process(stop.received is not None):  # the signal came during the final save: it is on disk
            _preempted(stop, total_steps)
    return state, last


def _preempted(stop, step: int):
    """The loop saved `step` after a stop signal: hand SIGUSR2 on to submitit, then raise Preempted."""
    stop.forward()
    stop.received = None  # acted upon
    raise Preempted(step)


def memory_report(compiled) -> dict:
    """Peak memory of a compiled step from XLA's memory analysis: argument + output + temp buffers, minus the
    outputs that alias donated arguments (counted once). Bytes; {} where the backend does not say."""
    try:
        ma = compiled.memory_analysis()
    except Exception:
        ma = None
    if ma is None:
        return {}
    out = {
        name: int(getattr(ma, f"{name}_size_in_bytes", 0) or 0)
        for name in ("argument", "output", "temp", "alias", "generated_code")
    }
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out
