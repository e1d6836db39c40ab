"""timm's parallel ViTs as a peer: the supervised train step a timm user runs (cross-entropy, AdamW), in PyTorch,
on the same shapes as this project's presets. Used by bench/finetune_vs_timm.py (CPU, side by side with the
fine-tuning step) and bench/gpu_bench.py (GPU: bf16 autocast, torch.compile).

Only imported where torch and timm are installed; nothing here imports JAX.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin while JAX runs (CPU)

import torch


def timm_vit(model_cfg: dict, num_classes: int, *, plain: bool = False, timm_name: str | None = None):
    """A timm VisionTransformer with ParallelThingsBlock of a model config's shape (conf/model/*.yaml keys): same
    width, depth, heads, MLP width, branches, patch and image size, class token, qkv bias. `plain`: no drop path
    and no LayerScale (timm's defaults); otherwise the config's drop path and LayerScale. `timm_name` builds that
    registered timm model instead (e.g. vit_base_patch16_18x2_224, which has LayerScale), with the drop path of
    the config unless `plain`."""
    import timm
    from timm.models.vision_transformer import Block, ParallelThingsBlock, VisionTransformer

    drop_path = 0.0 if plain else float(model_cfg.get("drop_path") or 0.0)
    if timm_name:
        return timm.create_model(timm_name, num_classes=num_classes, drop_path_rate=drop_path)
    p = int(model_cfg["num_parallel_branches"])
    block = Block if p == 1 else ParallelThingsBlock
    block_kw = {} if p == 1 else {"num_parallel": p}

    def block_fn(*args, **kw):
        return block(*args, **kw, **block_kw)

    return VisionTransformer(
        img_size=model_cfg["image_size"],
        patch_size=model_cfg["patch_size"],
        embed_dim=model_cfg["dim"],
        depth=model_cfg["depth"],
        num_heads=model_cfg["heads"],
        mlp_ratio=model_cfg["mlp_dim"] / model_cfg["dim"],
        num_classes=num_classes,
        qkv_bias=True,
        drop_path_rate=drop_path,
        init_values=None if plain else model_cfg.get("layer_scale_init"),
        block_fn=block_fn,
    )


class TorchStep:
    """One supervised train step of `model` on a fixed synthetic batch: forward, cross-entropy, backward, AdamW.
    `run()` blocks until the step is done. `compile`: torch.compile the model; `dtype="bfloat16"`: autocast."""

    def __init__(
        self,
        model,
        batch: int,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        compile: bool = False,
        image_size: int = 32,
        num_classes: int = 10,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, image_size, image_size, generator=g).to(self.device)
        self.y = (torch.arange(batch) % num_classes).to(self.device)
        self.autocast = dtype == "bfloat16"
        self.fwd = torch.compile(self.model) if compile else self.model
        self.compile_s = None

    def _step(self):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = torch.nn.functional.cross_entropy(self.fwd(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def run(self):
        if self.compile_s is None:  # the first call compiles (torch.compile) / warms up
            t0 = time.perf_counter()
            self._step()
            self._sync()
            self.compile_s = time.perf_counter() - t0
        self._step()
        self._sync()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def peak_memory(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None


def torch_matmul(dtype: str, n: int, device: str = "cuda"):
    """A blocking n³ matmul of random operands in torch and its FLOPs (float32 with TF32 allowed, as XLA's
    default precision on GPU)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dt, generator=g)
    b = torch.randn(n, n, device=device, dtype=dt, generator=g)

    def fn():
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()

    return fn, 2 * n**3
