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

from sslvit import data as data_lib
from sslvit import masking, signals, targets
from sslvit.config.stages import PretrainConfig
from sslvit.distributed import is_main_process
from sslvit.errors import ConfigError
from sslvit.evaluators import KnnMonitor, MaskedPatchEvaluator
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
            raise ConfigError(
                f"target.path={path!r}: no such file; point it at the {targets.TOKENIZER_FILENAME} of "
                f"an earlier run, or set target.path=null to fit a new tokenizer"
            )
        self.target = build_target(self.target_cfg, self.encoder)
        if path is not None:  # read now: a file that is not this target's tokenizer fails before anything runs
            self.target.load(Path(os.path.expanduser(str(path))))
        self.model = MaskedImageModel(self.encoder, self.target.num_outputs)
        self.data_cfg = c.data
        depth = self.encoder.depth
        if not (1 <= c.monitor.layer <= depth or -depth <= c.monitor.layer <= -1):
            raise ConfigError(
                f"monitor.layer={c.monitor.layer} must be a layer in 1..{depth}, or -1..-{depth} counting from the last"
            )
        self.monitor = None

    @property
    def image_size(self) -> int:
        return self.encoder.grid_size[0] * self.encoder.patch_size

    # ----------------------------------------------------------------------------------------- hooks
    def prepare(self):
        info = data_lib.dataset_info(self.data_cfg)  # a missing dataset fails here, before anything is written
        if self.config.monitor.every and not info.num_test:
            raise ConfigError(
                f"monitor.every={self.config.monitor.every} needs labelled test images, and "
                f"data.test_split={self.data_cfg.test_split!r} of {info.name} has none; set "
                "monitor.every=0 or point data.test_split at a labelled split"
            )
        self.use_device_data(image_size=self.image_size, crop_scale=self.data_cfg.crop_scale, with_labels=False)
        return info

    def setup(self):
        """Fit the target's tokenizer (or load it: `target.path`, or the run's own when resuming)."""
        saved = self.run_dir.tokenizer_file
        cfg = dict(self.target_cfg)
        fits = self.target.fits  # the target has a state of its own (a codebook)
        if self.config.resume and saved.exists():
            cfg["path"] = str(saved)  # a resumed run keeps the tokenizer it started with
        elif self.config.resume and fits and self.run_dir.checkpoint_steps():
            raise ConfigError(
                f"{saved} is missing, but the run's checkpoints were trained against it: put it back "
                f"(a new tokenizer would give other tokens), or start a new run in another "
                f"{self.run_dir.key}"
            )

        def images():
            # Every process reads the same images (the whole split, not its shard): one tokenizer for all. Batches
            # of up to 256 images, never more than the split holds (a small split is a valid one).
            batch = max(1, min(256, self.batch_size * 2, self.info.num_train))
            it = data_lib.make_train_iterator(
                self.data_cfg,
                batch_size=batch,
                image_size=self.image_size,
                seed=self.config.seed + 1,
                augment=False,
                process_index=0,
                process_count=1,
            )
            return (b["image"] for b in it)

        if not cfg.get("path") and fits:
            signals.phase("tokenizer fit")
        state = targets.fit_or_load(
            self.target,
            cfg,
            images,
            self.config.seed,
            self.run_dir.path if is_main_process() else None,
            key=self._tokenizer_key(cfg),
        )
        signals.phase("set-up")
        if jax.process_count() > 1:  # bit-identical consts on every process, whatever each device computed
            from jax.experimental import multihost_utils  # noqa: PLC0415

            state = multihost_utils.broadcast_one_to_all(state)
        self.consts = jax.tree.map(jnp.asarray, state)
        return self.consts

    def _tokenizer_key(self, cfg: Mapping) -> str:
        """How messages name the tokenizer file being read: the user's target.path, or the run's own."""
        path = cfg.get("path")
        if path and Path(str(path)).expanduser().absolute() == self.run_dir.tokenizer_file.absolute():
            return "the run's tokenizer"
        return "target.path"

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
        preds, updates = self.model.apply(
            variables, batch["image"], batch["mask"], train=True, rngs=rngs, mutable=["batch_stats"]
        )
        loss, metrics = self.target.loss(preds, tokens, batch["mask"])
        return loss, (metrics, updates.get("batch_stats", batch_stats))

    def train_batches(self, start_step: int):
        """Images + masks for each step from `start_step` on; masks are a function of (seed, step, process), so
        a resumed run sees exactly the masks of an uninterrupted one. The input iterator is made here, on the
        calling thread (TensorFlow is imported there); the batches are made as they are taken."""
        n, seed, process = self.local_batch_size, self.config.seed, jax.process_index()
        inputs = self.input_batches(start_step, image_size=self.image_size)

        def with_masks():
            try:
                for step, batch in enumerate(inputs, start=start_step):
                    rng = np.random.default_rng([seed, step, process])
                    yield {**{k: v for k, v in batch.items() if k != "label"}, "mask": self.sampler(rng, n)}
            finally:  # closed when the stage ends: the input iterator's threads stop with it
                data_lib.close_iterator(inputs)

        return with_masks()

    def batch_spec(self):
        s, b = self.image_size, self.batch_size
        return {
            "image": ((b, s, s, self.encoder.channels), jnp.float32),
            "mask": ((b, self.encoder.num_patches), jnp.bool_),
        }

    def evaluators(self, mesh):
        n = self.local_batch_size
        batches = lambda: data_lib.make_eval_iterator(self.data_cfg, batch_size=n, image_size=self.image_size)  # noqa: E731
        return [
            MaskedPatchEvaluator(
                self.model,
                self.target,
                self.consts,
                self.sampler,
                batches,
                mesh=mesh,
                seed=self.config.seed,
                local_batch_size=n,
                max_batches=self.config.eval_batches,
            )
        ]

    def periodic_evaluators(self, mesh):
        """The online k-NN monitor (`monitor.every` > 0): the encoder's features of fixed train and test subsets."""
        from sslvit.probe.features import make_feature_fn  # noqa: PLC0415

        m = self.config.monitor
        if not m.every:
            return []
        n = self.local_batch_size

        def batches(split):
            return lambda: data_lib.make_eval_iterator(self.data_cfg, split, batch_size=n, image_size=self.image_size)

        def encoder_variables(state):
            variables = {"params": state.all_params()["encoder"]}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats["encoder"]
            return variables

        layer = m.layer if m.layer > 0 else self.encoder.depth + 1 + m.layer
        self.monitor = KnnMonitor(
            make_feature_fn(self.encoder, [layer], m.pool),
            encoder_variables,
            batches(self.data_cfg.train_split),
            batches(self.data_cfg.test_split),
            mesh=mesh,
            global_batch=self.batch_size,
            num_train=m.num_train,
            num_test=m.num_test,
            num_classes=self.info.num_classes,
            k=m.k,
            temperature=m.temperature,
        )
        return [(m.every, self.monitor)]

    def meta(self) -> dict:
        return {
            **super().meta(),
            "encoder": self.encoder_cfg,
            "num_outputs": self.target.num_outputs,
            "target": self.target_cfg,
            "mask_ratio": self.sampler.mask_ratio,
        }

    def results(self, state, last) -> dict:
        out = {"params": count_params(state.all_params())}
        chance = self.target.chance_accuracy(jax.device_get(self.consts))
        if chance is not None:
            out["chance_accuracy"] = chance
        if self.info.num_skipped:  # data.on_corrupt=skip: how many corrupt images were left out
            out["skipped_images"] = self.info.num_skipped
        if self.monitor is not None:
            out["monitor_seconds"] = round(self.monitor.seconds, 2)
        return out

    def log_start(self, state, start: int) -> None:
        m = self.encoder_cfg["model"]
        log.info(
            "pretraining %s params (ViT dim %d %dx%d heads %d patch %d @ %spx stem %s), mask %s %d/%d, target %s "
            "(%d outputs), data %s (%d train images); step compiled in %.1fs, peak memory %s MiB; from step %d",
            f"{count_params(state.all_params()):,}",
            m["dim"],
            m["depth"],
            m["num_parallel_branches"],
            m["heads"],
            m["patch_size"],
            m["image_size"],
            self.encoder_cfg["stem"]["name"],
            self.sampler.name,
            self.sampler.num_masked,
            self.encoder.num_patches,
            self.target.name,
            self.target.num_outputs,
            self.data_cfg.name,
            self.info.num_train,
            self.compile_seconds,
            f"{self.memory['peak'] / 2**20:.1f}" if self.memory.get("peak") else "?",
            start,
        )


def pretrain(cfg: Mapping, run_dir: str | os.PathLike) -> dict:
    return Pretraining(cfg, run_dir).run()
