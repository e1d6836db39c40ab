"""Supervised fine-tuning of a pretrained encoder (or training from scratch): the stage behind `finetune.py`.

The run skeleton is `sslvit.stage.TrainingStage`. This stage loads the encoder from the run's checkpoint (its saved
description rebuilds it; command-line model options that contradict it are rejected) or builds the `model` and
`stem` groups' ViT (`run=null`), fits the weights into a classifier at `finetune.image_size` (position embeddings
interpolated), splits the parameters into trainable and frozen by the fine-tune mode (`finetune/mode=...`), and
trains with AdamW and layer-wise lr decay over the trainable ones only; then test top-1.

Frozen parameters are closed over by the loss, not differentiated: XLA computes no weight gradient for them and
the optimiser keeps no state for them, so `attn_only` uses measurably less memory and time than `full`
(`bench/finetune_modes.py`). Mixup/CutMix and label smoothing run on device inside the step (sslvit/mixup.py).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from sslvit import data as data_lib
from sslvit.config.checks import MISSING_VALUE
from sslvit.config.stages import FinetuneConfig
from sslvit.data.config import check_classes
from sslvit.errors import ConfigError
from sslvit.evaluators import Top1Evaluator
from sslvit.finetune_modes import make_mode, partition
from sslvit.mixup import mix_batch, smooth_one_hot
from sslvit.models import build_vit
from sslvit.pretrained import TrainedEncoder, load_batch_stats, load_encoder, load_into, resolve_encoder, touched_keys
from sslvit.stage import TrainingStage, count_params

log = logging.getLogger(__name__)


def _side(size) -> int:
    return int(size[0]) if isinstance(size, (list, tuple)) else int(size)


class Finetuning(TrainingStage):
    """Everything built from a config and validated up front (one-line ConfigErrors); `run()` trains.

    `overrides` are the command-line overrides (Hydra syntax, as `finetune.py` passes them): with `run` set, a
    model option among them that contradicts the run's saved architecture is an error."""

    name = "finetune"
    Config = FinetuneConfig

    def __init__(self, cfg: Mapping, run_dir: str | os.PathLike | None, overrides: Sequence[str] = ()):
        super().__init__(cfg, run_dir)
        c = self.config
        self.ft = c.finetune
        self.mode = make_mode(self.ft.mode)
        self.progress_label = f"finetune {self.mode.name}"
        self.data_cfg = c.data

        self.trained: Optional[TrainedEncoder] = None
        from_run = c.run not in (None, MISSING_VALUE)
        if not from_run:
            c.model.validate()  # the model group is what trains (from scratch, or the init file's architecture)
        requested = {"model": c.model.to_dict(), "stem": dict(c.stem)}
        if c.init is not None:  # an external (timm / DeiT) checkpoint, described by the model and stem groups
            from sslvit.interop import load_init  # noqa: PLC0415

            self.trained = load_init(c.init, requested, image_size=self.ft.image_size)
            base = self.trained.encoder
        elif from_run:
            self.trained = load_encoder(c.run, c.step)
            base = resolve_encoder(self.trained.encoder, requested, touched_keys(overrides, requested), c.run)
        else:
            base = requested
        model = base["model"]
        self.source_image_size = model["image_size"]
        size = self.ft.image_size if self.ft.image_size is not None else model["image_size"]
        patch = model["patch_size"]
        if isinstance(size, (list, tuple)) or size % patch:
            raise ConfigError(
                f"finetune.image_size={size} is not divisible by the patch size {patch}: use a "
                f"multiple of {patch}, e.g. {patch * max(1, round(_side(size) / patch))}"
            )
        self.image_size = int(size)
        self.num_classes = self.data_cfg.num_classes or data_lib.dataset_info(self.data_cfg).num_classes
        self.encoder_cfg = {
            "model": dict(model, image_size=self.image_size, drop_path=self.ft.drop_path),
            "stem": base["stem"],
        }
        self.model = build_vit(self.encoder_cfg, num_classes=self.num_classes)
        self.layer_decay_depth = self.model.depth

    # ----------------------------------------------------------------------------------------- hooks
    def prepare(self):
        info = data_lib.dataset_info(self.data_cfg)  # a missing dataset fails here, before anything is written
        check_classes(info, "fine-tuning a classifier")
        if info.num_classes != self.num_classes:
            raise ConfigError(f"data.num_classes={self.num_classes} but {info.name} has {info.num_classes} classes")
        self.use_device_data(image_size=self.image_size, crop_scale=self.ft.crop_scale, with_labels=True)
        return info

    def init_variables(self) -> tuple[dict, dict]:
        """(params, batch_stats) to start from: the run's weights fitted to this classifier, or a fresh init."""
        shape = (1, self.image_size, self.image_size, self.model.channels)
        init = jax.jit(self.model.init)(jax.random.key(self.config.seed), jnp.zeros(shape))
        params, stats = init["params"], init.get("batch_stats", {})
        if self.trained is None:
            return params, stats
        where = str(self.trained.run_dir)
        src = self.source_image_size
        old = (
            (src // self.model.patch_size,) * 2
            if not isinstance(src, (list, tuple))
            else tuple(s // self.model.patch_size for s in src)
        )
        params = load_into(
            params,
            self.trained.params,
            old_grid=old,
            new_grid=self.model.grid_size,
            where=where,
            keep_head=self.trained.stage == "finetune",
        )
        stats = load_batch_stats(stats, self.trained.batch_stats, where) if stats else {}
        return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, stats)

    def initial_variables(self):
        params, stats = self.init_variables()
        trainable, frozen = partition(params, self.mode)
        return trainable, frozen, stats

    def split(self, params, stats):
        """(trainable, frozen, batch_stats) of a full parameter tree, by the fine-tune mode: for `build(variables=)`."""
        trainable, frozen = partition(params, self.mode)
        return trainable, frozen, stats

    def loss_fn(self, params, batch_stats, batch, rng, consts):
        del consts
        k_mix, k_drop, k_emb = jax.random.split(rng, 3)
        targets = smooth_one_hot(batch["label"], self.num_classes, self.ft.label_smoothing)
        images, targets = mix_batch(
            k_mix,
            batch["image"],
            targets,
            mixup_alpha=self.ft.mixup_alpha,
            cutmix_alpha=self.ft.cutmix_alpha,
            mix_prob=self.ft.mix_prob,
            switch_prob=self.ft.switch_prob,
        )
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits, updates = self.model.apply(
            variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": k_drop, "emb_dropout": k_emb}
        )
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = (jnp.argmax(logits, -1) == batch["label"]).mean()  # against the unmixed labels
        return loss, ({"accuracy": accuracy}, updates.get("batch_stats", batch_stats))

    def train_batches(self, start_step: int):
        keys = ("index",) if self.device_data is not None else ("image", "label")
        batches = self.input_batches(start_step, image_size=self.image_size, crop_scale=self.ft.crop_scale)

        def selected():
            try:
                for b in batches:
                    yield {k: b[k] for k in keys}
            finally:  # closed when the stage ends: the input iterator's threads stop with it
                data_lib.close_iterator(batches)

        return selected()

    def batch_spec(self):
        s, b = self.image_size, self.batch_size
        return {"image": ((b, s, s, self.model.channels), jnp.float32), "label": ((b,), jnp.int32)}

    def evaluators(self, mesh):
        n = self.local_batch_size
        batches = lambda: data_lib.make_eval_iterator(self.data_cfg, batch_size=n, image_size=self.image_size)  # noqa: E731
        return [Top1Evaluator(self.model, batches, mesh=mesh, max_batches=self.config.eval_batches)]

    def source(self) -> dict:
        return {
            "source_run": str(self.trained.run_dir) if self.trained else None,
            "source_step": self.trained.step if self.trained else None,
        }

    def meta(self) -> dict:
        return {
            **super().meta(),
            "encoder": self.encoder_cfg,
            "num_classes": self.num_classes,
            "mode": self.mode.name,
            **self.source(),
        }

    def results(self, state, last) -> dict:
        n_train, n_frozen = count_params(state.params), count_params(state.frozen)
        return {
            "mode": self.mode.name,
            "mode_options": self.mode.options(),
            **self.source(),
            "source_image_size": self.source_image_size,
            "image_size": self.image_size,
            "dataset": self.info.name,
            "num_classes": self.num_classes,
            "trainable_params": n_train,
            "total_params": n_train + n_frozen,
            "encoder": self.encoder_cfg,
            **({"skipped_images": self.info.num_skipped} if self.info.num_skipped else {}),
        }  # data.on_corrupt=skip

    def log_start(self, state, start: int) -> None:
        n_train, n_frozen = count_params(state.params), count_params(state.frozen)
        log.info(
            "fine-tuning (%s) %s of %s params trainable; step peak memory %s MiB; compile %.1fs; from %s; step %d",
            self.mode,
            f"{n_train:,}",
            f"{n_train + n_frozen:,}",
            f"{self.memory['peak'] / 2**20:.1f}" if self.memory.get("peak") else "?",
            self.compile_seconds,
            f"{self.trained.run_dir} step {self.trained.step}" if self.trained else "scratch",
            start,
        )


def finetune(cfg: Mapping, run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> dict:
    return Finetuning(cfg, run_dir, overrides).run()
