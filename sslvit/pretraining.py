"""BEiT-style masked-patch pretraining: the stage behind `pretrain.py`.

Order of work: validate the whole config (one-line ConfigErrors) -> check the dataset -> fit or load the target's
tokenizer -> build and shard the state (or restore it) -> jit one donated train step -> loop -> evaluate the
masked-token accuracy on the test split -> write results.json.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sslvit import data as data_lib
from sslvit import masking, optim, targets
from sslvit.checkpoint import Checkpointer
from sslvit.config import build_vit, check_batch_size, model_config, to_dict
from sslvit.errors import ConfigError
from sslvit.metrics import MetricWriter
from sslvit.models.mim import MaskedImageModel
from sslvit.train import (TrainState, batch_sharding, check_loop_config, fit, make_mesh, make_train_step,
                          prefetch_to_device, replicated)

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"


class Pretraining:
    """Everything built from a config, validated up front; `run()` trains."""

    def __init__(self, cfg: Mapping, run_dir: str | os.PathLike):
        self.cfg = cfg
        self.run_dir = Path(run_dir).absolute()
        check_loop_config(cfg)
        self.seed = int(cfg["seed"])
        optim.validate(cfg["optim"])
        self.accum = int(cfg["optim"].get("accum_steps", 1))
        self.batch_size = check_batch_size(cfg["batch_size"], self.accum)
        self.model_cfg = model_config(cfg)
        self.encoder = build_vit(self.model_cfg, num_classes=0, use_mask_token=True)
        mask_cfg = to_dict(cfg["mask"])
        ratio = cfg["mask_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ConfigError(f"mask_ratio={ratio!r} must be a number in (0, 1)")
        self.sampler = masking.make_mask_sampler(mask_cfg.pop("name"), self.encoder.grid_size, float(ratio),
                                                 **mask_cfg)
        target_cfg = to_dict(cfg["target"])
        self.target_cfg = target_cfg
        path = target_cfg.get("path")
        if path is not None and not Path(os.path.expanduser(str(path))).is_file():  # found now, not after the data
            raise ConfigError(f"target.path={path!r}: no such file; point it at the {targets.TOKENIZER_FILENAME} of "
                              f"an earlier run, or set target.path=null to fit a new tokenizer")
        self.target = targets.make_target(target_cfg["name"], patch_size=self.encoder.patch_size,
                                          channels=self.encoder.channels, **target_cfg)
        self.data_cfg = data_lib.DataConfig.from_cfg(cfg["data"])
        self.model = MaskedImageModel(self.encoder, self.target.num_outputs)

    # ----------------------------------------------------------------------------------------- pieces
    def local_batch_size(self) -> int:
        return self.batch_size // jax.process_count()

    def host_batches(self, start_step: int):
        """Images + masks for each step from `start_step` on; masks are a function of (seed, step, process), so
        a resumed run sees exactly the masks of an uninterrupted one."""
        n = self.local_batch_size()
        it = data_lib.make_train_iterator(self.data_cfg, batch_size=n, image_size=self.encoder.grid_size[0] *
                                          self.encoder.patch_size, seed=self.seed, start_step=start_step)
        step = start_step
        for batch in it:
            rng = np.random.default_rng([self.seed, step, jax.process_index()])
            yield {"image": batch["image"], "mask": self.sampler(rng, n)}
            step += 1

    def fit_target(self):
        saved = self.run_dir / targets.TOKENIZER_FILENAME
        cfg = dict(self.target_cfg)
        if self.cfg.get("resume") and saved.exists():
            cfg["path"] = str(saved)  # a resumed run keeps the tokenizer it started with

        def images():
            # Every process reads the same images (the whole split, not its shard): one tokenizer for all.
            it = data_lib.make_train_iterator(self.data_cfg, batch_size=min(256, self.batch_size * 2),
                                              image_size=self.image_size, seed=self.seed + 1, augment=False,
                                              process_index=0, process_count=1)
            return (b["image"] for b in it)

        main = jax.process_index() == 0
        state = targets.fit_or_load(self.target, cfg, images, self.seed, self.run_dir if main else None)
        if jax.process_count() > 1:  # bit-identical consts on every process, whatever each device computed
            from jax.experimental import multihost_utils  # noqa: PLC0415

            state = multihost_utils.broadcast_one_to_all(state)
        return state

    @property
    def image_size(self) -> int:
        return self.encoder.grid_size[0] * self.encoder.patch_size

    def loss_fn(self, params, batch_stats, batch, rng, consts):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        tokens = self.target.compute(consts, batch["image"])
        rngs = {"dropout": jax.random.fold_in(rng, 0), "emb_dropout": jax.random.fold_in(rng, 1)}
        preds, updates = self.model.apply(variables, batch["image"], batch["mask"], train=True, rngs=rngs,
                                          mutable=["batch_stats"])
        loss, metrics = self.target.loss(preds, tokens, batch["mask"])
        return loss, (metrics, updates.get("batch_stats", batch_stats))

    def eval_fn(self, params, batch_stats, batch, consts):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        tokens = self.target.compute(consts, batch["image"])
        preds = self.model.apply(variables, batch["image"], batch["mask"], train=False)
        _, metrics = self.target.loss(preds, tokens, batch["mask"])
        return metrics

    def init_state(self, optimizer):
        shape = (1, self.image_size, self.image_size, self.encoder.channels)
        mask = np.zeros((1, self.encoder.num_patches), bool)
        variables = self.model.init(jax.random.key(self.seed), jnp.zeros(shape), mask)
        return TrainState.create(variables["params"], {}, variables.get("batch_stats", {}), optimizer)

    def meta(self) -> dict:
        return {"stage": "pretrain", "model": self.model_cfg, "num_outputs": self.target.num_outputs,
                "target": self.target_cfg, "mask_ratio": float(self.cfg["mask_ratio"]),
                "config": to_dict(self.cfg)}

    # ----------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        cfg = self.cfg
        info = data_lib.dataset_info(self.data_cfg)  # a missing dataset fails here, before any compile
        self.run_dir.mkdir(parents=True, exist_ok=True)
        consts = jax.tree.map(jnp.asarray, self.fit_target())

        mesh = make_mesh()
        rep, data_sh = replicated(mesh), batch_sharding(mesh)
        total = int(cfg["steps"])
        abstract_params = jax.eval_shape(self.init_state_params)
        optimizer, schedule = optim.make_optimizer(cfg["optim"], abstract_params, total_steps=total)
        state = jax.jit(lambda: self.init_state(optimizer), out_shardings=rep)()
        ckpt = Checkpointer(self.run_dir / "checkpoints", max_to_keep=int(cfg.get("keep_checkpoints", 3)))
        start = 0
        if cfg.get("resume"):
            if ckpt.latest_step() is not None:
                state, _ = ckpt.restore(target=state)  # a damaged latest falls back to the previous one
                state = jax.device_put(state, rep)
                start = int(jax.device_get(state.step))
                log.info("resumed from step %d in %s", start, ckpt.directory)
            else:
                log.info("resume=true but no checkpoint in %s: starting from step 0", ckpt.directory)
        elif ckpt.latest_step() is not None:
            raise ConfigError(f"{self.run_dir} already holds checkpoints: pass resume=true to continue that run, "
                              f"or choose another hydra.run.dir")

        step_fn = make_train_step(self.loss_fn, optimizer, seed=self.seed, accum_steps=self.accum,
                                  schedule=schedule)
        train_step = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(rep, rep))
        batches = prefetch_to_device(self.host_batches(start), data_sh)
        writer = MetricWriter(self.run_dir, enabled=jax.process_index() == 0, resume_step=start)
        chance = self.target.chance_accuracy(jax.device_get(consts))
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        log.info("pretraining %s params, %s, mask %s x %d/%d, target %s (%d outputs), data %s (%d train images)",
                 f"{n_params:,}", _model_str(self.model_cfg), self.sampler.__class__.__name__,
                 self.sampler.num_masked, self.encoder.num_patches, self.target.name, self.target.num_outputs,
                 self.data_cfg.name, info.num_train)
        try:
            state, last = fit(state=state, step_fn=train_step, batches=batches, consts=consts, total_steps=total,
                              checkpointer=ckpt, writer=writer, log_every=int(cfg["log_every"]),
                              ckpt_every=int(cfg["ckpt_every"]), images_per_step=self.batch_size,
                              meta=self.meta(), max_nonfinite_streak=int(cfg.get("max_nonfinite_streak", 20)),
                              progress=bool(cfg.get("progress", True)), desc="pretrain")
        finally:
            writer.close()
            ckpt.close()

        results = {"stage": "pretrain", "run_dir": str(self.run_dir), "steps": total, "params": n_params,
                   "train_loss": last.get("loss"), "train_accuracy": last.get("accuracy"),
                   "images_per_sec": last.get("images_per_sec"), "nonfinite_steps": last.get("nonfinite_steps")}
        if info.num_skipped:  # data.on_corrupt=skip: how many corrupt images were left out
            results["skipped_images"] = info.num_skipped
        if chance is not None:
            results["chance_accuracy"] = chance
        results.update(self.evaluate(state, consts, mesh))
        if jax.process_index() == 0:
            (self.run_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        return results

    def init_state_params(self):
        shape = (1, self.image_size, self.image_size, self.encoder.channels)
        mask = np.zeros((1, self.encoder.num_patches), bool)
        return self.model.init(jax.random.key(self.seed), jnp.zeros(shape), mask)["params"]

    def evaluate(self, state, consts, mesh) -> dict:
        """Masked-token accuracy (or pixel MSE) on the test split, with masks fixed by the seed."""
        n_batches = self.cfg.get("eval_batches", 0)  # null: the whole test split
        if n_batches == 0:
            return {}
        rep, data_sh = replicated(mesh), batch_sharding(mesh)
        n = self.local_batch_size()
        it = data_lib.make_eval_iterator(self.data_cfg, batch_size=n, image_size=self.image_size)
        eval_step = jax.jit(lambda p, s, b, c: self.eval_fn(p, s, b, c), out_shardings=rep)
        sums: dict[str, float] = {}
        count = 0
        params = state.all_params()
        from sslvit.train import to_global  # noqa: PLC0415

        for i, batch in enumerate(it):
            if n_batches is not None and i >= n_batches:
                break
            valid = batch["valid"]
            if not valid.all():  # static shapes: evaluate full batches only
                break
            rng = np.random.default_rng([self.seed, 10**9 + i, jax.process_index()])
            b = to_global({"image": batch["image"], "mask": self.sampler(rng, n)}, data_sh)
            metrics = jax.device_get(eval_step(params, state.batch_stats, b, consts))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
        return {f"test_{k}": v / max(count, 1) for k, v in sums.items()} | {"test_batches": count}


def _model_str(m: Mapping) -> str:
    return (f"ViT dim {m['dim']} {m['depth']}x{m['num_parallel_branches']} heads {m['heads']} patch "
            f"{m['patch_size']} @ {m['image_size']}px stem {m['stem']}")


def pretrain(cfg: Mapping, run_dir: str | os.PathLike) -> dict:
    return Pretraining(cfg, run_dir).run()
