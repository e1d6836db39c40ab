"""The run skeleton every stage shares, written once.

`Stage.run()`:  validate the whole config (the constructor) -> `prepare()` (dataset metadata, trained weights:
anything that can fail on bad input, nothing written) -> claim the run dir (sslvit/rundir.py: its stage, its lock,
resume=true for a dir holding a run) -> `check_resume()` -> `execute()`, which commits the run dir before its first
write into an existing one -> results.json.

`TrainingStage.execute()` (pretraining, fine-tuning) is the training run:

    mesh -> checkpointer -> build(): initial variables, optimiser, replicated train state, one jitted donated step
    -> restore the latest checkpoint (resume=true) -> setup() (e.g. fit or load the tokenizer) -> commit -> compile
    the step ahead of time (compile time and XLA's peak memory go into the results) -> train batches from the
    resume step, prefetched to the devices -> metrics -> `train.fit` (logging, checkpoints, SIGTERM) ->
    evaluators -> results

A resumed run must continue the run it resumes: `steps` below the step it reached, or another value of a key that
the run's course depends on (seed, batch size, data, model, ...: everything but `RESUME_MAY_CHANGE`), is refused
before anything is written, unless `resume_changes=true` asks for it; the change is then logged and recorded in
metrics.jsonl and the results.

With an in-memory dataset (`data.source=arrays`) a stage calls `use_device_data` in `prepare`: the training split
goes to the devices with the step's constants, the batches are example indices, and the step itself gathers,
crops, flips and normalises its images before the stage's loss (sslvit/data/ondevice.py).

A stage supplies its config schema (`Config`), `prepare`, and for training: `initial_variables`, `loss_fn`,
`train_batches`, `batch_spec`, `evaluators`, `meta` and `results`. Everything else is here.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, ClassVar, Iterator, Mapping

import jax
import numpy as np

from sslvit import signals
from sslvit.config.checks import Group
from sslvit.distributed import is_main_process
from sslvit.errors import ConfigError
from sslvit.rundir import METRICS_FILE, RunDir

log = logging.getLogger(__name__)


def to_dict(cfg: Any) -> dict:
    """A config (DictConfig or mapping) as plain, resolved Python containers (saved with checkpoints)."""
    from omegaconf import DictConfig, OmegaConf  # noqa: PLC0415

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def count_params(tree) -> int:
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def check_batch_size(batch_size: int, accum_steps: int = 1, key: str = "batch_size") -> int:
    """The global batch must split evenly over devices (and gradient-accumulation micro-batches) and processes."""
    n = jax.device_count()
    if batch_size % (n * accum_steps):
        what = f"{n} devices" + (f" x {accum_steps} accumulation steps" if accum_steps > 1 else "")
        raise ConfigError(f"{key}={batch_size} is not divisible by {what}: use a multiple of {n * accum_steps}")
    if batch_size % jax.process_count():
        raise ConfigError(f"{key}={batch_size} is not divisible by {jax.process_count()} processes")
    return batch_size


class Stage:
    """Base of the stages behind pretrain.py, finetune.py and linear_probe.py."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[Group]]
    # Whether `run` commits the run dir before `execute` (which may then write at once); a training stage commits
    # itself, after the restore of a resumed run, so that a failed restore leaves its dir untouched.
    commits_first: ClassVar[bool] = True

    def __init__(self, cfg: Mapping, run_dir: str | os.PathLike | None):
        """Parse and check the whole config. Without a run dir the stage only rebuilds its pieces (a run's model for
        `visualize`, a step for `bench/`) and is not checked against this machine's devices."""
        self.raw_config = cfg
        self.config = self.Config.parse(cfg)
        self.run_dir = RunDir(run_dir, self.name) if run_dir is not None else None
        if self.run_dir is not None:
            self.check_devices()

    def check_devices(self) -> None:
        """The global batch must split over this machine's devices and processes (a stage with a run dir)."""
        accum = getattr(getattr(self.config, "optim", None), "accum_steps", 1)
        check_batch_size(self.batch_size, accum)

    @property
    def batch_size(self) -> int:
        """The global batch size (over all devices and processes)."""
        return self.config.batch_size

    @property
    def local_batch_size(self) -> int:
        """This process's share of the global batch: what its data iterator yields per step."""
        return self.batch_size // jax.process_count()

    def prepare(self) -> Any:
        """Everything that reads input and can fail on it, before the run dir is touched (default: nothing)."""
        return None

    @property
    def resume(self) -> bool | None:
        """Whether this run continues the one in its dir; None for a stage that cannot resume (the probe)."""
        return getattr(self.config, "resume", None)

    def run(self) -> dict:
        if self.run_dir is None:
            raise ValueError(f"{type(self).__name__} was built without a run dir: pass one to run it")
        self.info = self.prepare()
        self.run_dir.open(resume=self.resume)  # refusals here leave an existing dir as it was
        try:
            self.check_resume()
            if self.commits_first:
                self.commit()
            results = self.execute()
            self.commit()
            signals.phase("writing results")
            self.run_dir.write_results(results)
        finally:
            self.run_dir.close()
        return results

    def check_resume(self) -> None:
        """Checks of a resumed run against the run it continues, before anything is written (TrainingStage)."""

    def commit(self) -> None:
        """From here on the run writes into its dir (sslvit/rundir.py); idempotent."""
        self.run_dir.commit()

    def execute(self) -> dict:
        raise NotImplementedError


# Keys a resumed run may change without `resume_changes=true`: how long and how it is logged, checkpointed and
# evaluated; the optimiser (lowering optim.lr is how a diverging run is rescued); where the data lies and how it is
# read; the compute dtype and memory options (model.dtype=float32 rescues a bfloat16 run); process layout.
RESUME_MAY_CHANGE = (
    "steps",
    "resume",
    "resume_changes",
    "progress",
    "log_every",
    "ckpt_every",
    "keep_checkpoints",
    "eval_batches",
    "max_nonfinite_streak",
    "optim.",
    "distributed.",
    "data.data_dir",
    "data.cache",
    "data.download",
    "data.verify_images",
    "data.on_corrupt",
    "model.dtype",
    "model.remat",
    "model.unroll_layers",
    "target.path",
    "monitor.",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items() if isinstance(tree, Mapping) else ():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def resume_differences(before: Mapping, now: Mapping) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (value the run had, value now)} for the keys both configs have, outside RESUME_MAY_CHANGE."""
    a, b = _flat(before), _flat(now)
    return {
        k: (a[k], b[k])
        for k in sorted(a.keys() & b.keys())
        if a[k] != b[k] and not any(k == m or (m.endswith(".") and k.startswith(m)) for m in RESUME_MAY_CHANGE)
    }


class TrainingStage(Stage):
    """A stage that trains with `train.fit` (see the module docstring)."""

    layer_decay_depth: int | None = None  # depth for layer-wise lr decay (fine-tuning); None: no layer decay
    progress_label = "train"
    commits_first = False  # execute() commits after the restore (a damaged run's dir stays as it was)
    resume_changes: dict[str, tuple[Any, Any]] = {}  # keys changed on resume (resume_changes=true)
    device_data = None  # sslvit.data.ondevice.DeviceData: the training split on the devices (`use_device_data`)

    # -------------------------------------------------------------------------------------- hooks
    def setup(self) -> Any:
        """Constants the step reads but never changes (e.g. the tokenizer's codebook), made after the restore and
        before the compile; `None` when there are none. A resumed run must only read here (it has not committed)."""
        return None

    def initial_variables(self) -> tuple[Any, Any, Any]:
        """(trainable params, frozen params, batch_stats) to start from."""
        raise NotImplementedError

    def loss_fn(self, params, batch_stats, batch, rng, consts):
        raise NotImplementedError

    def train_batches(self, start_step: int) -> Iterator[dict]:
        """Host batches (this process's rows) for every step from `start_step` on."""
        raise NotImplementedError

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """{name: (global shape, dtype)} of a training batch, for compiling the step ahead of time."""
        raise NotImplementedError

    def evaluators(self, mesh) -> list:
        """Objects whose `run(state)` yields (name, value) pairs for the results (sslvit/evaluators.py)."""
        return []

    def periodic_evaluators(self, mesh) -> list[tuple[int, Any]]:
        """(every, evaluator) pairs run while training: after every `every`-th step and the last one, logged with the
        step's metrics (`train.fit`). Their values at the last step go into the results (`evaluator.latest`)."""
        return []

    def meta(self) -> dict:
        """Saved with every checkpoint: what rebuilds this run's model (sslvit/pretrained.py reads it)."""
        return {"stage": self.name, "config": to_dict(self.raw_config)}

    def results(self, state, last: Mapping[str, float]) -> dict:
        """Stage-specific result keys, after training."""
        return {}

    # -------------------------------------------------------------------------------------- input
    def use_device_data(self, *, image_size: int, crop_scale, with_labels: bool) -> None:
        """Keep the training split on the devices when the source holds it in memory (`data.source=arrays`)."""
        dc = self.config.data
        if dc.source_name == "arrays":
            from sslvit.data.arrays import device_data  # noqa: PLC0415

            self.device_data = device_data(
                dc,
                batch_size=self.batch_size,
                image_size=image_size,
                crop_scale=crop_scale,
                seed=self.config.seed,
                with_labels=with_labels,
            )

    def input_batches(self, start_step: int, *, image_size: int, crop_scale=None) -> Iterator[dict]:
        """This process's rows of each step's input from `start_step` on: {'index'} when the split is on the devices
        (the step makes the images), else host batches {'image', 'label'} (sslvit/data)."""
        if self.device_data is not None:
            return self.device_data.index_batches(start_step, jax.process_index(), jax.process_count())
        from sslvit import data as data_lib  # noqa: PLC0415

        return data_lib.make_train_iterator(
            self.config.data,
            batch_size=self.local_batch_size,
            image_size=image_size,
            seed=self.config.seed,
            start_step=start_step,
            crop_scale=crop_scale,
        )

    # -------------------------------------------------------------------------------------- the run
    def build(self, mesh, total_steps: int, variables: tuple[Any, Any, Any] | None = None):
        """(replicated train state, jitted donated train step). `variables`: (params, frozen, batch_stats) to start
        from instead of `initial_variables()`."""
        from sslvit import optim  # noqa: PLC0415
        from sslvit.train import TrainState, make_train_step, replicated  # noqa: PLC0415

        rep = replicated(mesh)
        params, frozen, stats = variables if variables is not None else self.initial_variables()
        optimizer, schedule = optim.make_optimizer(
            self.config.optim, params, total_steps=total_steps, depth=self.layer_decay_depth
        )
        state = jax.jit(lambda p, f, s: TrainState.create(p, f, s, optimizer), out_shardings=rep)(params, frozen, stats)
        loss_fn = self.loss_fn if self.device_data is None else self.device_data.wrap_loss(self.loss_fn)
        step_fn = make_train_step(
            loss_fn, optimizer, seed=self.config.seed, accum_steps=self.config.optim.accum_steps, schedule=schedule
        )
        return state, jax.jit(step_fn, donate_argnums=(0,), out_shardings=(rep, rep))

    def abstract_batch(self, mesh) -> dict:
        from sslvit.train import batch_sharding  # noqa: PLC0415

        sh = batch_sharding(mesh)
        spec = self.batch_spec() if self.device_data is None else self.device_data.batch_spec(self.batch_spec())
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh) for k, (shape, dtype) in spec.items()}

    def check_resume(self) -> None:
        """A resumed run continues its run: `steps` not below the step reached, and the keys that decide the run's
        course as they were (the config saved with the latest usable checkpoint), unless resume_changes=true."""
        cfg = self.config
        steps = self.run_dir.checkpoint_steps()
        if not cfg.resume or not steps:
            return
        key = self.run_dir.key
        if cfg.steps < steps[-1]:
            raise ConfigError(
                f"steps={cfg.steps} is below step {steps[-1]}, which the run in {self.run_dir.path} "
                f"already reached: pass steps={steps[-1]} or more to continue it (or choose another "
                f"{key} for a shorter run)"
            )
        from sslvit.checkpoint import load_meta  # noqa: PLC0415

        before = load_meta(self.run_dir.checkpoints).get("config")  # falls back past damaged steps
        changed = resume_differences(before, to_dict(self.raw_config)) if isinstance(before, Mapping) else {}
        if changed and not cfg.resume_changes:
            k, (was, now) = next(iter(changed.items()))
            more = f" (and {len(changed) - 1} more: {', '.join(list(changed)[1:4])})" if len(changed) > 1 else ""
            raise ConfigError(
                f"resume=true with {k}={now!r}, but the run in {self.run_dir.path} was trained with "
                f"{k}={was!r}{more}: a resumed run is exact only with the same values; drop the "
                f"override, or pass resume_changes=true to continue with the change (recorded in "
                f"{METRICS_FILE})"
            )
        self.resume_changes = changed
        for k, (was, now) in changed.items():
            log.warning("resume_changes=true: %s changes from %r to %r on resume", k, was, now)

    def execute(self) -> dict:
        from sslvit.checkpoint import Checkpointer  # noqa: PLC0415
        from sslvit.metrics import MetricWriter  # noqa: PLC0415
        from sslvit.train import batch_sharding, fit, make_mesh, memory_report, prefetch_to_device, replicated  # noqa: PLC0415

        cfg = self.config
        mesh = make_mesh()
        rep = replicated(mesh)
        ckpt = Checkpointer(self.run_dir.checkpoints, max_to_keep=cfg.keep_checkpoints)
        batches = None
        try:
            latest = ckpt.latest_step()
            state, train_step = self.build(mesh, cfg.steps)
            start = 0
            if cfg.resume and latest is not None:
                state, _ = ckpt.restore(target=state)  # a damaged latest falls back to the previous one
                state = jax.device_put(state, rep)
                start = int(jax.device_get(state.step))
                log.info("resumed from step %d in %s", start, ckpt.directory)
            elif cfg.resume:
                log.info("resume=true but no checkpoint in %s: starting from step 0", ckpt.directory)
            consts = self.setup()
            if self.device_data is not None:  # the training split, replicated: each device gathers its own rows
                consts = self.device_data.consts(consts)
            consts = jax.device_put(consts, rep) if consts is not None else None
            self.commit()  # from here on the run writes into its dir
            signals.phase("compile")

            t0 = time.perf_counter()
            compiled = train_step.lower(state, self.abstract_batch(mesh), consts).compile()
            self.compile_seconds = time.perf_counter() - t0
            self.memory = memory_report(compiled)
            self.log_start(state, start)

            periodic = self.periodic_evaluators(mesh)
            batches = prefetch_to_device(self.train_batches(start), batch_sharding(mesh))
            writer = MetricWriter(self.run_dir.path, enabled=is_main_process(), resume_step=start)
            if self.resume_changes:
                writer.note(start, resume_changes={k: list(v) for k, v in self.resume_changes.items()})
            t0 = time.perf_counter()
            try:
                state, last = fit(
                    state=state,
                    step_fn=compiled,
                    batches=batches,
                    consts=consts,
                    total_steps=cfg.steps,
                    checkpointer=ckpt,
                    writer=writer,
                    log_every=cfg.log_every,
                    ckpt_every=cfg.ckpt_every,
                    images_per_step=self.batch_size,
                    meta=self.meta(),
                    max_nonfinite_streak=cfg.max_nonfinite_streak,
                    progress=cfg.progress,
                    desc=self.progress_label,
                    evaluators=periodic,
                )
            finally:
                writer.close()
            train_seconds = time.perf_counter() - t0
        finally:
            if batches is not None:
                batches.close()
            ckpt.close()

        ips = last.get("images_per_sec")
        results = {
            "stage": self.name,
            "run_dir": str(self.run_dir.path),
            "steps": cfg.steps,
            "batch_size": self.batch_size,
            "train_loss": last.get("loss"),
            "train_accuracy": last.get("accuracy"),
            "images_per_sec": ips,
            "step_time_s": (self.batch_size / ips) if ips else None,
            "train_seconds": round(train_seconds, 2),
            "nonfinite_steps": last.get("nonfinite_steps"),
            "compile_seconds": round(self.compile_seconds, 2),
            "peak_memory_bytes": self.memory.get("peak"),
            "memory": self.memory,
        }
        if self.resume_changes:
            results["resume_changes"] = {k: list(v) for k, v in self.resume_changes.items()}
        results.update(self.results(state, last))
        signals.phase("final evaluation")
        evaluators = self.evaluators(mesh)
        if evaluators:
            log.info("final evaluation: %s", ", ".join(type(e).__name__ for e in evaluators))
        for evaluator in evaluators:
            results.update(dict(evaluator.run(state)))
        for _, evaluator in periodic:  # run at the last step by `fit`; now unless this run had no step left to do
            results.update(getattr(evaluator, "latest", None) or dict(evaluator.run(state)))
        return results

    def log_start(self, state, start: int) -> None:
        """One line saying what trains (override for more)."""
        log.info(
            "%s from step %d: %s trainable parameters; step compiled in %.1fs, peak memory %s MiB",
            self.name,
            start,
            f"{count_params(state.params):,}",
            self.compile_seconds,
            f"{self.memory['peak'] / 2**20:.1f}" if self.memory.get("peak") else "?",
        )
