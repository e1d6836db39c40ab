"""The run skeleton every stage shares, written once.

`Stage.run()`:  validate the whole config (the constructor) -> `prepare()` (dataset metadata, trained weights:
anything that can fail on bad input, nothing written) -> create the run dir -> `execute()` -> results.json.

`TrainingStage.execute()` (pretraining, fine-tuning) is the training run:

    mesh -> checkpointer (a dir that already holds checkpoints needs resume=true) -> setup() (e.g. fit the
    tokenizer) -> build(): initial variables, optimiser, replicated train state, one jitted donated step ->
    restore the latest checkpoint (resume=true) -> compile the step ahead of time (compile time and XLA's peak
    memory go into the results) -> train batches from the resume step, prefetched to the devices -> metrics ->
    `train.fit` (logging, checkpoints, SIGTERM) -> evaluators -> results

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

from sslvit.config.checks import Group
from sslvit.errors import ConfigError
from sslvit.distributed import is_main_process
from sslvit.rundir import RunDir

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

    def run(self) -> dict:
        self.info = self.prepare()
        if self.run_dir is None:
            raise ValueError(f"{type(self).__name__} was built without a run dir: pass one to run it")
        self.run_dir.create()
        results = self.execute()
        self.run_dir.write_results(results)
        return results

    def execute(self) -> dict:
        raise NotImplementedError


class TrainingStage(Stage):
    """A stage that trains with `train.fit` (see the module docstring)."""

    layer_decay_depth: int | None = None  # depth for layer-wise lr decay (fine-tuning); None: no layer decay
    progress_label = "train"
    device_data = None  # sslvit.data.ondevice.DeviceData: the training split on the devices (`use_device_data`)

    # -------------------------------------------------------------------------------------- hooks
    def setup(self) -> Any:
        """Constants the step reads but never changes (e.g. the tokenizer's codebook), made after the checkpoint
        check and before the state; `None` when there are none."""
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

            self.device_data = device_data(dc, batch_size=self.batch_size, image_size=image_size,
                                           crop_scale=crop_scale, seed=self.config.seed, with_labels=with_labels)

    def input_batches(self, start_step: int, *, image_size: int, crop_scale=None) -> Iterator[dict]:
        """This process's rows of each step's input from `start_step` on: {'index'} when the split is on the devices
        (the step makes the images), else host batches {'image', 'label'} (sslvit/data)."""
        if self.device_data is not None:
            return self.device_data.index_batches(start_step, jax.process_index(), jax.process_count())
        from sslvit import data as data_lib  # noqa: PLC0415

        return data_lib.make_train_iterator(self.config.data, batch_size=self.local_batch_size, image_size=image_size,
                                            seed=self.config.seed, start_step=start_step, crop_scale=crop_scale)

    # -------------------------------------------------------------------------------------- the run
    def build(self, mesh, total_steps: int, variables: tuple[Any, Any, Any] | None = None):
        """(replicated train state, jitted donated train step). `variables`: (params, frozen, batch_stats) to start
        from instead of `initial_variables()`."""
        from sslvit import optim  # noqa: PLC0415
        from sslvit.train import TrainState, make_train_step, replicated  # noqa: PLC0415

        rep = replicated(mesh)
        params, frozen, stats = variables if variables is not None else self.initial_variables()
        optimizer, schedule = optim.make_optimizer(self.config.optim, params, total_steps=total_steps,
                                                   depth=self.layer_decay_depth)
        state = jax.jit(lambda p, f, s: TrainState.create(p, f, s, optimizer), out_shardings=rep)(params, frozen, stats)
        loss_fn = self.loss_fn if self.device_data is None else self.device_data.wrap_loss(self.loss_fn)
        step_fn = make_train_step(loss_fn, optimizer, seed=self.config.seed,
                                  accum_steps=self.config.optim.accum_steps, schedule=schedule)
        return state, jax.jit(step_fn, donate_argnums=(0,), out_shardings=(rep, rep))

    def abstract_batch(self, mesh) -> dict:
        from sslvit.train import batch_sharding  # noqa: PLC0415

        sh = batch_sharding(mesh)
        spec = self.batch_spec() if self.device_data is None else self.device_data.batch_spec(self.batch_spec())
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh) for k, (shape, dtype) in spec.items()}

    def execute(self) -> dict:
        from sslvit.checkpoint import Checkpointer  # noqa: PLC0415
        from sslvit.metrics import MetricWriter  # noqa: PLC0415
        from sslvit.train import batch_sharding, fit, make_mesh, memory_report, prefetch_to_device, replicated

        cfg = self.config
        mesh = make_mesh()
        rep = replicated(mesh)
        ckpt = Checkpointer(self.run_dir.checkpoints, max_to_keep=cfg.keep_checkpoints)
        try:
            latest = ckpt.latest_step()
            if latest is not None and not cfg.resume:
                raise ConfigError(f"{self.run_dir.path} already holds checkpoints: pass resume=true to continue that "
                                  f"run, or choose another hydra.run.dir")
            consts = self.setup()
            if self.device_data is not None:  # the training split, replicated: each device gathers its own rows
                consts = self.device_data.consts(consts)
            consts = jax.device_put(consts, rep) if consts is not None else None
            state, train_step = self.build(mesh, cfg.steps)
            start = 0
            if cfg.resume and latest is not None:
                state, _ = ckpt.restore(target=state)  # a damaged latest falls back to the previous one
                state = jax.device_put(state, rep)
                start = int(jax.device_get(state.step))
                log.info("resumed from step %d in %s", start, ckpt.directory)
            elif cfg.resume:
                log.info("resume=true but no checkpoint in %s: starting from step 0", ckpt.directory)

            t0 = time.perf_counter()
            compiled = train_step.lower(state, self.abstract_batch(mesh), consts).compile()
            self.compile_seconds = time.perf_counter() - t0
            self.memory = memory_report(compiled)
            self.log_start(state, start)

            batches = prefetch_to_device(self.train_batches(start), batch_sharding(mesh))
            writer = MetricWriter(self.run_dir.path, enabled=is_main_process(), resume_step=start)
            t0 = time.perf_counter()
            try:
                state, last = fit(state=state, step_fn=compiled, batches=batches, consts=consts,
                                  total_steps=cfg.steps, checkpointer=ckpt, writer=writer, log_every=cfg.log_every,
                                  ckpt_every=cfg.ckpt_every, images_per_step=self.batch_size, meta=self.meta(),
                                  max_nonfinite_streak=cfg.max_nonfinite_streak, progress=cfg.progress,
                                  desc=self.progress_label)
            finally:
                writer.close()
            train_seconds = time.perf_counter() - t0
        finally:
            ckpt.close()

        ips = last.get("images_per_sec")
        results = {"stage": self.name, "run_dir": str(self.run_dir.path), "steps": cfg.steps,
                   "batch_size": self.batch_size, "train_loss": last.get("loss"),
                   "train_accuracy": last.get("accuracy"), "images_per_sec": ips,
                   "step_time_s": (self.batch_size / ips) if ips else None, "train_seconds": round(train_seconds, 2),
                   "nonfinite_steps": last.get("nonfinite_steps"), "compile_seconds": round(self.compile_seconds, 2),
                   "peak_memory_bytes": self.memory.get("peak"), "memory": self.memory}
        results.update(self.results(state, last))
        for evaluator in self.evaluators(mesh):
            results.update(dict(evaluator.run(state)))
        return results

    def log_start(self, state, start: int) -> None:
        """One line saying what trains (override for more)."""
        log.info("%s from step %d: %s trainable parameters; step compiled in %.1fs, peak memory %s MiB", self.name,
                 start, f"{count_params(state.params):,}", self.compile_seconds,
                 f"{self.memory['peak'] / 2**20:.1f}" if self.memory.get("peak") else "?")
