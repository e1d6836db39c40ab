"""Shared pieces of the benchmarks: the stages' own configs composed from conf/ (a benchmark measures the shipped
configs) and their train steps built by the stages themselves (`Pretraining.build`, `Finetuning.build`: the same
loss, rng streams, optimiser and donation as a run) on synthetic data; timing, the matmul peak.

Run the scripts from the repository root (`python bench/throughput.py`); the package is installed (`pip install
-e .`), or on a bare GPU host `PYTHONPATH=.` (bench/gpu_check.sh sets it). Importing this module applies the
scripts' host-allocator setting (sslvit/runtime.py) before JAX starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from sslvit.runtime import keep_host_memory

HOST_MALLOC = "kept (sslvit/runtime.py)" if keep_host_memory() else "glibc default"  # as the scripts, before JAX

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf

from sslvit.flops import train_flops
from sslvit.models.build import build_vit, from_flat

CONF = Path(__file__).resolve().parents[1] / "conf"

# Benchmark preset -> conf/model/<name>.yaml. "cifar" is the CIFAR-size preset (32 px, patch 4, dim 192,
# 6 layers x 2 branches); the ViT-S pair has equal parameters and FLOPs.
PRESETS = {
    "cifar": "tiny",
    "cifar_seq": "tiny_seq",
    "vit_s18x2": "small",
    "vit_s36x1": "small_seq",
    "vit_b18x2": "base",
}
OPTIM = dict(lr=1e-3, min_lr=0.0, warmup_steps=10, weight_decay=0.05, clip_grad_norm=3.0, accum_steps=1)


def load_yaml(group: str, option: str) -> dict:
    """conf/<group>/<option>.yaml with its own `defaults` (another file of the group) merged in, as Hydra does."""
    cfg = OmegaConf.load(CONF / group / f"{option}.yaml")
    bases = [d for d in cfg.pop("defaults", []) if d != "_self_"]
    merged = OmegaConf.merge(*[OmegaConf.create(load_yaml(group, b)) for b in bases], cfg)
    return OmegaConf.to_container(merged, resolve=True)


def load_model_yaml(name: str) -> dict:
    return load_yaml("model", name)


def compose(script: str, groups: Mapping[str, Any] = (), **keys: Any) -> DictConfig:
    """conf/<script>.yaml composed as Hydra composes it, with plain OmegaConf (the benchmarks also run where Hydra
    is not installed, e.g. a bare GPU image): each group of the defaults list from its YAML (`groups` may name
    another option or give the group's dict), then the script's own keys, then `keys` (dotted names allowed)."""
    groups = dict(groups)
    primary = OmegaConf.load(CONF / f"{script}.yaml")
    defaults = primary.pop("defaults", [])
    primary.pop("hydra", None)
    cfg = OmegaConf.create({})
    for entry in defaults:
        if entry == "_self_":
            cfg = OmegaConf.merge(cfg, primary)
            continue
        ((name, option),) = dict(entry).items()
        group = name.removeprefix("optional ").split("@")[0].strip()
        choice = groups.pop(group, option)
        if choice is None or group in ("hydra", "experiment") or group.startswith("override "):
            continue
        value = dict(choice) if isinstance(choice, Mapping) else load_yaml(group, choice)
        OmegaConf.update(cfg, group.replace("/", "."), value, merge=False, force_add=True)
    for group, value in groups.items():  # groups the defaults list leaves out
        OmegaConf.update(cfg, group.replace("/", "."), dict(value), merge=False, force_add=True)
    for k, v in keys.items():
        OmegaConf.update(cfg, k, v, merge=True, force_add=True)
    return cfg


def model_preset(preset: str | dict, *, stem: str = "hmlp", stem_norm: str = "batch", **overrides) -> dict:
    """The model config of a benchmark preset (a PRESETS key) or an explicit model dict, with a stem and overrides
    (e.g. dtype="bfloat16", remat=True, unroll_layers=False), as one flat dict (`from_flat` splits it)."""
    cfg = dict(preset) if isinstance(preset, dict) else load_model_yaml(PRESETS[preset])
    cfg.update(stem=stem, stem_norm=stem_norm)
    cfg.update(overrides)
    return cfg


def parse_overrides(items) -> dict:
    """["unroll_layers=false", "depth=12"] -> {"unroll_layers": False, "depth": 12} (values parsed as YAML)."""
    import yaml

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
        self.step, self.state, self.batch, self.consts, self.flops, self.model = (
            step,
            state,
            batch,
            consts,
            flops,
            model,
        )
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


def pretrain_step(
    preset: str | dict,
    batch: int,
    *,
    dtype: str = "float32",
    accum_steps: int = 1,
    vocab: int = 512,
    stem: str = "hmlp",
    device_data=None,
    **model_overrides,
) -> Step:
    """The pretraining stage's own step (`Pretraining.build`): block masking at 0.4, the k-means target (a random
    `vocab`-code codebook; tokens assigned on device in the step), AdamW, donated state; hMLP stem by default.
    `device_data` (sslvit.data.ondevice.DeviceData): the in-memory path, as the stage builds it for
    data.source=arrays: the batch is example indices, the images are gathered and augmented inside the step."""
    from sslvit.pretraining import Pretraining
    from sslvit.train import make_mesh

    enc = from_flat(model_preset(preset, stem=stem, dtype=dtype, **model_overrides))
    cfg = compose(
        "pretrain",
        {"model": enc["model"], "stem": enc["stem"]},
        batch_size=batch,
        mask_ratio=0.4,
        optim=dict(OPTIM, accum_steps=accum_steps),
        **{"target.vocab_size": vocab},
    )
    stage = Pretraining(cfg, None)
    stage.device_data = device_data
    consts = {
        "codebook": jax.random.normal(jax.random.key(1), (vocab, stage.target.patch_dim)),
        "counts": jnp.ones((vocab,), jnp.int32),
    }
    state, step = stage.build(make_mesh(), 1000)
    size = stage.image_size
    images = jax.random.normal(jax.random.key(0), (batch, size, size, stage.encoder.channels))
    mask = jnp.asarray(stage.sampler(np.random.default_rng(0), batch))
    e = stage.encoder
    # Model FLOPs (analytic: XLA's cost analysis counts a scanned layer once) + the tokenizer's assignment matmul.
    flops = batch * (train_flops(e, head_outputs_per_patch=vocab) + 2 * e.num_patches * stage.target.patch_dim * vocab)
    inputs = {"image": images, "mask": mask}
    if device_data is not None:  # consts and batch as TrainingStage.execute makes them for the device path
        consts = jax.device_put(device_data.consts(consts))
        inputs = {"index": jnp.asarray(next(device_data.index_batches(0))["index"]), "mask": mask}
    return Step(step, state, inputs, consts, flops, e)


def finetune_step(
    preset: str | dict, batch: int, *, dtype: str = "float32", mode: str = "full", **model_overrides
) -> Step:
    """The fine-tuning stage's own step (`Finetuning.build`, from scratch): 10 classes, layer decay 0.65, label
    smoothing, `mode` freezes the rest; the model's drop_path (default the preset's) as finetune.drop_path."""
    from sslvit.finetune import Finetuning
    from sslvit.train import make_mesh

    enc = from_flat(model_preset(preset, stem="linear", dtype=dtype, **model_overrides))
    cfg = compose(
        "finetune",
        {"model": enc["model"], "stem": enc["stem"], "finetune/mode": mode},
        run=None,
        batch_size=batch,
        optim=dict(OPTIM, layer_decay=0.65),
        **{"finetune.drop_path": enc["model"].get("drop_path", 0.0)},
    )
    stage = Finetuning(cfg, None)
    state, step = stage.build(make_mesh(), 1000)
    size = stage.image_size
    images = jax.random.normal(jax.random.key(0), (batch, size, size, stage.model.channels))
    labels = jnp.arange(batch, dtype=jnp.int32) % stage.num_classes
    flops = batch * train_flops(stage.model)  # the 3x-forward convention, also for frozen-weight modes
    return Step(step, state, {"image": images, "label": labels}, None, flops, stage.model)


def inference_forward(preset: str | dict, batch: int, *, dtype: str = "float32", **model_overrides):
    """A blocking call of the compiled inference forward pass (1000 classes, linear stem, random weights), its
    model FLOPs and compile seconds; warmed up once."""
    from sslvit.flops import forward_flops

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
    return (
        f"device: {jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}, host malloc {HOST_MALLOC}"
    )
