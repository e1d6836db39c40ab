"""BEiT-style masked-patch pretraining: the stage behind `pretrain.py`.

The run skeleton is `sslvit.stage.TrainingStage`; this stage supplies the masked image model, the mask sampler, the
target (a tokenizer fitted, or loaded, before the state is built) and the masked-token evaluation of the test split.
The builders (`build_encoder`, `build_sampler`, `build_target`) are what `visualize` uses to rebuild a run's model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sslvit import masking, targets
from sslvit import data as data_lib
from sslvit.config.stages import PretrainConfig
from sslvit.distributed import is_main_process
from sslvit.errors import ConfigError
from sslvit.evaluators import MaskedPatchEvaluator
from sslvit.models import build_vit, encoder_config
from sslvit.models.mim import MaskedImageModel
from sslvit.stage import TrainingStage, count_params

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ builders
def build_encoder(encoder: Mapping):
    """The encoder of a masked image model: no classification head, a learned mask token."""
    return build_vit(encoder, num_classes=0, use_mask_token=True)


def build_sampler(mask: Mapping, mask_ratio: Any, encoder) -> masking.MaskSampler:
    """The `mask` group's sampler on the encoder's patch grid."""
    return masking.make_mask_sampler(mask["name"], encoder.grid_size, mask_ratio, **mask)


def build_target(target: Mapping, encoder) -> targets.Target:
    """The `target` group's target for the encoder's patches (its `path`, if any, is for `fit_or_load`)."""
    return targets.make_target(target["name"], patch_size=encoder.patch_size, channels=encoder.channels, **target)


class Pretraining(TrainingStage):
    """Everything built from a config, validated up front (one-line ConfigErrors); `run()` trains."""

    name = "pretrain"
    Config = PretrainConfig
    progress_label = "pretrain"

    def __init__(self, cfg: Mapping, run_dir: str | os.PathLike | None):
        super().__init__(cfg, run_dir)
        c = self.config
        self.encoder_cfg = encoder_config(c.model, c.stem)
        self.encoder = build_encoder(self.encoder_cfg)
        self.sampler = build_sampler(c.mask, c.mask_ratio, self.encoder)
        self.target_cfg = dict(c.target)
        path = self.target_cfg.get("path")
        if path is not None and not Path(os.path.expanduser(str(path))).is_file():  # found now, not after the data
            raise ConfigError(f"target.path={path!r}: no such file; point it at the {targets.TOKENIZER_FILENAME} of "
                              f"an earlier run, or set target.path=null to fit a new tokenizer")
        self.target = build_target(self.target_cfg, self.encoder)
        self.model = MaskedImageModel(self.encoder, self.target.num_outputs)
        self.data_cfg = c.data

    @property
    def image_size(self) -> int:
        return self.encoder.grid_size[0] * self.encoder.patch_size

    # ----------------------------------------------------------------------------------------- hooks
    def prepare(self):
        info = data_lib.dataset_info(self.data_cfg)  # a missing dataset fails here, before anything is written
        self.use_device_data(image_size=self.image_size, crop_scale=self.data_cfg.crop_scale, with_labels=False)
        return info

    def setup(self):
        """Fit the target's tokenizer (or load it: `target.path`, or the run's own when resuming)."""
        saved = self.run_dir.tokenizer_file
        cfg = dict(self.target_cfg)
        if self.config.resume and saved.exists():
            cfg["path"] = str(saved)  # a resumed run keeps the tokenizer it started with

        def images():
            # Every process reads the same images (the whole split, not its shard): one tokenizer for all.
            it = data_lib.make_train_iterator(self.data_cfg, batch_size=min(256, self.batch_size * 2),
                                              image_size=self.image_size, seed=self.config.seed + 1, augment=False,
                                              process_index=0, process_count=1)
            return (b["image"] for b in it)

        state = targets.fit_or_load(self.target, cfg, images, self.config.seed,
                                    self.run_dir.path if is_main_process() else None)
        if jax.process_count() > 1:  # bit-identical consts on every process, whatever each device computed
            from jax.experimental import multihost_utils  # noqa: PLC0415

            state = multihost_utils.broadcast_one_to_all(state)
        self.consts = jax.tree.map(jnp.asarray, state)
        return self.consts

    def initial_variables(self):
        shape = (1, self.image_size, self.image_size, self.encoder.channels)
        mask = np.zeros((1, self.encoder.num_patches), bool)
        variables = jax.jit(self.model.init)(jax.random.key(self.config.seed), jnp.zeros(shape), mask)
        return variables["params"], {}, variables.get("batch_stats", {})

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

    def train_batches(self, start_step: int):
        """Images + masks for each step from `start_step` on; masks are a function of (seed, step, process), so
        a resumed run sees exactly the masks of an uninterrupted one."""
        n = self.local_batch_size
        seed = self.config.seed
        step = start_step
        for batch in self.input_batches(start_step, image_size=self.image_size):
            rng = np.random.default_rng([seed, step, jax.process_index()])
            yield {**{k: v for k, v in batch.items() if k != "label"}, "mask": self.sampler(rng, n)}
            step += 1

    def batch_spec(self):
        s, b = self.image_size, self.batch_size
        return {"image": ((b, s, s, self.encoder.channels), jnp.float32),
                "mask": ((b, self.encoder.num_patches), jnp.bool_)}

    def evaluators(self, mesh):
        n = self.local_batch_size
        batches = lambda: data_lib.make_eval_iterator(self.data_cfg, batch_size=n, image_size=self.image_size)  # noqa: E731
        return [MaskedPatchEvaluator(self.model, self.target, self.consts, self.sampler, batches, mesh=mesh,
                                     seed=self.config.seed, local_batch_size=n,
                                     max_batches=self.config.eval_batches)]

    def meta(self) -> dict:
        return {**super().meta(), "encoder": self.encoder_cfg, "num_outputs": self.target.num_outputs,
                "target": self.target_cfg, "mask_ratio": self.sampler.mask_ratio}

    def results(self, state, last) -> dict:
        out = {"params": count_params(state.all_params())}
        chance = self.target.chance_accuracy(jax.device_get(self.consts))
        if chance is not None:
            out["chance_accuracy"] = chance
        if self.info.num_skipped:  # data.on_corrupt=skip: how many corrupt images were left out
            out["skipped_images"] = self.info.num_skipped
        return out

    def log_start(self, state, start: int) -> None:
        m = self.encoder_cfg["model"]
        log.info("pretraining %s params (ViT dim %d %dx%d heads %d patch %d @ %spx stem %s), mask %s %d/%d, target %s "
                 "(%d outputs), data %s (%d train images); step compiled in %.1fs, peak memory %s MiB; from step %d",
                 f"{count_params(state.all_params()):,}", m["dim"], m["depth"], m["num_parallel_branches"],
                 m["heads"], m["patch_size"], m["image_size"], self.encoder_cfg["stem"]["name"],
                 self.sampler.name, self.sampler.num_masked, self.encoder.num_patches, self.target.name,
                 self.target.num_outputs, self.data_cfg.name, self.info.num_train, self.compile_seconds,
                 f"{self.memory['peak'] / 2**20:.1f}" if self.memory.get("peak") else "?", start)


def pretrain(cfg: Mapping, run_dir: str | os.PathLike) -> dict:
    return Pretraining(cfg, run_dir).run()
