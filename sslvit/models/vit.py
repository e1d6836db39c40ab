"""Parallel Vision Transformer (Touvron et al. 2022, "Three things everyone should know about ViTs", §3).

Each of `depth` layers holds `num_parallel_branches` (P) attention branches, then P MLP branches:

    x = x + Σ_p attn_p(norm_p(x))
    x = x + Σ_p mlp_p(norm'_p(x))

every branch with its own pre-LayerNorm, LayerScale, drop-path mask and dropout mask (on its output, as timm's and
DeiT's blocks). P = 1 is the ordinary sequential ViT.

Fusion. The branches are not run as P small matmuls one after another. A LayerNorm's normalisation (mean, var) is
the same for every branch; only its affine scale/bias differs, and that folds into the next weight matrix:
`(x̂·g + b) W = x̂ (diag(g) W) + b W`. So the P branches' qkv (and fc1) projections are one matmul of the shared x̂
with the P folded weight matrices side by side, attention runs once over P·heads heads, and the P output
projections (and fc2) are one matmul contracting over (branch, hidden); LayerScale folds into those weights and a
per-sample drop-path scale commutes with them. Parameters stay per branch (a branch axis P), so the maths is exactly
the official per-branch block, with wider matmuls. The input projections are stored input-dim first, (D, P, ...),
so that the P matrices side by side are a plain reshape, not a transpose of the weights on every call (measured on
CPU: transposes were ~10% of ViT-S 18x2 inference at batch 1).

Attention kernel (`attention`). "explicit" writes q·kᵀ, a float32 softmax and probs·v as three XLA ops (the
fastest on CPU); "xla" and "cudnn" call `jax.nn.dot_product_attention` with that implementation ("cudnn": the
fused flash-attention kernel, which never writes the (heads, tokens, tokens) probabilities to memory). "auto"
(default) picks cudnn where it applies (a CUDA GPU, bfloat16 or float16, head dim a multiple of 8 up to 128) and
explicit everywhere else, so CPU runs are unchanged. All compute the same function (tests/test_models.py); the
kernels, GELU and the position embeddings are plain functions in sslvit/models/ops.py.

Layers run under `nn.scan` (parameters stacked on a leading depth axis): compile time does not grow with depth.
Named scopes (`fold`, `layernorm`, `attention`, `gelu`, `drop_path`) tag the ops in profiles and HLO dumps
(bench/profile_step.py sorts a step's time by them).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sslvit.errors import ConfigError
from sslvit.models.ops import contract, gelu, multi_head_attention, pair, resolve_attention, sincos_pos_embedding
from sslvit.models.stems import get_stem

Dtype = Any
LN_EPS = 1e-6


# Axis of the branch (P) in each per-layer parameter of ParallelAttention / ParallelMLP (0 unless listed): the input
# projections are stored input-dim first. Under `layers/` the arrays carry a leading depth axis: add 1.
BRANCH_AXIS = {"qkv_kernel": 1, "fc1_kernel": 1}


def branch_axis(name: str) -> int:
    """Branch axis of a per-layer parameter named `name` (its last path component), e.g. to take one branch."""
    return BRANCH_AXIS.get(name.rsplit("/", 1)[-1], 0)


def _normalize(x):
    """LayerNorm without the affine part, in float32 (the affine part is folded into the next matmul)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS)


class DropPath(nn.Module):
    """Per-branch, per-sample stochastic-depth scale (P, B) in {0, 1/keep} (rng stream 'dropout'). `rate` is a float,
    or the layer's rate as a traced scalar under a per-layer schedule (`drop_path_schedule`)."""

    @nn.compact
    def __call__(self, rate, branches: int, batch: int):
        keep = 1.0 - rate
        kept = jax.random.bernoulli(self.make_rng("dropout"), keep, (branches, batch))
        return kept.astype(jnp.float32) / keep


def _drop_path_scale(module: nn.Module, rate, branches: int, batch: int, train: bool):
    """The drop-path scale of a module's branches (a `DropPath` submodule of the calling module); None when
    inactive. Called from a module's compact __call__."""
    del module  # the submodule attaches to the module whose __call__ is running
    if not train or (not isinstance(rate, jax.Array) and rate == 0.0):
        return None
    return DropPath(name="drop_path")(rate, branches, batch)


def drop_path_rates(drop_path: float, depth: int, schedule: str = "constant") -> np.ndarray:
    """Each layer's drop-path rate: `constant` (the official 3-things code) or BEiT's `linear` rule, layer i of L
    (0-based) dropping i/(L-1)·drop_path: none in the first layer, `drop_path` in the last."""
    if schedule == "linear":
        return np.linspace(0.0, drop_path, depth, dtype=np.float32)
    return np.full(depth, drop_path, np.float32)


def _dropped_branch_sum(rate: float, x, w, bias, scale):
    """Σ_p dropout(branch_p): each branch's output (its projection, bias and LayerScale) dropped with its own mask
    before the branches are summed, as timm's and DeiT's blocks drop each branch's projection output (`proj_drop`,
    `Mlp.drop2`); one mask on the sum would be another model. Training with dropout > 0 only: the branch outputs
    (b, n, P, D) are materialised instead of the fused contraction over (branch, ...).

    x: (b, n, P, ...) branch inputs of the output projection; w: (P, ..., D); bias: (P, D); scale: drop path (P, b).
    Called from a module's compact __call__: the Dropout becomes its submodule (rng stream 'dropout')."""
    b, n, p = x.shape[:3]
    y = jnp.einsum("bnpk,pkd->bnpd", x.reshape(b, n, p, -1), w.reshape(p, -1, w.shape[-1]))
    y = y + bias.astype(y.dtype)
    if scale is not None:
        y = y * scale.T[:, None, :, None].astype(y.dtype)
    return nn.Dropout(rate, name="branch_dropout")(y, deterministic=False).sum(axis=2)


def _trunc_normal(std=0.02):
    return nn.initializers.truncated_normal(std)


class ParallelAttention(nn.Module):
    """P attention branches of one layer, computed fused. Returns the summed residual update Σ_p attn_p."""

    dim: int
    heads: int
    dim_head: int
    branches: int
    drop_path: float = 0.0
    layer_scale_init: Optional[float] = None
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    dropout: float = 0.0  # on each branch's output (timm's proj_drop)
    attention: str = "auto"  # see the module doc

    @nn.compact
    def __call__(self, x, train: bool, drop_path=None):
        """`drop_path`: this layer's rate under a per-layer schedule (traced); None: the module's `drop_path`."""
        P, H, E, D = self.branches, self.heads, self.dim_head, self.dim
        b, n, _ = x.shape
        norm_scale = self.param("norm_scale", nn.initializers.ones, (P, D))
        norm_bias = self.param("norm_bias", nn.initializers.zeros, (P, D))
        qkv_kernel = self.param("qkv_kernel", _trunc_normal(), (D, P, 3, H, E))  # input dim first: see module doc
        qkv_bias = self.param("qkv_bias", nn.initializers.zeros, (P, 3, H, E)) if self.qkv_bias else 0.0
        out_kernel = self.param("out_kernel", _trunc_normal(), (P, H, E, D))
        out_bias = self.param("out_bias", nn.initializers.zeros, (P, D))
        gamma = (
            self.param("layer_scale", nn.initializers.constant(self.layer_scale_init), (P, D))
            if self.layer_scale_init is not None
            else jnp.ones((P, D), jnp.float32)
        )

        # Fold each branch's LayerNorm affine into its qkv projection: one matmul for all branches.
        with jax.named_scope("fold"):
            w_qkv = norm_scale.T[:, :, None, None, None] * qkv_kernel
            b_qkv = jnp.einsum("pd,dpthe->pthe", norm_bias, qkv_kernel) + qkv_bias
        with jax.named_scope("layernorm"):
            xhat = _normalize(x).astype(self.dtype)
        qkv = contract(xhat, w_qkv.astype(self.dtype), 1) + b_qkv.astype(self.dtype)  # (b, n, P, 3, H, E)
        q, k, v = (qkv[:, :, :, i].reshape(b, n, P * H, E) for i in range(3))

        # One attention over P*H heads.
        with jax.named_scope("attention"):
            out = multi_head_attention(q, k, v, resolve_attention(self.attention, self.dtype, E))
        out = out.reshape(b, n, P, H, E)

        # Output projections of all branches in one matmul over (branch, head, dim_head); LayerScale folded in.
        with jax.named_scope("fold"):
            w_out = (out_kernel * gamma[:, None, None, :]).astype(self.dtype)
            bias = gamma * out_bias  # (P, D)
        with jax.named_scope("drop_path"):
            scale = _drop_path_scale(self, self.drop_path if drop_path is None else drop_path, P, b, train)
        if train and self.dropout > 0:
            return _dropped_branch_sum(self.dropout, out, w_out, bias, scale)
        if scale is None:
            return contract(out, w_out, 3) + bias.sum(0).astype(self.dtype)
        with jax.named_scope("drop_path"):
            out = out * scale.T[:, None, :, None, None].astype(self.dtype)
            bias = jnp.einsum("pb,pd->bd", scale, bias)[:, None].astype(self.dtype)
        return contract(out, w_out, 3) + bias


class ParallelMLP(nn.Module):
    """P MLP branches of one layer, computed fused. Returns the summed residual update Σ_p mlp_p."""

    dim: int
    mlp_dim: int
    branches: int
    dropout: float = 0.0
    drop_path: float = 0.0
    layer_scale_init: Optional[float] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, drop_path=None):
        """`drop_path`: this layer's rate under a per-layer schedule (traced); None: the module's `drop_path`."""
        P, M, D = self.branches, self.mlp_dim, self.dim
        b = x.shape[0]
        norm_scale = self.param("norm_scale", nn.initializers.ones, (P, D))
        norm_bias = self.param("norm_bias", nn.initializers.zeros, (P, D))
        fc1_kernel = self.param("fc1_kernel", _trunc_normal(), (D, P, M))  # input dim first: see module doc
        fc1_bias = self.param("fc1_bias", nn.initializers.zeros, (P, M))
        fc2_kernel = self.param("fc2_kernel", _trunc_normal(), (P, M, D))
        fc2_bias = self.param("fc2_bias", nn.initializers.zeros, (P, D))
        gamma = (
            self.param("layer_scale", nn.initializers.constant(self.layer_scale_init), (P, D))
            if self.layer_scale_init is not None
            else jnp.ones((P, D), jnp.float32)
        )

        with jax.named_scope("fold"):
            w1 = norm_scale.T[:, :, None] * fc1_kernel
            b1 = jnp.einsum("pd,dpm->pm", norm_bias, fc1_kernel) + fc1_bias
        with jax.named_scope("layernorm"):
            xhat = _normalize(x).astype(self.dtype)
        h = contract(xhat, w1.astype(self.dtype), 1) + b1.astype(self.dtype)  # (b, n, P, M)
        with jax.named_scope("gelu"):
            h = gelu(h)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)

        with jax.named_scope("fold"):
            w2 = (fc2_kernel * gamma[:, None, :]).astype(self.dtype)
            bias = gamma * fc2_bias
        with jax.named_scope("drop_path"):
            scale = _drop_path_scale(self, self.drop_path if drop_path is None else drop_path, P, b, train)
        if train and self.dropout > 0:
            return _dropped_branch_sum(self.dropout, h, w2, bias, scale)
        if scale is None:
            return contract(h, w2, 2) + bias.sum(0).astype(self.dtype)
        with jax.named_scope("drop_path"):
            h = h * scale.T[:, None, :, None].astype(self.dtype)
            bias = jnp.einsum("pb,pd->bd", scale, bias)[:, None].astype(self.dtype)
        return contract(h, w2, 2) + bias


class ParallelLayer(nn.Module):
    """One parallel layer: x += Σ attn branches; x += Σ MLP branches. Scanned over depth (carry = tokens)."""

    dim: int
    heads: int
    dim_head: int
    mlp_dim: int
    branches: int
    dropout: float = 0.0
    drop_path: float = 0.0
    layer_scale_init: Optional[float] = None
    dtype: Dtype = jnp.float32
    train: bool = False
    return_features: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, rate):
        # The residual stream stays float32; only matmul inputs use `dtype`.
        # Dropout acts inside each branch (ParallelAttention/ParallelMLP), not on the summed update.
        # `rate`: this layer's drop-path rate under a per-layer schedule (the scan's input), else None.
        update = ParallelAttention(
            self.dim,
            self.heads,
            self.dim_head,
            self.branches,
            self.drop_path,
            self.layer_scale_init,
            dtype=self.dtype,
            dropout=self.dropout,
            attention=self.attention,
            name="attn",
        )(x, self.train, rate)
        x = x + update.astype(jnp.float32)
        update = ParallelMLP(
            self.dim,
            self.mlp_dim,
            self.branches,
            self.dropout,
            self.drop_path,
            self.layer_scale_init,
            dtype=self.dtype,
            name="mlp",
        )(x, self.train, rate)
        x = x + update.astype(jnp.float32)
        return x, (x if self.return_features else None)


class ViT(nn.Module):
    """Parallel Vision Transformer with a pluggable patch stem (Flax linen). Input NHWC images.

    Arguments follow lucidrains' vit-pytorch (`image_size, patch_size, num_classes, dim, depth, heads, mlp_dim,
    pool, channels, dim_head, dropout, emb_dropout`) plus `num_parallel_branches`, `drop_path` (and its per-layer
    `drop_path_schedule`: `constant`, or BEiT's `linear` from 0 in the first layer to `drop_path` in the last),
    `layer_scale_init`, `stem`/`stem_norm`, `use_mask_token`, `pos_embedding`, `dtype` (activations; parameters
    stay float32), `remat` (with `remat_policy`, what the backward pass keeps), `unroll_layers` (compile the layers
    unrolled instead of as a loop: faster steps, longer compiles; same parameters; ignored with remat) and
    `attention` (the attention kernel, see the module doc).

    Rng streams: `emb_dropout` for the embedding dropout, `dropout` for dropout and drop path. With `train=False`
    (the default) all of them are off and the output is deterministic; no rng is needed.

    `__call__(img, train=False, mask=None, return_features=False)`: `mask` (B, N) bool replaces masked patch
    embeddings with the learned mask token (needs `use_mask_token=True`); with `return_features` it returns
    `(logits, {'layers': (depth, B, 1+N, D) each layer's tokens, 'tokens': final-normed tokens, 'pre_logits'})`
    ('layers' is None with `collect_layers=False`, which spares the stacked per-layer copies).
    `num_classes=0` gives no head: the output is the pooled pre-logits.
    """

    image_size: Any
    patch_size: int
    num_classes: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    num_parallel_branches: int = 1
    pool: str = "cls"
    channels: int = 3
    dim_head: Optional[int] = None
    dropout: float = 0.0
    emb_dropout: float = 0.0
    drop_path: float = 0.0
    drop_path_schedule: str = "constant"
    layer_scale_init: Optional[float] = None
    stem: str = "linear"
    stem_norm: str = "batch"
    use_mask_token: bool = False
    pos_embedding: str = "learned"
    dtype: Dtype = jnp.float32
    remat: bool = False
    unroll_layers: bool = False
    attention: str = "auto"
    remat_policy: str = "nothing_saveable"

    def __post_init__(self):
        self.validate()
        super().__post_init__()

    def validate(self) -> None:
        """Raise ConfigError naming the offending argument; called at construction, before any compute. The
        arguments are checked by the `model` config group's schema (sslvit/config/groups.py), the stem by its own."""
        from sslvit.config.checks import Integer  # noqa: PLC0415
        from sslvit.config.groups import ModelConfig  # noqa: PLC0415

        fields = {f: getattr(self, f) for f in ModelConfig.__dataclass_fields__ if f != "dtype"}
        ModelConfig.parse(fields, prefix="")
        Integer(min=0)(self.num_classes, "num_classes", "(0 = no head)")
        get_stem(self.stem).validate(self.dim, self.patch_size, self.stem_norm)

    @property
    def grid_size(self) -> tuple[int, int]:
        ih, iw = pair(self.image_size)
        return ih // self.patch_size, iw // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @nn.compact
    def __call__(self, img, train: bool = False, mask=None, return_features: bool = False, collect_layers: bool = True):
        b = img.shape[0]
        dim_head = self.dim_head or self.dim // self.heads
        ih, iw = pair(self.image_size)
        if img.shape[1:] != (ih, iw, self.channels):
            raise ConfigError(
                f"input images have shape {img.shape[1:]}, the model expects {(ih, iw, self.channels)} "
                f"(NHWC): resize the images or set image_size"
            )

        stem_cls = get_stem(self.stem)
        x = stem_cls(self.dim, self.patch_size, self.channels, self.stem_norm, dtype=self.dtype, name="stem")(
            img.astype(self.dtype), train=train
        )
        x = x.reshape(b, -1, self.dim).astype(jnp.float32)

        if mask is not None:
            if not self.use_mask_token:
                raise ConfigError("a patch mask was passed to a ViT built without use_mask_token=True")
            mask_token = self.param("mask_token", _trunc_normal(), (1, 1, self.dim))
            x = jnp.where(mask[..., None], mask_token, x)
        elif self.use_mask_token:
            self.param("mask_token", _trunc_normal(), (1, 1, self.dim))  # created at init even without a mask

        if self.pos_embedding == "learned":
            pos = self.param("pos_embedding", _trunc_normal(), (1, self.num_patches, self.dim))
        else:
            pos = jnp.asarray(sincos_pos_embedding(self.grid_size, self.dim))
        x = x + pos  # patch tokens only; the class token has none (as the official 3-things code)

        cls = self.param("cls_token", _trunc_normal(), (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)), x], axis=1)
        x = nn.Dropout(self.emb_dropout, rng_collection="emb_dropout")(x, deterministic=not train)

        layer = ParallelLayer
        if self.remat:
            layer = nn.remat(layer, prevent_cse=False, policy=getattr(jax.checkpoint_policies, self.remat_policy))
        layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=self.depth,
            # Unrolled, the compiled program has no loop: per-layer activations for the backward pass are no
            # longer copied into stacked buffers (zero-filled every step). ~+10-20% CPU pretraining step; compile
            # time grows with depth. Parameters are stacked the same way either way (checkpoints interchange).
            # Not with remat: unrolled, the rematerialised layers kept all their activations (measured, XLA temp
            # memory of the CIFAR step 1515 MiB vs 413 as a loop), so remat=true compiles the loop.
            unroll=self.depth if self.unroll_layers and not self.remat else 1,
        )(
            self.dim,
            self.heads,
            dim_head,
            self.mlp_dim,
            self.num_parallel_branches,
            self.dropout,
            self.drop_path,
            self.layer_scale_init,
            self.dtype,
            train,
            return_features and collect_layers,
            attention=self.attention,
            name="layers",
        )
        rates = None  # constant rate: a static attribute of every layer; a schedule: each layer's rate, scanned
        if train and self.drop_path > 0 and self.drop_path_schedule != "constant":
            rates = jnp.asarray(drop_path_rates(self.drop_path, self.depth, self.drop_path_schedule))
        x, per_layer = layers(x, rates)

        tokens = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name="norm")(x)
        pre_logits = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(axis=1)
        if self.num_classes > 0:
            out = nn.Dense(self.num_classes, kernel_init=_trunc_normal(), dtype=jnp.float32, name="head")(pre_logits)
        else:
            out = pre_logits
        if return_features:
            return out, {"layers": per_layer, "tokens": tokens, "pre_logits": pre_logits}
        return out
