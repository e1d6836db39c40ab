"""Shared pieces of the benchmarks: model presets read from conf/model (a benchmark measures the shipped configs),
the pretraining and fine-tuning steps built as the stages build them (synthetic data), timing, the matmul peak.

Importing this module applies the scripts' host-allocator setting (sslvit/runtime.py) before JAX starts.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sslvit.runtime import keep_host_memory  # noqa: E402

HOST_MALLOC = "kept (sslvit/runtime.py)" if keep_host_memory() else "glibc default"  # as the scripts, before JAX

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from sslvit import masking, optim, targets  # noqa: E402
from sslvit.models.build import build_vit, from_flat  # noqa: E402
from sslvit.flops import train_flops  # noqa: E402
from sslvit.models.mim import MaskedImageModel  # noqa: E402
from sslvit.train import TrainState, make_train_step  # noqa: E402

# Benchmark preset -> conf/model/<name>.yaml. "cifar" is the CIFAR-size preset (32 px, patch 4, dim 192,
# 6 layers x 2 branches); the ViT-S pair has equal parameters and FLOPs.
PRESETS = {"cifar": "tiny", "cifar_seq": "tiny_seq", "vit_s18x2": "small", "vit_s36x1": "small_seq",
           "vit_b18x2": "base"}
OPTIM = dict(lr=1e-3, min_lr=0.0, warmup_steps=10, weight_decay=0.05, clip_grad_norm=3.0, accum_steps=1)


def load_model_yaml(name: str) -> dict:
    """conf/model/<name>.yaml with its `defaults` (another model file) merged in, as Hydra composes it. Plain
    OmegaConf: the benchmarks also run where Hydra isn't installed (a bare GPU image)."""
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    bases = [d for d in cfg.pop("defaults", []) if d != "_self_"]
    merged = OmegaConf.merge(*[OmegaConf.create(load_model_yaml(b)) for b in bases], cfg)
    return OmegaConf.to_container(merged, resolve=True)


def model_preset(preset: str | dict, *, stem: str = "hmlp", stem_norm: str = "batch", **overrides) -> dict:
    """The model config of a benchmark preset (a PRESETS key) or an explicit model dict, with a stem and overrides
    (e.g. dtype="bfloat16", remat=True, unroll_layers=False)."""
    cfg = dict(preset) if isinstance(preset, dict) else load_model_yaml(PRESETS[preset])
    cfg.update(stem=stem, stem_norm=stem_norm)
    cfg.update(overrides)
    return cfg


def parse_overrides(items) -> dict:
    """["unroll_layers=false", "depth=12"] -> {"unroll_layers": False, "depth": 12} (values parsed as YAML)."""
    import yaml  # noqa: PLC0415  (omegaconf's dependency)

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def timeit(fn, *, min_time: float = 3.0, min_iters: int = 5, warmup: int = 2) -> float:
    """Median seconds per call of `fn` (which must block), after `warmup` calls (the first call of a compiled step
    also pays for first-touching its memory). The median, not the mean: robust to a stray slow call on a shared
    machine."""
    for _ in range(warmup):
        fn()
    times, t0 = [], time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - t0 < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def timed(fn, reps: int) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) of each of `reps` calls of `fn` (which must block)."""
    out = []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - w0, time.process_time() - c0))
    return out


def peak_matmul(dtype, n: int | None = None):
    """A blocking call of a large square matmul on the default device and its FLOPs: the achievable peak MFU is
    measured against. Random operands (zeros or ones run faster on GPUs)."""
    n = n or (8192 if jax.default_backend() == "gpu" else 2048)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    return (lambda: f(a, b).block_until_ready()), 2 * n**3


def matmul_peak(dtype, n: int | None = None) -> float:
    """FLOP/s of `peak_matmul`."""
    fn, flops = peak_matmul(dtype, n)
    return flops / timeit(fn, min_time=2.0)


class Step:
    """A jitted train step, its arguments and its model FLOPs; `compile()` then `run()` (one blocking step)."""

    def __init__(self, step, state, batch, consts, flops: float, model):
        self.step, self.state, self.batch, self.consts, self.flops, self.model = step, state, batch, consts, flops, model
        self.compiled, self.compile_s = None, None

    def compile(self):
        t0 = time.perf_counter()
        self.compiled = self.step.lower(self.state, self.batch, self.consts).compile()
        self.compile_s = time.perf_counter() - t0
        return self.compiled

    def run(self) -> dict:
        if self.compiled is None:
            self.compile()
        self.state, metrics = self.compiled(self.state, self.batch, self.consts)
        metrics["loss"].block_until_ready()
        return metrics


def pretrain_step(preset: str | dict, batch: int, *, dtype: str = "float32", accum_steps: int = 1, vocab: int = 512,
                  stem: str = "hmlp", device_data=None, **model_overrides) -> Step:
    """The pretraining step as `sslvit.pretraining` builds it: hMLP stem with BatchNorm, block masking at 0.4, the
    k-means target (a random `vocab`-code codebook; tokens assigned on device in the step), AdamW, donated state.
    `device_data` (sslvit.data.ondevice.DeviceData): the in-memory path, as the stage builds it for
    data.source=arrays: the batch is example indices, the images are gathered and augmented inside the step."""
    enc = build_vit(from_flat(model_preset(preset, stem=stem, dtype=dtype, **model_overrides)), num_classes=0,
                    use_mask_token=True)
    target = targets.make_target("kmeans", patch_size=enc.patch_size, vocab_size=vocab)
    model = MaskedImageModel(enc, target.num_outputs)
    size = enc.grid_size[0] * enc.patch_size
    sampler = masking.make_mask_sampler("block", enc.grid_size, 0.4)
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    mask = jnp.asarray(sampler(np.random.default_rng(0), batch))
    consts = {"codebook": jax.random.normal(jax.random.key(1), (vocab, target.patch_dim)),
              "counts": jnp.ones((vocab,), jnp.int32)}
    variables = jax.jit(model.init)(jax.random.key(0), images[:1], mask[:1])
    opt, _ = optim.make_optimizer(OmegaConf.create(dict(OPTIM, accum_steps=accum_steps)), variables["params"],
                                  total_steps=1000)
    state = TrainState.create(variables["params"], {}, variables.get("batch_stats", {}), opt)

    def loss_fn(params, batch_stats, b, rng, c):
        tokens = target.compute(c, b["image"])
        v = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
        preds, upd = model.apply(v, b["image"], b["mask"], train=True, mutable=["batch_stats"],
                                 rngs={"dropout": rng, "emb_dropout": rng})
        loss, metrics = target.loss(preds, tokens, b["mask"])
        return loss, (metrics, upd.get("batch_stats", batch_stats))

    inputs = {"image": images, "mask": mask}
    if device_data is not None:  # consts and batch as TrainingStage.execute makes them for the device path
        loss_fn = device_data.wrap_loss(loss_fn)
        consts = jax.device_put(device_data.consts(consts))
        inputs = {"index": jnp.asarray(next(device_data.index_batches(0))["index"]), "mask": mask}
    step = jax.jit(make_train_step(loss_fn, opt, seed=0, accum_steps=accum_steps), donate_argnums=(0,))
    # Model FLOPs (analytic: XLA's cost analysis counts a scanned layer once) + the tokenizer's assignment matmul.
    flops = batch * (train_flops(enc, head_outputs_per_patch=vocab) + 2 * enc.num_patches * target.patch_dim * vocab)
    return Step(step, state, inputs, consts, flops, enc)


def finetune_step(preset: str | dict, batch: int, *, dtype: str = "float32", mode: str = "full",
                  **model_overrides) -> Step:
    """The fine-tuning step as `sslvit.finetune` builds it (10 classes, layer decay 0.65, `mode` freezes the rest)."""
    from sslvit.finetune_modes import make_mode, partition  # noqa: PLC0415

    model = build_vit(from_flat(model_preset(preset, stem="linear", dtype=dtype, **model_overrides)), num_classes=10)
    size = model.grid_size[0] * model.patch_size
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    labels = jnp.arange(batch) % 10
    params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
    trainable, frozen = partition(params, make_mode(mode))
    opt, _ = optim.make_optimizer(OmegaConf.create(dict(OPTIM, layer_decay=0.65)), trainable, total_steps=1000,
                                  depth=model.depth)
    state = TrainState.create(trainable, frozen, {}, opt)

    def loss_fn(p, bs, b, rng, consts):
        logits = model.apply({"params": p}, b["image"], train=True, rngs={"dropout": rng, "emb_dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean(), ({}, bs)

    step = jax.jit(make_train_step(loss_fn, opt, seed=0), donate_argnums=(0,))
    flops = batch * train_flops(model)  # the 3x-forward convention, also for frozen-weight modes
    return Step(step, state, {"image": images, "label": labels}, None, flops, model)


def inference_forward(preset: str | dict, batch: int, *, dtype: str = "float32", **model_overrides):
    """A blocking call of the compiled inference forward pass (1000 classes, linear stem, random weights), its
    model FLOPs and compile seconds; warmed up once."""
    from sslvit.flops import forward_flops  # noqa: PLC0415

    model = build_vit(from_flat(model_preset(preset, stem="linear", dtype=dtype, **model_overrides)), num_classes=1000)
    size = model.grid_size[0] * model.patch_size
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    params = jax.jit(model.init)(jax.random.key(0), x[:1])
    t0 = time.perf_counter()
    f = jax.jit(model.apply).lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    f(params, x).block_until_ready()
    return (lambda: f(params, x).block_until_ready()), batch * forward_flops(model), compile_s


def device_line() -> str:
    return (f"device: {jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()}), "
            f"{os.cpu_count()} CPU cores, jax {jax.__version__}, host malloc {HOST_MALLOC}")
