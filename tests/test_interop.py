"""Weights in and out (sslvit/interop.py), proven against timm's own forward pass.

Random-weight timm models converted to sslvit give timm's logits and per-layer features (float32, eval mode), and
random sslvit weights exported to timm give sslvit's: P = 1 and 2, with and without LayerScale, cls and mean pooling,
at the same and at a changed resolution (timm's own checkpoint loader resizing on its side); the hMLP stem against a
PyTorch module written to DeiT's `hMLP_stem` definition, BatchNorm running statistics included; files; one-line
errors; fine-tuning and the linear probe started from a file; `export_timm.py` on a real pretraining run.
Tests that need torch and timm skip without them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest

from sslvit.errors import ConfigError
from sslvit.interop import (
    bicubic_matrix,
    canonical_keys,
    export_run,
    load_state_dict,
    resize_pos_embedding_timm,
    save_safetensors,
    timm_kwargs,
    timm_snippet,
    timm_to_variables,
    variables_to_timm,
)
from sslvit.models import ViT

REPO = Path(__file__).resolve().parents[1]
DIM, DEPTH, HEADS, MLP = 32, 2, 2, 64


def assert_same(actual, desired, tol=1e-5):
    """Equal to `tol` of the compared tensor's scale: |actual - desired| <= tol * max(1, max |desired|) everywhere
    (float32 sums of random weights reach values ~10, where one rounding step of a 32-term dot product is ~1e-6)."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=0, atol=tol * max(1.0, float(np.abs(desired).max())))


def needs_timm():
    """Skip without torch and timm. timm imports torchvision, which imports torch._dynamo, which loads triton when
    it is installed (CUDA builds of torch); triton's LLVM and TensorFlow's, both in one process (the data pipeline of
    the stage tests), crash it. These CPU tests need no triton: it is hidden from torch when TensorFlow is loaded."""
    if "tensorflow" in sys.modules and "triton" not in sys.modules:
        sys.modules["triton"] = None  # `import triton` raises ImportError: torch then runs without it
    pytest.importorskip("torch")
    pytest.importorskip("timm")


def sslvit_model(P=2, ls=None, pool="cls", stem="linear", patch=4, size=16, classes=5, **kw) -> ViT:
    kw = {"dim": DIM, "depth": DEPTH, "heads": HEADS, "mlp_dim": MLP, **kw}
    return ViT(
        image_size=size,
        patch_size=patch,
        num_classes=classes,
        num_parallel_branches=P,
        layer_scale_init=ls,
        pool=pool,
        stem=stem,
        **kw,
    )


def timm_model(P=2, ls=None, pool="cls", patch=4, size=16, classes=5, **kw):
    from timm.models.vision_transformer import ParallelThingsBlock, VisionTransformer

    if P > 1:
        kw["block_fn"] = partial(ParallelThingsBlock, num_parallel=P)
    return VisionTransformer(
        img_size=size,
        patch_size=patch,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=MLP / DIM,
        num_classes=classes,
        init_values=ls,
        global_pool="token" if pool == "cls" else "avg",
        fc_norm=False,
        **kw,
    ).eval()


def randomize_torch(module, seed=0):
    """Every parameter and BatchNorm statistic random (not timm's ones/zeros init), so that every mapping counts."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            noise = torch.randn(t.shape, generator=g)
            t.copy_(0.5 + noise.abs() if name.endswith("running_var") else t + 0.3 * noise)
    return module


def random_variables(model: ViT, seed=0) -> dict:
    """Random sslvit variables of the model's shapes (numpy; scales around 1, BatchNorm variances positive)."""
    rng = np.random.default_rng(seed)
    h, w = (g * model.patch_size for g in model.grid_size)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, h, w, model.channels), np.float32))

    def draw(path, s):
        name = str(path[-1])
        x = 0.3 * rng.normal(size=s.shape).astype(np.float32)
        return np.abs(x) + 0.5 if "var" in name else x + np.float32("scale" in name)

    return jax.tree_util.tree_map_with_path(draw, dict(shapes))


def images(n=2, size=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def timm_forward(tm, x):
    """(logits, per-layer tokens (depth, B, 1+N, D)) of a timm ViT on NHWC images."""
    import torch

    layers = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: layers.append(out.numpy())) for b in tm.blocks]
    with torch.no_grad():
        out = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    for h in hooks:
        h.remove()
    return out, np.stack(layers)


_FORWARDS: dict = {}


def sslvit_forward(model, variables, x):
    """(logits, per-layer tokens) of an sslvit model: one compiled forward per model, reused across calls."""
    if model not in _FORWARDS:
        _FORWARDS[model] = jax.jit(lambda v, x: model.apply(v, x, return_features=True))
    out, feats = _FORWARDS[model](variables, x)
    return np.asarray(out), np.asarray(feats["layers"])


def state_dict(tm) -> dict:
    return {k: v.numpy() for k, v in tm.state_dict().items()}


def load_torch(tm, tensors):
    import torch

    tm.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}, strict=True)
    return tm


def deit_hmlp_stem(img_size, patch_size, in_chans, embed_dim, **_):
    """A PyTorch module written to DeiT's `hMLP_stem` definition (models_v2.py): `proj = Sequential(Conv2d(C, D/4,
    4, 4), BN, GELU, Conv2d(D/4, D/4, 2, 2), BN, GELU, Conv2d(D/4, D, 2, 2), BN)` for patch 16; for patch 4 the
    stages 2·2 (`Conv2d(C, D/4, 2, 2), BN, GELU, Conv2d(D/4, D, 2, 2), BN`). Plugged into timm as `embed_layer`."""
    from torch import nn

    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_patches = (img_size // patch_size) ** 2
            d, q = embed_dim, embed_dim // 4
            if patch_size == 16:
                self.proj = nn.Sequential(
                    nn.Conv2d(in_chans, q, 4, 4),
                    nn.BatchNorm2d(q),
                    nn.GELU(),
                    nn.Conv2d(q, q, 2, 2),
                    nn.BatchNorm2d(q),
                    nn.GELU(),
                    nn.Conv2d(q, d, 2, 2),
                    nn.BatchNorm2d(d),
                )
            else:
                assert patch_size == 4
                self.proj = nn.Sequential(
                    nn.Conv2d(in_chans, q, 2, 2), nn.BatchNorm2d(q), nn.GELU(), nn.Conv2d(q, d, 2, 2), nn.BatchNorm2d(d)
                )

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    return Stem()


# ------------------------------------------------------------------------------------------ resizing
@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_resize_equals_pytorch_and_timm(antialias):
    needs_timm()
    import torch
    import torch.nn.functional as F
    from timm.layers import resample_abs_pos_embed

    rng = np.random.default_rng(0)
    for old, new in [
        ((8, 8), (12, 12)),
        ((8, 8), (4, 4)),
        ((7, 7), (3, 5)),
        ((4, 6), (9, 5)),
        ((14, 14), (24, 24)),
        ((3, 3), (1, 1)),
        ((16, 16), (7, 7)),
    ]:
        pe = rng.normal(size=(1, 1 + old[0] * old[1], 16)).astype(np.float32)
        out = resize_pos_embedding_timm(pe, new, old, num_extra_tokens=1, antialias=antialias)
        ref = resample_abs_pos_embed(
            torch.from_numpy(pe), list(new), list(old), num_prefix_tokens=1, antialias=antialias
        ).numpy()
        assert_same(out, ref)
        grid = torch.from_numpy(pe[:, 1:].reshape(1, *old, 16)).permute(0, 3, 1, 2)
        direct = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=antialias)
        assert_same(out[:, 1:], direct.permute(0, 2, 3, 1).reshape(1, -1, 16).numpy())
        np.testing.assert_array_equal(out[:, :1], pe[:, :1])
    # The two kernels differ; the antialiased one (timm's loader) is jax.image.resize's, which sslvit's own
    # resize_pos_embedding uses.
    assert not np.allclose(bicubic_matrix(8, 12, True), bicubic_matrix(8, 12, False), atol=1e-3)
    from sslvit.models import resize_pos_embedding

    pe = rng.normal(size=(1, 64, 16)).astype(np.float32)
    for new in ((12, 12), (3, 5)):
        jax_resized = np.asarray(resize_pos_embedding(pe, new, (8, 8)))
        torch_like = resize_pos_embedding_timm(pe, new, (8, 8), antialias=antialias)
        if antialias:
            assert_same(jax_resized, torch_like)
        else:
            assert np.abs(jax_resized - torch_like).max() > 0.05 * np.abs(pe).max()


# ------------------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("P, ls, pool", [(1, None, "cls"), (1, 0.1, "mean"), (2, 0.1, "cls"), (2, None, "mean")])
def test_timm_and_sslvit_compute_the_same_function_both_ways(P, ls, pool):
    needs_timm()
    x = images()
    # timm -> sslvit: a random-weight timm model, converted.
    tm = randomize_torch(timm_model(P, ls, pool), seed=P)
    model = sslvit_model(P, ls, pool)
    sd = state_dict(tm)
    variables = timm_to_variables(sd, model)
    ref_logits, ref_layers = timm_forward(tm, x)
    logits, layers = sslvit_forward(model, variables, x)
    assert_same(layers, ref_layers)
    assert_same(logits, ref_logits)
    # ... and back: the same tensors, except that the class token's slot is now folded into the class token.
    back = variables_to_timm(variables, model)
    assert back.keys() == sd.keys()
    for k in sd:
        if k not in ("cls_token", "pos_embed"):
            np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    np.testing.assert_array_equal(back["pos_embed"][:, 1:], sd["pos_embed"][:, 1:])
    assert not back["pos_embed"][:, 0].any()
    np.testing.assert_allclose(back["cls_token"], sd["cls_token"] + sd["pos_embed"][:, :1], atol=1e-7)
    assert_same(timm_forward(load_torch(timm_model(P, ls, pool), back), x)[0], ref_logits)

    # sslvit -> timm: random sslvit weights, exported; the round trip is exact.
    variables = random_variables(model, seed=10 + P)
    exported = variables_to_timm(variables, model)
    logits, layers = sslvit_forward(model, variables, x)
    ref_logits, ref_layers = timm_forward(load_torch(timm_model(P, ls, pool), exported), x)
    assert_same(layers, ref_layers)
    assert_same(logits, ref_logits)
    again = timm_to_variables(exported, model)
    jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, variables))


@pytest.mark.parametrize("size, no_embed_class, antialias", [(24, False, True), (8, True, False)])
def test_changed_resolution_is_resized_as_timm_loads_it(size, no_embed_class, antialias):
    """A 16 px (4x4 grid) timm model loaded at 24 px (up) or 8 px (down): timm's own checkpoint loader
    (`checkpoint_filter_fn`, what `create_model(img_size=...)` runs) on one side, the import on the other. The 8 px
    case is DeiT III's layout (position embeddings without a class slot) with `F.interpolate`'s plain bicubic."""
    needs_timm()
    from timm.models.vision_transformer import checkpoint_filter_fn

    kw = dict(no_embed_class=no_embed_class)
    sd = state_dict(randomize_torch(timm_model(2, 0.1, size=16, **kw), seed=3))
    assert sd["pos_embed"].shape[1] == 16 + (not no_embed_class)
    target = timm_model(2, 0.1, size=size, **kw)
    import torch

    target.load_state_dict(
        checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in sd.items()}, target, antialias=antialias)
    )
    model = sslvit_model(2, 0.1, size=size)
    variables = timm_to_variables(sd, model, antialias=antialias)
    x = images(size=size)
    ref_logits, ref_layers = timm_forward(target, x)
    logits, layers = sslvit_forward(model, variables, x)
    assert_same(layers, ref_layers)
    assert_same(logits, ref_logits)
    # The other kernel gives other embeddings: the choice is real.
    other = timm_to_variables(sd, model, antialias=not antialias)
    assert not np.allclose(other["params"]["pos_embedding"], variables["params"]["pos_embedding"], atol=1e-3)


@pytest.mark.parametrize("patch, size", [(16, 32), (4, 16)])
def test_hmlp_stem_equals_deit_hmlp_stem(patch, size):
    """sslvit's hMLP stem with BatchNorm (eval: running statistics) against DeiT's hMLP_stem definition inside
    timm's ViT: patch 16 = DeiT's module exactly (4·2·2), patch 4 its CIFAR form (2·2). Both directions."""
    needs_timm()
    make = partial(timm_model, 2, 0.1, patch=patch, size=size, embed_layer=deit_hmlp_stem)
    tm = randomize_torch(make(), seed=patch)
    model = sslvit_model(2, 0.1, stem="hmlp", patch=patch, size=size)
    sd = state_dict(tm)
    assert [k for k in sd if k.startswith("patch_embed.proj.1.")] == [
        f"patch_embed.proj.1.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    ]
    variables = timm_to_variables(sd, model)
    assert variables["batch_stats"]["stem"]["norm0"]["mean"].shape == (DIM // 4,)
    x = images(size=size)
    ref_logits, ref_layers = timm_forward(tm, x)
    logits, layers = sslvit_forward(model, variables, x)
    assert_same(layers, ref_layers)
    assert_same(logits, ref_logits)

    variables = random_variables(model, seed=patch + 1)
    exported = variables_to_timm(variables, model)
    assert exported.keys() == sd.keys()
    logits, layers = sslvit_forward(model, variables, x)
    ref_logits, ref_layers = timm_forward(load_torch(make(), exported), x)
    assert_same(layers, ref_layers)
    assert_same(logits, ref_logits)


def test_deit_key_names_are_read_as_timm_keys():
    """DeiT's models_v2.py names (two-branch `Layer_scale_init_Block_paralx2`: norm11, attn1, gamma_1_1, ...;
    `Layer_scale_init_Block`: gamma_1/gamma_2) convert to the same variables as timm's names."""
    model = sslvit_model(2, 0.1)
    timm_sd = variables_to_timm(random_variables(model, seed=4), model)
    to_deit = {
        "attns.0.norm": "norm1",
        "attns.1.norm": "norm11",
        "attns.0.attn": "attn",
        "attns.1.attn": "attn1",
        "attns.0.ls.gamma": "gamma_1",
        "attns.1.ls.gamma": "gamma_1_1",
        "ffns.0.norm": "norm2",
        "ffns.1.norm": "norm21",
        "ffns.0.mlp": "mlp",
        "ffns.1.mlp": "mlp1",
        "ffns.0.ls.gamma": "gamma_2",
        "ffns.1.ls.gamma": "gamma_2_1",
    }
    deit_sd = {}
    for k, v in timm_sd.items():
        for a, b in to_deit.items():
            k = k.replace(f".{a}", f".{b}") if k.startswith("blocks.") and f".{a}" in k else k
        deit_sd["module." + k] = v  # DistributedDataParallel prefix, as in DeiT's training checkpoints
    assert "module.blocks.1.gamma_1_1" in deit_sd and "module.blocks.0.attn1.qkv.weight" in deit_sd
    assert canonical_keys(deit_sd).keys() == timm_sd.keys()
    jax.tree.map(np.testing.assert_array_equal, timm_to_variables(deit_sd, model), timm_to_variables(timm_sd, model))

    seq = sslvit_model(1, 0.1)
    seq_sd = variables_to_timm(random_variables(seq, seed=5), seq)
    deit3 = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in seq_sd.items()}
    assert "blocks.0.gamma_1" in deit3
    jax.tree.map(np.testing.assert_array_equal, timm_to_variables(deit3, seq), timm_to_variables(seq_sd, seq))


def test_layer_scale_missing_in_the_file_is_gamma_one():
    """A model with LayerScale takes gamma = 1 from a file without: the same function as the file's model."""
    plain, scaled = sslvit_model(2, None), sslvit_model(2, 0.1)
    v = random_variables(plain, seed=6)
    imported = timm_to_variables(variables_to_timm(v, plain), scaled)
    assert np.all(imported["params"]["layers"]["attn"]["layer_scale"] == 1.0)
    x = images()
    assert_same(sslvit_forward(scaled, imported, x)[0], sslvit_forward(plain, v, x)[0])


# ------------------------------------------------------------------------------------------ files
def test_safetensors_round_trip_and_pth(tmp_path, monkeypatch):
    model = sslvit_model(2, 0.1, stem="hmlp")
    tensors = variables_to_timm(random_variables(model, seed=7), model)
    path = save_safetensors(tensors, tmp_path / "enc.safetensors", {"note": "test"})
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_state_dict(path)
    assert loaded.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(loaded[k], tensors[k])
        assert loaded[k].dtype == tensors[k].dtype
    assert loaded["patch_embed.proj.1.num_batches_tracked"].dtype == np.int64
    with pytest.raises(ConfigError, match=r"must end in \.safetensors"):
        save_safetensors(tensors, tmp_path / "enc.npz")
    with pytest.raises(ConfigError, match=r"unknown file type '\.npz'"):
        (tmp_path / "w.npz").write_bytes(b"0")
        load_state_dict(tmp_path / "w.npz")
    with pytest.raises(ConfigError, match="is not a file"):
        load_state_dict(tmp_path / "missing.safetensors")

    torch = pytest.importorskip("torch")  # the .pth part

    # A DeiT-style training checkpoint: {'model': state dict, 'args': Namespace, ...} with DDP's 'module.' prefix,
    # half precision.
    import argparse

    ckpt = {
        "model": {
            "module." + k: torch.from_numpy(v).half() if v.dtype == np.float32 else torch.from_numpy(v)
            for k, v in tensors.items()
        },
        "epoch": 3,
        "args": argparse.Namespace(lr=1e-3),
    }
    torch.save(ckpt, tmp_path / "deit.pth")
    pth = load_state_dict(tmp_path / "deit.pth")
    assert pth.keys() == tensors.keys() and pth["pos_embed"].dtype == np.float32
    np.testing.assert_allclose(pth["pos_embed"], tensors["pos_embed"], rtol=1e-3, atol=1e-3)
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    with pytest.raises(ConfigError, match=r'deit.pth needs torch: pip install "sslvit\[timm\]"') as err:
        load_state_dict(tmp_path / "deit.pth")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ errors
def _sd(model, seed=0, drop=(), **extra):
    sd = variables_to_timm(random_variables(model, seed), model)
    return {**{k: v for k, v in sd.items() if k not in drop}, **extra}


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: sslvit_model(stem="conv"), r"stem=conv .* has no timm or DeiT counterpart"),
        (lambda: sslvit_model(stem="hmlp", stem_norm="layer"), r"stem.norm=layer: DeiT's hMLP stem uses BatchNorm"),
        (lambda: sslvit_model(dim_head=8), r"model.dim_head=8 .* timm's attention has head_dim = dim // heads"),
    ],
    ids=["conv_stem", "hmlp_layernorm", "dim_head"],
)
def test_options_timm_lacks_are_one_line_errors_on_export(build, match):
    model = build()
    with pytest.raises(ConfigError, match=match) as err:
        variables_to_timm(random_variables(model), model)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "model, sd, match",
    [
        (
            sslvit_model(),
            lambda: _sd(sslvit_model(dim=64, mlp_dim=128)),
            r"patch_embed.proj.weight has shape \(64, 3, 4, 4\) in the state dict "
            r"but the model expects \(32, 3, 4, 4\)",
        ),
        (
            sslvit_model(),
            lambda: _sd(sslvit_model(mlp_dim=96)),
            r"blocks.0.ffns.0.mlp.fc1.weight has shape \(96, 32\) .* expects \(64, 32\) \(dim=32, mlp_dim=64\)",
        ),
        (sslvit_model(), lambda: _sd(sslvit_model(depth=3)), r"has 3 blocks \(blocks.0-2\) but model.depth=2"),
        (
            sslvit_model(P=1),
            lambda: _sd(sslvit_model(P=2)),
            r"has 2 parallel branch\(es\) per block .* model.num_parallel_branches=1",
        ),
        (sslvit_model(ls=None), lambda: _sd(sslvit_model(ls=0.1)), r"has LayerScale .* set model.layer_scale_init"),
        (
            sslvit_model(),
            lambda: _sd(sslvit_model(), **{"fc_norm.weight": np.ones(32, np.float32)}),
            r"fc_norm \(LayerNorm after average pooling",
        ),
        (
            sslvit_model(),
            lambda: _sd(sslvit_model(), dist_token=np.zeros((1, 1, 32), np.float32)),
            "distillation token",
        ),
        (
            sslvit_model(),
            lambda: _sd(sslvit_model(), **{"blocks.0.extra.weight": np.ones(3, np.float32)}),
            r"1 keys with no place in the model \(blocks.0.extra.weight\)",
        ),
        (sslvit_model(), lambda: _sd(sslvit_model(), drop=("cls_token",)), "has no cls_token"),
        (sslvit_model(stem="hmlp"), lambda: _sd(sslvit_model()), r"one linear patch projection .* pass stem=linear"),
        (sslvit_model(), lambda: _sd(sslvit_model(stem="hmlp")), r"DeiT's hMLP stem\) but the model has stem=linear"),
        (
            sslvit_model(),
            lambda: _sd(sslvit_model(), pos_embed=np.zeros((1, 20, 32), np.float32)),
            r"pos_embed has 20 rows .* neither a square grid nor a class slot",
        ),
        (
            sslvit_model(classes=10),
            lambda: _sd(sslvit_model(classes=5)),
            r"head.weight has shape \(5, 32\) .* expects \(10, 32\)",
        ),
        (sslvit_model(use_mask_token=True), lambda: _sd(sslvit_model()), "use_mask_token=True: timm's ViT has no mask"),
        (sslvit_model(pos_embedding="sincos"), lambda: _sd(sslvit_model()), "model.pos_embedding=sincos"),
    ],
    ids=[
        "dim",
        "mlp_dim",
        "depth",
        "branches",
        "layer_scale",
        "fc_norm",
        "dist_token",
        "unknown_key",
        "no_cls_token",
        "hmlp_vs_linear",
        "linear_vs_hmlp",
        "pos_rows",
        "head",
        "mask_token",
        "sincos",
    ],
)
def test_unmappable_files_and_shape_mismatches_are_one_line_errors(model, sd, match):
    with pytest.raises(ConfigError, match=match) as err:
        timm_to_variables(sd(), model)
    assert "\n" not in str(err.value)


def test_headless_model_takes_a_classifier_and_mask_tokens_are_ignored():
    clf = sslvit_model(classes=7)
    sd = _sd(clf, mask_token=np.zeros((1, 1, DIM), np.float32))
    v = timm_to_variables(sd, sslvit_model(classes=0))
    assert "head" not in v["params"] and "mask_token" not in v["params"]
    kw = timm_kwargs(sslvit_model(P=1, pool="mean", classes=0, ls=1e-5))
    assert kw["global_pool"] == "avg" and kw["fc_norm"] is False and kw["init_values"] == 1e-5
    assert kw["num_classes"] == 0 and kw["mlp_ratio"] == 2.0
    # A hidden size whose plain ratio rounds down in timm's int(dim * mlp_ratio) still gets its own ratio.
    odd = ViT(image_size=16, patch_size=4, num_classes=0, dim=28, depth=1, heads=2, mlp_dim=61)
    assert int(28 * (61 / 28)) == 60 and int(28 * timm_kwargs(odd)["mlp_ratio"]) == 61


# ------------------------------------------------------------------------------------------ the stages
def _timm_file(tmp_path, size=16, classes=1000) -> Path:
    """A timm file of the tiny architecture below (random weights, 16 px: a 4x4 grid, resized on import)."""
    model = sslvit_model(2, 0.1, size=size, classes=classes)
    return save_safetensors(variables_to_timm(random_variables(model, seed=8), model), tmp_path / "timm.safetensors")


TINY_MODEL = [
    "model=tiny",
    f"model.dim={DIM}",
    f"model.depth={DEPTH}",
    f"model.heads={HEADS}",
    f"model.mlp_dim={MLP}",
    "model.num_parallel_branches=2",
    "model.layer_scale_init=0.1",
    "model.image_size=32",
    "stem=linear",
    "model.unroll_layers=false",
]  # the layers as a loop: shorter compiles (~1/3 of this test's time)


def test_finetune_and_probe_start_from_a_timm_file(tfds_cifar10, hydra_compose, tmp_path):
    from sslvit.finetune import Finetuning
    from sslvit.models import build_vit, encoder_config
    from sslvit.probe import LinearProbe

    path = _timm_file(tmp_path)
    # The model group describes the file; its 4x4 grid of position embeddings is resized to 32 px (8x8).
    overrides = [
        f"init={path}",
        *TINY_MODEL,
        "data.train_split='train[:64]'",
        "batch_size=32",
        "steps=2",
        "log_every=1",
        "ckpt_every=2",
        "optim.warmup_steps=1",
        "progress=false",
        "eval_batches=0",
    ]
    cfg = hydra_compose("finetune", overrides)
    ft = Finetuning(cfg, tmp_path / "ft", overrides)
    expected = timm_to_variables(
        load_state_dict(path), build_vit(encoder_config(cfg.model, cfg.stem), num_classes=1000)
    )["params"]
    assert ft.trained.stage == "import" and ft.trained.encoder["model"]["image_size"] == 32
    assert ft.model.grid_size == (8, 8)
    jax.tree.map(np.testing.assert_array_equal, ft.trained.params, expected)
    assert expected["pos_embedding"].shape == (1, 64, DIM)  # the file's 4x4 grid, resized to 8x8
    results = ft.run()
    assert results["source_run"] == str(path) and np.isfinite(results["train_loss"])
    assert results["num_classes"] == 10 and results["steps"] == 2

    # The linear probe of the same file (a headless encoder: the file's head is left out).
    probe = LinearProbe(
        hydra_compose(
            "linear_probe",
            [
                f"init={path}",
                *TINY_MODEL,
                "data.train_split='train[:64]'",
                "data.test_split='test[:32]'",
                "layers=[-1]",
                "probe.epochs=1",
                "probe.batch_size=32",
                "batch_size=32",
                "knn.k=3",
                "progress=false",
            ],
        ),
        tmp_path / "probe",
    )
    jax.tree.map(np.testing.assert_array_equal, probe.trained.params, expected)
    results = probe.run()
    assert results["layers"] == [2] and results["num_train"] == 64 and 0 <= results["best_top1"] <= 1
    assert results["run"] == str(path)

    # The fine-tuned classifier exported back to timm (its head included) computes the same logits.
    needs_timm()
    _, kwargs, snippet = export_run(tmp_path / "ft", tmp_path / "clf.safetensors")
    # ImageNet's 1000-class head was replaced for CIFAR-10's 10 classes.
    assert kwargs["num_classes"] == 10 and "block_fn=partial(ParallelThingsBlock, num_parallel=2)" in snippet
    ns: dict = {}
    exec(snippet, ns)  # the printed lines, as a user pastes them
    from sslvit.pretrained import load_encoder

    trained = load_encoder(tmp_path / "ft")
    clf = build_vit(trained.encoder, num_classes=10)
    x = images(size=32)
    assert_same(timm_forward(ns["model"], x)[0], np.asarray(clf.apply({"params": trained.params}, x)))


@pytest.mark.parametrize(
    "stage, extra, match",
    [
        (
            "finetune",
            ["model.dim=64", "model.mlp_dim=128"],
            r"patch_embed.proj.weight has shape \(32, 3, 4, 4\) in .*timm.safetensors "
            r"but the model expects \(64, 3, 4, 4\)",
        ),
        ("finetune", ["run=/some/run"], r"run=/some/run and init=.* are both set"),
        ("linear_probe", ["model.depth=3"], r"has 2 blocks \(blocks.0-1\) but model.depth=3"),
    ],
    ids=["finetune_dim", "finetune_run_and_init", "probe_depth"],
)
def test_stage_init_errors_are_one_line(stage, extra, match, hydra_compose, tmp_path):
    from sslvit.finetune import Finetuning
    from sslvit.probe import LinearProbe

    overrides = [f"init={_timm_file(tmp_path)}", *TINY_MODEL, *extra]
    cfg = hydra_compose(stage, overrides)
    with pytest.raises(ConfigError, match=match) as err:
        Finetuning(cfg, tmp_path / "out", overrides) if stage == "finetune" else LinearProbe(cfg, tmp_path / "out")
    assert "\n" not in str(err.value)


def test_probe_init_needs_the_model_groups_and_run_refuses_them(hydra_compose, tmp_path):
    from sslvit.probe import LinearProbe

    with pytest.raises(ConfigError, match=r"init=<file> needs the model and stem groups"):
        LinearProbe(hydra_compose("linear_probe", [f"init={_timm_file(tmp_path)}"]), tmp_path / "out")
    with pytest.raises(ConfigError, match=r"model/stem options describe an init=<file>"):
        LinearProbe(hydra_compose("linear_probe", ["run=/x", "model=tiny", "stem=linear"]), tmp_path / "out")


def test_export_timm_script_on_a_pretraining_run(pretrain_run, tmp_path, tmp_path_factory):
    """`export_timm.py` as a user runs it: the encoder of the tiny pretraining run (hMLP stem with BatchNorm,
    2 layers x 2 branches, LayerScale) to a file; the printed snippet loads it into timm, which then computes the
    encoder's pooled features. Like every script, it keeps compiled steps in the user's cache dir."""
    needs_timm()
    from sslvit.models import build_vit
    from sslvit.pretrained import load_encoder

    out = tmp_path / "enc.safetensors"
    xdg = tmp_path_factory.mktemp("xdg_cache")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", XDG_CACHE_HOME=str(xdg))
    proc = subprocess.run(
        [sys.executable, str(REPO / "export_timm.py"), f"run={pretrain_run}", f"out={out}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "embed_layer=HMLPStem" in proc.stdout
    assert (xdg / "sslvit" / "jax").is_dir()
    snippet = proc.stdout[proc.stdout.index("from functools import partial") :]
    ns: dict = {}
    exec(snippet, ns)
    assert tuple(ns["out"].shape) == (2, 64)

    trained = load_encoder(pretrain_run)
    assert trained.batch_stats  # the hMLP stem's running statistics went along
    encoder = build_vit(trained.encoder, num_classes=0)
    x = images(size=32)
    variables = {
        "params": {k: v for k, v in trained.params.items() if k != "mask_token"},
        "batch_stats": trained.batch_stats,
    }
    assert_same(timm_forward(ns["model"], x)[0], np.asarray(encoder.apply(variables, x)))
    assert not list(tmp_path.glob("outputs")) and sorted(p.name for p in tmp_path.iterdir()) == ["enc.safetensors"]

    with pytest.raises(ConfigError, match=r"out='enc.pth' must end in \.safetensors"):
        export_run(pretrain_run, "enc.pth")
    with pytest.raises(ConfigError, match="does not exist"):
        export_run(tmp_path / "nope")
    assert "embed_layer=HMLPStem" in timm_snippet(encoder, out)
