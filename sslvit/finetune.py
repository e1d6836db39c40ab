"""Supervised fine-tuning of a pretrained encoder (or training from scratch): the stage behind `finetune.py`.

Order of work: validate the whole config (one-line ConfigErrors: mode, image size, loop, optimiser, mixing) ->
load the encoder from the run's checkpoint (its saved config rebuilds it; command-line model options that
contradict it are rejected) or build the `model` group's ViT (`run=null`) -> fit the weights into a classifier at
`finetune.image_size` (position embeddings interpolated) -> split the parameters into trainable and frozen by
`finetune.mode` -> AdamW with layer-wise lr decay over the trainable ones only -> compile the donated train step
once (XLA's memory analysis gives its peak memory) -> `train.fit` (checkpoints, resume, SIGTERM) -> test top-1 ->
results.json.

Frozen parameters are closed over by the loss, not differentiated: XLA computes no weight gradient for them and
the optimiser keeps no state for them, so `attn_only` uses measurably less memory and time than `full`
(`bench/finetune_modes.py`). Mixup/CutMix and label smoothing run on device inside the step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sslvit import data as data_lib
from sslvit import optim
from sslvit.config import build_vit, check_batch_size, model_config, to_dict
from sslvit.errors import ConfigError
from sslvit.finetune_modes import get_mode, partition
from sslvit.pretrained import (TrainedEncoder, load_batch_stats, load_encoder, load_into, resolve_model_config,
                               touched_model_keys)
from sslvit.train import (TrainState, batch_sharding, check_loop_config, fit, make_mesh, make_train_step,
                          prefetch_to_device, replicated, to_global)

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"


# ------------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The `finetune` config group, validated."""

    mode: str = "full"
    image_size: Optional[int] = None  # None: the pretraining resolution
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # 0 = off (BEiT: 0.8)
    cutmix_alpha: float = 0.0  # 0 = off (BEiT: 1.0)
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # with both on: probability of CutMix rather than Mixup
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range

    @classmethod
    def from_cfg(cls, cfg: Mapping) -> "FinetuneConfig":
        cfg = dict(cfg or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ConfigError(f"finetune.{unknown[0]} is not a fine-tune key; the keys are "
                              f"{', '.join('finetune.' + f for f in sorted(fields))}")
        raw = {f.name: cfg.get(f.name, f.default) for f in dataclasses.fields(cls)}
        get_mode(raw["mode"] if isinstance(raw["mode"], str) else repr(raw["mode"]))
        size = raw["image_size"]
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"finetune.image_size={size!r} must be a positive integer (a multiple of the patch "
                              f"size), or null for the pretraining resolution")
        for key, hi in (("drop_path", 1.0), ("label_smoothing", 1.0), ("mix_prob", 1.0 + 1e-9),
                        ("switch_prob", 1.0 + 1e-9)):
            v = raw[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < hi:
                rng = "[0, 1)" if hi == 1.0 else "[0, 1]"
                raise ConfigError(f"finetune.{key}={v!r} must be a number in {rng}")
            raw[key] = float(v)
        for key in ("mixup_alpha", "cutmix_alpha"):
            v = raw[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"finetune.{key}={v!r} must be a number >= 0 (0 = off; BEiT uses mixup 0.8, "
                                  f"cutmix 1.0)")
            raw[key] = float(v)
        raw["crop_scale"] = data_lib.check_crop_scale(list(raw["crop_scale"]), "finetune.crop_scale")
        return cls(**raw)


# ------------------------------------------------------------------------------------------ mixing (on device)
def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing) if smoothing else \
        jax.nn.one_hot(labels, num_classes)


def mix_batch(rng: jax.Array, images: jax.Array, targets: jax.Array, *, mixup_alpha: float, cutmix_alpha: float,
              mix_prob: float = 1.0, switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """Batch-level Mixup / CutMix (timm's 'batch' mode): each image is mixed with the batch's reversed order.

    Mixup: x = lam x + (1 - lam) x_rev; CutMix: a box of area (1 - lam) pasted from x_rev, lam recomputed from the
    clipped box; targets (soft, (B, C)) mixed with the same lam. With both on, CutMix with `switch_prob`."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(rng, 6)
    b, h, w, _ = images.shape
    partner, partner_t = images[::-1], targets[::-1]
    one = jnp.ones((), jnp.float32)

    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else one
    mixed = lam_mix * images + (1 - lam_mix) * partner

    if cutmix_alpha > 0:
        lam = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)
        ratio = jnp.sqrt(1.0 - lam)
        ch, cw = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
        cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
        y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
        x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
        yy, xx = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        box = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        cut = jnp.where(box[None, :, :, None], partner, images)
        lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
    else:
        cut, lam_cut = images, one

    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cut = jax.random.bernoulli(k_switch, switch_prob)
    else:
        use_cut = jnp.asarray(cutmix_alpha > 0)
    apply = jax.random.bernoulli(k_apply, mix_prob) if mix_prob < 1 else jnp.asarray(True)
    out = jnp.where(apply, jnp.where(use_cut, cut, mixed), images)
    lam = jnp.where(apply, jnp.where(use_cut, lam_cut, lam_mix), one)
    return out, lam * targets + (1 - lam) * partner_t


# ------------------------------------------------------------------------------------------ compiled-step report
def memory_report(compiled) -> dict:
    """Peak memory of a compiled step from XLA's memory analysis: argument + output + temp buffers, minus the
    outputs that alias donated arguments (counted once). Bytes; {} where the backend does not say."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # best-effort: some backends raise NotImplementedError
        ma = None
    if ma is None:
        return {}
    get = lambda name: int(getattr(ma, f"{name}_size_in_bytes", 0) or 0)  # noqa: E731
    out = {name: get(name) for name in ("argument", "output", "temp", "alias", "generated_code")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def _is_missing(cfg: Mapping, key: str) -> bool:
    """A `???` value in a Hydra config (reads as None through .get)."""
    from omegaconf import DictConfig, OmegaConf  # noqa: PLC0415

    return isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, key)


def _side(size) -> int:
    return int(size[0]) if isinstance(size, (list, tuple)) else int(size)


def count_params(tree) -> int:
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------------ the stage
class Finetuning:
    """Everything built from a config and validated up front (one-line ConfigErrors); `run()` trains.

    `overrides` are the command-line overrides (Hydra syntax, as `finetune.py` passes them): with `run` set, a
    model option among them that contradicts the run's saved architecture is an error."""

    def __init__(self, cfg: Mapping, run_dir: str | os.PathLike, overrides: Sequence[str] = ()):
        self.cfg = cfg
        self.run_dir = Path(run_dir).absolute()
        self.ft = FinetuneConfig.from_cfg(cfg.get("finetune") or {})
        check_loop_config(cfg)
        self.seed = cfg.get("seed", 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} must be an integer >= 0")
        optim.validate(cfg["optim"])
        self.accum = int(cfg["optim"].get("accum_steps", 1))
        self.batch_size = check_batch_size(cfg["batch_size"], self.accum)
        self.data_cfg = data_lib.DataConfig.from_cfg(cfg["data"])
        eval_batches = cfg.get("eval_batches")
        if eval_batches is not None and (isinstance(eval_batches, bool) or not isinstance(eval_batches, int)
                                         or eval_batches < 0):
            raise ConfigError(f"eval_batches={eval_batches!r} must be an integer >= 0, or null for the whole split")
        self.eval_batches = eval_batches

        init = cfg.get("init")  # an external (timm / DeiT) checkpoint, described by the model and stem groups
        if _is_missing(cfg, "run") and init is None:
            raise ConfigError("run is not set: pass run=<a pretraining run dir> (the dir pretrain.py printed), "
                              "init=<a timm or DeiT .safetensors/.pth file>, or run=null to train from scratch")
        self.trained: Optional[TrainedEncoder] = None
        requested = model_config(cfg) if "model" in cfg and "stem" in cfg else {}
        if init is not None:
            if cfg.get("run") is not None:
                raise ConfigError(f"run={cfg.get('run')} and init={init} are both set: start from a run or from a "
                                  f"file (drop one)")
            from sslvit.interop import load_init  # noqa: PLC0415

            self.trained = load_init(init, requested, image_size=self.ft.image_size)
            base = self.trained.model_cfg
        elif cfg.get("run") is not None:
            self.trained = load_encoder(cfg["run"], cfg.get("step"))
            base = resolve_model_config(self.trained.model_cfg, requested, touched_model_keys(overrides),
                                        cfg["run"])
        else:
            if not requested:
                raise ConfigError("run=null trains from scratch and needs the model and stem groups: pass "
                                  "run=<pretraining run dir>, or model=<preset> stem=<stem>")
            base = requested
        self.source_image_size = base["image_size"]
        size = self.ft.image_size if self.ft.image_size is not None else base["image_size"]
        patch = base["patch_size"]
        if isinstance(size, (list, tuple)) or size % patch:
            raise ConfigError(f"finetune.image_size={size} is not divisible by the patch size {patch}: use a "
                              f"multiple of {patch}, e.g. {patch * max(1, round(_side(size) / patch))}")
        self.image_size = int(size)
        self.num_classes = self.data_cfg.num_classes or data_lib.dataset_info(self.data_cfg).num_classes
        self.model_cfg = dict(base, image_size=self.image_size, drop_path=self.ft.drop_path)
        self.model = build_vit(self.model_cfg, num_classes=self.num_classes)
        self.is_trainable = get_mode(self.ft.mode)

    # ----------------------------------------------------------------------------------------- pieces
    def init_variables(self) -> tuple[dict, dict]:
        """(params, batch_stats) to start from: the run's weights fitted to this classifier, or a fresh init."""
        shape = (1, self.image_size, self.image_size, self.model.channels)
        init = jax.jit(self.model.init)(jax.random.key(self.seed), jnp.zeros(shape))
        params, stats = init["params"], init.get("batch_stats", {})
        if self.trained is None:
            return params, stats
        where = str(self.trained.run_dir)
        src = self.source_image_size
        old = (src // self.model.patch_size,) * 2 if not isinstance(src, (list, tuple)) else \
            tuple(s // self.model.patch_size for s in src)
        params = load_into(params, self.trained.params, old_grid=old, new_grid=self.model.grid_size, where=where,
                           keep_head=self.trained.stage == "finetune")
        stats = load_batch_stats(stats, self.trained.batch_stats, where) if stats else {}
        return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, stats)

    def loss_fn(self, params, batch_stats, batch, rng, consts):
        del consts
        k_mix, k_drop, k_emb = jax.random.split(rng, 3)
        targets = smooth_one_hot(batch["label"], self.num_classes, self.ft.label_smoothing)
        images, targets = mix_batch(k_mix, batch["image"], targets, mixup_alpha=self.ft.mixup_alpha,
                                    cutmix_alpha=self.ft.cutmix_alpha, mix_prob=self.ft.mix_prob,
                                    switch_prob=self.ft.switch_prob)
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits, updates = self.model.apply(variables, images, train=True, mutable=["batch_stats"],
                                           rngs={"dropout": k_drop, "emb_dropout": k_emb})
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = (jnp.argmax(logits, -1) == batch["label"]).mean()  # against the unmixed labels
        return loss, ({"accuracy": accuracy}, updates.get("batch_stats", batch_stats))

    def build(self, total_steps: int, mesh=None, variables: Optional[tuple[Any, Any]] = None):
        """(state, jitted train step, schedule): the state replicated over `mesh`, parameters split by mode.
        `variables`: (params, batch_stats) to start from instead of `init_variables()`."""
        mesh = mesh or make_mesh()
        rep = replicated(mesh)
        params, stats = variables if variables is not None else self.init_variables()
        trainable, frozen = partition(params, self.is_trainable)
        optimizer, schedule = optim.make_optimizer(self.cfg["optim"], trainable, total_steps=total_steps,
                                                   depth=self.model.depth)
        state = jax.jit(lambda t, f, s: TrainState.create(t, f, s, optimizer), out_shardings=rep)(
            trainable, frozen, stats)
        step_fn = make_train_step(self.loss_fn, optimizer, seed=self.seed, accum_steps=self.accum,
                                  schedule=schedule)
        train_step = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(rep, rep))
        return state, train_step, schedule

    def abstract_batch(self, mesh) -> dict:
        sh = batch_sharding(mesh)
        s = self.image_size
        return {"image": jax.ShapeDtypeStruct((self.batch_size, s, s, self.model.channels), jnp.float32, sharding=sh),
                "label": jax.ShapeDtypeStruct((self.batch_size,), jnp.int32, sharding=sh)}

    def meta(self) -> dict:
        return {"stage": "finetune", "model": self.model_cfg, "num_classes": self.num_classes,
                "mode": self.ft.mode,
                "source_run": str(self.trained.run_dir) if self.trained else None,
                "source_step": self.trained.step if self.trained else None, "config": to_dict(self.cfg)}

    # ----------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        from sslvit.checkpoint import Checkpointer  # noqa: PLC0415
        from sslvit.metrics import MetricWriter  # noqa: PLC0415

        cfg = self.cfg
        info = data_lib.dataset_info(self.data_cfg)  # a missing dataset fails here, before any compile
        if info.num_classes != self.num_classes:
            raise ConfigError(f"data.num_classes={self.num_classes} but {info.name} has {info.num_classes} classes")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpointer(self.run_dir / "checkpoints", max_to_keep=int(cfg.get("keep_checkpoints", 2)))
        resume = bool(cfg.get("resume", False))
        if not resume and ckpt.latest_step() is not None:
            ckpt.close()
            raise ConfigError(f"{self.run_dir} already holds checkpoints: pass resume=true to continue that run, "
                              f"or choose another hydra.run.dir")
        mesh = make_mesh()
        rep = replicated(mesh)
        total = int(cfg["steps"])
        state, train_step, schedule = self.build(total, mesh)
        start = 0
        if resume and ckpt.latest_step() is not None:
            state, _ = ckpt.restore(None, target=state)
            state = jax.device_put(state, rep)
            start = int(jax.device_get(state.step))
            log.info("resumed from step %d in %s", start, ckpt.directory)

        t0 = time.perf_counter()
        compiled = train_step.lower(state, self.abstract_batch(mesh), None).compile()
        compile_s = time.perf_counter() - t0
        memory = memory_report(compiled)
        n_train, n_frozen = count_params(state.params), count_params(state.frozen)
        log.info("fine-tuning (%s) %s of %s params trainable; step peak memory %s MiB; compile %.1fs; from %s",
                 self.ft.mode, f"{n_train:,}", f"{n_train + n_frozen:,}",
                 f"{memory.get('peak', 0) / 2**20:.1f}" if memory else "?", compile_s,
                 f"{self.trained.run_dir} step {self.trained.step}" if self.trained else "scratch")

        local = self.batch_size // jax.process_count()
        host = data_lib.make_train_iterator(self.data_cfg, batch_size=local, image_size=self.image_size,
                                            seed=self.seed, start_step=start, crop_scale=self.ft.crop_scale)
        batches = prefetch_to_device(({"image": b["image"], "label": b["label"]} for b in host), batch_sharding(mesh))
        writer = MetricWriter(self.run_dir, enabled=jax.process_index() == 0, resume_step=start)
        t0 = time.perf_counter()
        try:
            state, last = fit(state=state, step_fn=compiled, batches=batches, total_steps=total, checkpointer=ckpt,
                              writer=writer, log_every=int(cfg["log_every"]), ckpt_every=int(cfg["ckpt_every"]),
                              images_per_step=self.batch_size, meta=self.meta(),
                              max_nonfinite_streak=int(cfg.get("max_nonfinite_streak", 20)),
                              progress=bool(cfg.get("progress", True)), desc=f"finetune {self.ft.mode}")
        finally:
            writer.close()
            ckpt.close()
        train_s = time.perf_counter() - t0
        ips = last.get("images_per_sec")
        results = {
            "stage": "finetune", "run_dir": str(self.run_dir), "mode": self.ft.mode,
            "source_run": str(self.trained.run_dir) if self.trained else None,
            "source_step": self.trained.step if self.trained else None,
            "source_image_size": self.source_image_size, "image_size": self.image_size,
            "steps": total, "batch_size": self.batch_size, "dataset": info.name, "num_classes": self.num_classes,
            "trainable_params": n_train, "total_params": n_train + n_frozen,
            "peak_memory_bytes": memory.get("peak"), "memory": memory, "compile_seconds": round(compile_s, 2),
            "step_time_s": (self.batch_size / ips) if ips else None, "images_per_sec": ips,
            "train_seconds": round(train_s, 2), "train_loss": last.get("loss"),
            "train_accuracy": last.get("accuracy"), "nonfinite_steps": last.get("nonfinite_steps"),
        }
        results.update(self.evaluate(state, mesh))
        results["model"] = self.model_cfg
        if jax.process_index() == 0:
            (self.run_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        return results

    def evaluate(self, state, mesh) -> dict:
        """Top-1 on the test split (every example once; padding rows masked out)."""
        if self.eval_batches == 0:
            return {}
        rep, data_sh = replicated(mesh), batch_sharding(mesh)
        local = self.batch_size // jax.process_count()
        it = data_lib.make_eval_iterator(self.data_cfg, batch_size=local, image_size=self.image_size)

        def count(params, stats, batch):
            variables = {"params": params, **({"batch_stats": stats} if stats else {})}
            logits = self.model.apply(variables, batch["image"], train=False)
            hit = (jnp.argmax(logits, -1) == batch["label"]) & batch["valid"]
            return hit.sum(), batch["valid"].sum()

        step = jax.jit(count, out_shardings=(rep, rep))
        params = state.all_params()
        correct = seen = 0
        for i, batch in enumerate(it):
            if self.eval_batches is not None and i >= self.eval_batches:
                break
            c, n = jax.device_get(step(params, state.batch_stats, to_global(batch, data_sh)))
            correct, seen = correct + int(c), seen + int(n)
        return {"test_top1": correct / max(seen, 1), "test_examples": seen}


def finetune(cfg: Mapping, run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> dict:
    return Finetuning(cfg, run_dir, overrides).run()
