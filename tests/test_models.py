"""The parallel ViT encoder and its stems, checked against an independent unfused reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslvit import ConfigError
from sslvit.models import ViT, get_stem, hmlp_factors, resize_pos_embedding


def n_params(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def tiny(**kw):
    cfg = dict(image_size=16, patch_size=4, num_classes=10, dim=32, depth=3, heads=4, mlp_dim=64)
    cfg.update(kw)
    return ViT(**cfg)


def images(n=2, size=16, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, size, size, 3))


# ---------------------------------------------------------------- an unfused, loop-over-branches reference
def _ln(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def _gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def reference_forward(p, img, patch, heads, masks=None, keep=1.0, path_scales=None):
    """A plain ViT written from the parameters with numpy, one branch after another (float64).

    `masks`: training-mode dropout, per layer in order: the attention branches' output mask (B, N, P, D), the MLP's
    hidden mask (B, N, P, M) and the MLP branches' output mask (B, N, P, D); kept values are scaled by 1/keep.
    `path_scales`: drop path, per layer in order: the attention branches' and the MLP branches' per-sample scales
    (P, B), each branch's output multiplied by its own."""
    masks = iter(masks or ())
    scales = iter(path_scales or ())
    path = (lambda: next(scales)) if path_scales else (lambda: None)
    drop = (lambda: next(masks) / keep) if keep < 1.0 else (lambda: None)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    img = np.asarray(img, np.float64)
    b, h, w, c = img.shape
    k = p["stem"]["proj"]["kernel"]  # (p, p, C, D)
    patches = img.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum("bijpqc,pqcd->bijd", patches, k) + p["stem"]["proj"]["bias"]
    x = x.reshape(b, -1, k.shape[-1]) + p["pos_embedding"]
    d = x.shape[-1]
    x = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, d)), x], 1)
    layers_out = []
    A, M = p["layers"]["attn"], p["layers"]["mlp"]
    depth, branches = A["qkv_kernel"].shape[0], A["qkv_kernel"].shape[2]  # (depth, D, P, 3, H, E)
    for l in range(depth):
        upd = 0
        attn_mask, attn_path = drop(), path()
        for br in range(branches):
            xn = _ln(x, A["norm_scale"][l, br], A["norm_bias"][l, br])
            qkv = np.einsum("bnd,dthe->bnthe", xn, A["qkv_kernel"][l, :, br]) + A["qkv_bias"][l, br]
            q, kk, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            e = q.shape[-1]
            att = np.einsum("bqhe,bkhe->bhqk", q, kk) / np.sqrt(e)
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = np.einsum("bhqk,bkhe->bqhe", att, v)
            o = np.einsum("bqhe,hed->bqd", o, A["out_kernel"][l, br]) + A["out_bias"][l, br]
            if "layer_scale" in A:
                o = o * A["layer_scale"][l, br]
            if attn_mask is not None:
                o = o * attn_mask[:, :, br]
            if attn_path is not None:
                o = o * attn_path[br][:, None, None]
            upd = upd + o
        x = x + upd
        upd = 0
        hidden_mask, mlp_mask, mlp_path = drop(), drop(), path()
        for br in range(branches):
            xn = _ln(x, M["norm_scale"][l, br], M["norm_bias"][l, br])
            hdn = _gelu(xn @ M["fc1_kernel"][l, :, br] + M["fc1_bias"][l, br])
            if hidden_mask is not None:
                hdn = hdn * hidden_mask[:, :, br]
            o = hdn @ M["fc2_kernel"][l, br] + M["fc2_bias"][l, br]
            if "layer_scale" in M:
                o = o * M["layer_scale"][l, br]
            if mlp_mask is not None:
                o = o * mlp_mask[:, :, br]
            if mlp_path is not None:
                o = o * mlp_path[br][:, None, None]
            upd = upd + o
        x = x + upd
        layers_out.append(x)
    tokens = _ln(x, p["norm"]["scale"], p["norm"]["bias"])
    logits = tokens[:, 0] @ p["head"]["kernel"] + p["head"]["bias"]
    return logits, np.stack(layers_out)


def test_seed_snippet():
    img = jnp.ones((1, 256, 256, 3))
    v = ViT(
        image_size=256,
        patch_size=16,
        num_classes=1000,
        dim=1024,
        depth=6,
        heads=8,
        mlp_dim=2048,
        num_parallel_branches=2,
        dropout=0.1,
        emb_dropout=0.1,
    )
    init_rngs = {
        "params": jax.random.PRNGKey(1),
        "dropout": jax.random.PRNGKey(2),
        "emb_dropout": jax.random.PRNGKey(3),
    }
    params = jax.eval_shape(v.init, init_rngs, img)  # shapes only: the snippet's model has 97M parameters
    output = jax.eval_shape(lambda p, x: v.apply(p, x, rngs=init_rngs), params, img)
    assert output.shape == (1, 1000)
    count = sum(jax.tree.leaves(jax.tree.map(lambda x: np.prod(x.shape), params)))
    d, m, L, P = 1024, 2048, 6, 2
    per_branch = (4 * d * d + 4 * d) + (2 * d * m + m + d) + 4 * d  # attn + mlp + two LayerNorms
    expected = L * P * per_branch + (16 * 16 * 3 * d + d) + 256 * d + d + 2 * d + (d * 1000 + 1000)
    assert count == expected


@pytest.mark.parametrize("branches,layer_scale", [(1, None), (2, 0.1), (3, 1e-2)])
def test_fused_layers_match_unfused_reference(branches, layer_scale):
    model = tiny(num_parallel_branches=branches, layer_scale_init=layer_scale)
    img = images()
    variables = model.init(jax.random.PRNGKey(0), img)
    # Random norms / LayerScale / biases so that the folding of affine terms is really exercised.
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    logits, feats = model.apply({"params": params}, img, return_features=True)
    ref_logits, ref_layers = reference_forward(params, img, patch=4, heads=4)
    assert feats["layers"].shape == (3, 2, 17, 32)
    np.testing.assert_allclose(np.asarray(feats["layers"]), ref_layers, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=2e-4, atol=2e-4)


def _dropout_masks(model, variables, img, key):
    """Train-mode forward of `model` with the keep-masks of every active dropout recorded, in call order (a
    callback from inside the compiled layer loop: the masks the fused model really drew)."""
    import flax.linen as nn

    masks = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__" and context.module.rate > 0:
            jax.debug.callback(lambda y: masks.append(np.asarray(y) != 0), out, ordered=True)
        return out

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, img, train=True, return_features=True, rngs={"dropout": key})
    jax.effects_barrier()
    return out, masks


@pytest.mark.parametrize("branches", [1, 2])
def test_dropout_in_train_mode_matches_unfused_reference_per_branch(branches):
    """Dropout acts on each branch's output (and the MLP hidden layer) with its own mask, as timm's and DeiT's
    parallel blocks do; the fused model in training mode equals the per-branch reference given the same masks."""
    model = tiny(num_parallel_branches=branches, layer_scale_init=0.1, dropout=0.3)
    img = images()
    # Random parameters of the model's shapes, drawn with numpy (no init to compile): scales around 1, the rest
    # around 0, so the folding of LayerNorm affine terms, biases and LayerScale is exercised.
    rng = np.random.default_rng(7)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), img)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.float32("scale" in str(path[-1])) + 0.3 * rng.normal(size=x.shape).astype(np.float32), shapes
    )
    (logits, feats), masks = _dropout_masks(model, {"params": params}, img, jax.random.PRNGKey(3))
    assert [m.shape for m in masks[:3]] == [(2, 17, branches, 32), (2, 17, branches, 64), (2, 17, branches, 32)]
    assert len(masks) == 3 * 3 and 0.6 < np.mean([m.mean() for m in masks]) < 0.8
    if branches == 2:  # independent masks per branch
        assert not np.array_equal(masks[0][:, :, 0], masks[0][:, :, 1])
        assert not np.array_equal(masks[2][:, :, 0], masks[2][:, :, 1])
    ref_logits, ref_layers = reference_forward(params, img, patch=4, heads=4, masks=masks, keep=0.7)
    np.testing.assert_allclose(np.asarray(feats["layers"]), ref_layers, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_drop_path_schedule_in_train_mode_matches_unfused_reference(schedule):
    """Drop path per branch and per sample, at each layer's rate: `constant` drops every layer at `drop_path`,
    `linear` (BEiT) layer i of L at i/(L-1)·drop_path. The rate shows in the kept samples' scale 1/(1 - rate); the
    fused model in training mode equals the per-branch reference given the scales it drew."""
    import flax.linen as nn

    from sslvit.models.vit import DropPath, drop_path_rates

    depth, rate, batch = 3, 0.4, 16
    model = tiny(
        depth=depth, num_parallel_branches=2, layer_scale_init=0.1, drop_path=rate, drop_path_schedule=schedule
    )
    img = images(batch)
    rng = np.random.default_rng(5)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), img)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.float32("scale" in str(path[-1])) + 0.3 * rng.normal(size=x.shape).astype(np.float32), shapes
    )
    scales = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, DropPath):
            jax.debug.callback(lambda y: scales.append(np.asarray(y)), out, ordered=True)
        return out

    with nn.intercept_methods(interceptor):
        logits, feats = model.apply(
            {"params": params}, img, train=True, return_features=True, rngs={"dropout": jax.random.PRNGKey(3)}
        )
    jax.effects_barrier()
    expected = drop_path_rates(rate, depth, schedule)
    np.testing.assert_allclose(expected, [rate] * 3 if schedule == "constant" else [0.0, 0.2, 0.4], rtol=1e-6)
    assert len(scales) == 2 * depth and all(s.shape == (2, batch) for s in scales)
    for layer, want in enumerate(expected):
        for s in scales[2 * layer : 2 * layer + 2]:  # attention, then MLP branches
            kept = s[s > 0]
            np.testing.assert_allclose(kept, 1.0 / (1.0 - want), rtol=1e-6)
            assert (s > 0).all() if want == 0 else (s == 0).any()
    per_layer = [(scales[2 * i], scales[2 * i + 1]) for i in range(depth)]
    ref_logits, ref_layers = reference_forward(
        params, img, patch=4, heads=4, path_scales=[s for pair in per_layer for s in pair]
    )
    np.testing.assert_allclose(np.asarray(feats["layers"]), ref_layers, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=2e-4, atol=2e-4)
    # Evaluation applies no drop path, whatever the schedule.
    np.testing.assert_allclose(
        np.asarray(model.apply({"params": params}, img)),
        reference_forward(params, img, patch=4, heads=4)[0],
        rtol=2e-4,
        atol=2e-4,
    )


def test_parallel_and_sequential_vit_s_have_equal_parameter_counts():
    img = jnp.zeros((1, 224, 224, 3))
    counts = {}
    for depth, branches in [(18, 2), (36, 1)]:
        model = ViT(
            image_size=224,
            patch_size=16,
            num_classes=1000,
            dim=384,
            depth=depth,
            heads=6,
            mlp_dim=1536,
            num_parallel_branches=branches,
            layer_scale_init=1e-5,
        )
        counts[depth] = n_params(jax.eval_shape(model.init, jax.random.PRNGKey(0), img))
    assert counts[18] == counts[36] == 64_665_064  # the official DeiT count of ViT-S 18x2 / 36x1 with LayerScale


def test_stem_parameter_counts_match_paper():
    # Paper §5: ~750k parameters for the hMLP stem of ViT-B vs 591k for the linear one.
    img = jnp.zeros((1, 224, 224, 3))
    counts = {}
    for stem in ("linear", "hmlp"):
        m = get_stem(stem)(dim=768, patch_size=16)
        counts[stem] = n_params(jax.eval_shape(m.init, jax.random.PRNGKey(0), img))
    assert counts["linear"] == 16 * 16 * 3 * 768 + 768 == 590_592
    assert counts["hmlp"] == 749_952


def test_hmlp_factorisation():
    assert hmlp_factors(16) == [4, 2, 2]
    assert hmlp_factors(8) == [2, 2, 2]
    assert hmlp_factors(4) == [2, 2]
    assert hmlp_factors(32) == [8, 2, 2]
    with pytest.raises(ConfigError, match="patch_size=6"):
        hmlp_factors(6)


def _stem_response(stem, norm, changed_patch=(1, 1)):
    """Which patches' stem embeddings change when one patch's pixels change (eval mode)."""
    m = get_stem(stem)(dim=32, patch_size=4, norm=norm)
    img = images(1, 16)
    variables = m.init(jax.random.PRNGKey(0), img)
    if "batch_stats" in variables:  # non-trivial running statistics
        variables = {**variables, "batch_stats": jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])}
    i, j = changed_patch
    img2 = img.at[:, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4, :].add(3.0)
    diff = jnp.abs(m.apply(variables, img2) - m.apply(variables, img)).max(-1)[0]
    return np.asarray(diff > 1e-6)


@pytest.mark.parametrize("stem,norm", [("linear", "batch"), ("hmlp", "batch"), ("hmlp", "layer")])
def test_patch_stems_do_not_mix_patches(stem, norm):
    changed = _stem_response(stem, norm)
    expected = np.zeros((4, 4), bool)
    expected[1, 1] = True
    np.testing.assert_array_equal(changed, expected)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_conv_stem_mixes_neighbouring_patches(norm):
    changed = _stem_response("conv", norm)
    assert changed[1, 1]
    assert changed.sum() > 1  # a neighbour's embedding changed too
    assert changed[1, 2] or changed[2, 1] or changed[0, 1] or changed[1, 0]


@pytest.mark.parametrize("stem", ["linear", "hmlp"])
def test_mask_token_hides_masked_pixels(stem):
    model = tiny(stem=stem, stem_norm="layer", use_mask_token=True)
    img = images()
    mask = jnp.zeros((2, 16), bool).at[:, 5].set(True)
    variables = model.init(jax.random.PRNGKey(0), img, mask=mask)
    assert variables["params"]["mask_token"].shape == (1, 1, 32)
    img2 = img.at[:, 4:8, 4:8, :].add(5.0)  # patch 5 = grid (1, 1)
    out1 = model.apply(variables, img, mask=mask)
    out2 = model.apply(variables, img2, mask=mask)
    np.testing.assert_allclose(out1, out2, atol=1e-6)
    out3 = model.apply(variables, img2)  # unmasked: the change is seen
    assert not np.allclose(out1, out3, atol=1e-3)


def test_mask_without_mask_token_is_rejected():
    model = tiny()
    img = images()
    variables = model.init(jax.random.PRNGKey(0), img)
    with pytest.raises(ConfigError, match="use_mask_token"):
        model.apply(variables, img, mask=jnp.zeros((2, 16), bool))


def test_emb_dropout_uses_its_own_rng_stream_and_eval_is_deterministic():
    model = tiny(emb_dropout=0.3)  # no other dropout: only the emb_dropout stream matters
    img = images()
    variables = model.init(jax.random.PRNGKey(0), img)

    def run(emb_key, drop_key=0):
        rngs = {"emb_dropout": jax.random.PRNGKey(emb_key), "dropout": jax.random.PRNGKey(drop_key)}
        return np.asarray(model.apply(variables, img, train=True, rngs=rngs))

    assert not np.allclose(run(1), run(2))
    np.testing.assert_array_equal(run(1, 0), run(1, 5))  # 'dropout' stream unused when dropout=drop_path=0
    np.testing.assert_array_equal(run(3), run(3))
    with pytest.raises(Exception):
        model.apply(variables, img, train=True)  # train mode needs the rng it uses
    # Evaluation: deterministic, needs no rng, ignores any that are passed.
    ev1 = model.apply(variables, img)
    ev2 = model.apply(variables, img, rngs={"emb_dropout": jax.random.PRNGKey(9)})
    np.testing.assert_array_equal(ev1, ev2)


def test_dropout_and_drop_path_are_train_only_and_unbiased():
    model = tiny(dropout=0.0, drop_path=0.5, num_parallel_branches=2, layer_scale_init=0.5)
    img = images(1)
    variables = model.init(jax.random.PRNGKey(0), img)
    evaluated = model.apply(variables, img, return_features=True)[1]["layers"][0]

    # The first layer's update, averaged over many drop-path draws, equals the eval-mode update (1/keep scaling).
    def first_layer(key):
        return model.apply(variables, img, train=True, return_features=True, rngs={"dropout": key, "emb_dropout": key})[
            1
        ]["layers"][0]

    draws = jax.vmap(first_layer)(jax.random.split(jax.random.PRNGKey(1), 400))
    assert float(jnp.abs(draws[0] - draws[1]).max()) > 1e-3  # stochastic in train mode
    x0 = model.apply(variables, img, return_features=True)[1]["layers"][0] - evaluated  # zeros, shape helper
    del x0
    err = jnp.abs(draws.mean(0) - evaluated).mean() / jnp.abs(evaluated).mean()
    assert float(err) < 0.05


def test_resize_pos_embedding():
    pe = jax.random.normal(jax.random.PRNGKey(0), (1, 1 + 8 * 8, 16))
    out = resize_pos_embedding(pe, (12, 12), num_extra_tokens=1)
    assert out.shape == (1, 1 + 144, 16)
    np.testing.assert_array_equal(out[:, 0], pe[:, 0])  # class token kept
    np.testing.assert_array_equal(resize_pos_embedding(pe, (8, 8), num_extra_tokens=1), pe)
    # Smoothness: a linear ramp over the grid stays a ramp (bicubic is exact on linear functions inside).
    ramp = jnp.broadcast_to(jnp.arange(8.0)[:, None, None], (8, 8, 1)).reshape(1, 64, 1)
    up = resize_pos_embedding(ramp, (16, 16)).reshape(16, 16)
    assert np.all(np.diff(np.asarray(up[:, 5])) > 0)
    rect = resize_pos_embedding(pe[:, 1:], (4, 6), old_grid=(8, 8))
    assert rect.shape == (1, 24, 16)


def test_model_trained_at_one_resolution_loads_at_another():
    small, large = tiny(image_size=16), tiny(image_size=24)
    variables = small.init(jax.random.PRNGKey(0), images(1, 16))
    params = dict(variables["params"])
    params["pos_embedding"] = resize_pos_embedding(params["pos_embedding"], large.grid_size)
    out = large.apply({"params": params}, images(2, 24))
    assert out.shape == (2, 10) and np.all(np.isfinite(out))


def test_bfloat16_forward_is_finite_and_close_to_float32():
    img = images(2, 32)
    f32 = tiny(image_size=32, stem="hmlp", stem_norm="layer", num_parallel_branches=2)
    bf16 = tiny(image_size=32, stem="hmlp", stem_norm="layer", num_parallel_branches=2, dtype=jnp.bfloat16)
    variables = f32.init(jax.random.PRNGKey(0), img)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.init(jax.random.PRNGKey(0), img)))
    _, a = f32.apply(variables, img, return_features=True)
    _, b = bf16.apply(variables, img, return_features=True)
    a, b = np.asarray(a["tokens"]), np.asarray(b["tokens"], np.float32)
    assert np.all(np.isfinite(b))
    assert np.abs(a - b).mean() / np.abs(a).mean() < 0.03


def test_features_pooling_and_headless_model():
    img = images()
    model = tiny(num_classes=0, pool="mean")
    variables = model.init(jax.random.PRNGKey(0), img)
    out, feats = model.apply(variables, img, return_features=True)
    assert out.shape == (2, 32)
    np.testing.assert_allclose(out, feats["tokens"][:, 1:].mean(1), rtol=1e-6)
    assert feats["layers"].shape == (3, 2, 17, 32)


def test_remat_and_sincos_give_same_shapes_and_remat_same_values():
    img = images()
    base, remat = tiny(), tiny(remat=True)
    variables = base.init(jax.random.PRNGKey(0), img)
    np.testing.assert_allclose(base.apply(variables, img), remat.apply(variables, img), rtol=1e-6)
    sincos = tiny(pos_embedding="sincos")
    v2 = sincos.init(jax.random.PRNGKey(0), img)
    assert "pos_embedding" not in v2["params"]


def test_remat_saves_activation_memory_also_with_unroll_layers():
    """remat must keep its memory saving when the config also asks for unrolled layers (the tiny preset does):
    XLA's temporary memory of the gradient, per compiled program."""
    img = images(n=16, size=32)

    def temp_bytes(**kw):
        model = tiny(image_size=32, depth=4, dim=64, mlp_dim=256, **kw)
        variables = model.init(jax.random.PRNGKey(0), img[:1])
        grad = jax.jit(
            jax.grad(
                lambda p: jnp.sum(
                    model.apply({**variables, "params": p}, img, train=True, mutable=["batch_stats"])[0] ** 2
                )
            )
        )
        return grad.lower(variables["params"]).compile().memory_analysis().temp_size_in_bytes

    plain, remat = temp_bytes(unroll_layers=True), temp_bytes(unroll_layers=True, remat=True)
    assert remat < 0.6 * plain, (remat, plain)


def test_unrolled_layers_are_the_same_model():
    """unroll_layers changes how the layers compile, not the parameters or the maths: the same variables give the
    same outputs, per-layer features and gradients (in training mode, with drop path drawing the same masks)."""
    img = images()
    kw = dict(num_parallel_branches=2, drop_path=0.2, layer_scale_init=0.1)
    scanned, unrolled = tiny(**kw), tiny(unroll_layers=True, **kw)
    variables = scanned.init(jax.random.PRNGKey(0), img)
    assert jax.tree.structure(variables) == jax.tree.structure(unrolled.init(jax.random.PRNGKey(0), img))
    out_s, f_s = scanned.apply(variables, img, return_features=True)
    out_u, f_u = unrolled.apply(variables, img, return_features=True)
    np.testing.assert_allclose(out_u, out_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f_u["layers"], f_s["layers"], rtol=1e-5, atol=1e-6)

    def loss(model):
        def f(params):
            out = model.apply(
                {**variables, "params": params},
                img,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.PRNGKey(1)},
            )[0]
            return jnp.sum(out**2)

        return jax.jit(jax.value_and_grad(f))(variables["params"])

    (l_s, g_s), (l_u, g_u) = loss(scanned), loss(unrolled)
    np.testing.assert_allclose(l_u, l_s, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_u, g_s)
    with pytest.raises(ConfigError, match="unroll_layers='yes' must be true or false"):
        tiny(unroll_layers="yes")


def test_fused_attention_kernel_equals_the_explicit_path():
    """attention="xla" (jax.nn.dot_product_attention, the function the cuDNN kernel implements on GPU) gives the
    explicit path's outputs and gradients, with 1 and 2 branches: float32 to rounding, bfloat16 within its
    precision. (One jitted program for all cases: compiles dominate this test.)"""
    img = images()
    cases = {
        (p, name): dict(num_parallel_branches=p, layer_scale_init=0.1, drop_path=0.2, dtype=dtype, heads=2, depth=2)
        for p in (1, 2)
        for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))
    }
    params = {p: jax.jit(tiny(**cases[(p, "float32")]).init)(jax.random.PRNGKey(0), img)["params"] for p in (1, 2)}

    def value_and_grad(model, p):
        def f(params):
            out = model.apply({"params": params}, img, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
            return jnp.sum(out.astype(jnp.float32) ** 2), out.astype(jnp.float32)

        return jax.value_and_grad(f, has_aux=True)(p)

    results = jax.jit(
        lambda prm: {
            key: [value_and_grad(tiny(attention=impl, **kw), prm[key[0]]) for impl in ("explicit", "xla")]
            for key, kw in cases.items()
        }
    )(params)
    for (p, dtype), (((loss_e, out_e), g_e), ((loss_f, out_f), g_f)) in results.items():
        tol = 2e-5 if dtype == "float32" else 3e-2
        msg = f"{p} branches, {dtype}"
        np.testing.assert_allclose(out_f, out_e, atol=tol * float(np.abs(out_e).max()), err_msg=msg)
        np.testing.assert_allclose(loss_f, loss_e, rtol=tol, err_msg=msg)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_f), jax.tree.leaves(g_e)):
            np.testing.assert_allclose(a, b, atol=tol * float(np.abs(b).max()) + 1e-12, err_msg=f"{msg} {path}")
    # On this CPU backend "auto" is the explicit path (the same program), and cuDNN is a clear error.
    if jax.default_backend() == "cpu":
        kw = cases[(2, "bfloat16")]

        def lowered(attention):
            model = tiny(attention=attention, **kw)
            return jax.jit(lambda prm: model.apply({"params": prm}, img)).lower(params[2]).as_text()

        assert lowered("auto") == lowered("explicit")
        with pytest.raises(ConfigError, match="model.attention=cudnn needs a CUDA GPU"):
            lowered("cudnn")


def test_remat_policy_saving_matmuls_keeps_values_and_uses_more_memory_than_full_remat():
    img = images(n=16, size=32)
    kw = dict(image_size=32, depth=4, dim=64, mlp_dim=256, remat=True)
    full, dots = tiny(**kw), tiny(remat_policy="dots_with_no_batch_dims_saveable", **kw)
    variables = jax.jit(full.init)(jax.random.PRNGKey(0), img[:1])

    compiled = {
        name: jax.jit(jax.grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, img) ** 2)))
        .lower(variables["params"])
        .compile()
        for name, m in (("full", full), ("dots", dots))
    }
    g_full, g_dots = (compiled[name](variables["params"]) for name in ("full", "dots"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_dots, g_full)
    temp = {name: c.memory_analysis().temp_size_in_bytes for name, c in compiled.items()}
    assert temp["dots"] > temp["full"], temp
    with pytest.raises(ConfigError, match="remat_policy=dots_saveable has no effect without remat=true"):
        tiny(remat_policy="dots_saveable")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image_size=18), "image_size=18 is not divisible by patch_size=4"),
        (dict(dim=30, heads=4), "dim=30 is not divisible by heads=4"),
        (dict(num_parallel_branches=0), "num_parallel_branches"),
        (dict(stem="resnet"), "stem.name='resnet' is not a stem: choose one of conv, hmlp, linear"),
        (dict(stem="hmlp", patch_size=2, image_size=16), "patch_size=2 cannot be factored by the hmlp stem"),
        (dict(pool="max"), "pool='max'"),
        (dict(drop_path=1.0), "drop_path=1.0"),
        (dict(stem="hmlp", stem_norm="group"), "stem.norm='group' must be one of batch, layer"),
        (dict(attention="flash"), "attention='flash' must be one of auto, explicit, xla, cudnn"),
        (dict(remat=True, remat_policy="everything"), "remat_policy='everything' must be one of nothing_saveable"),
    ],
)
def test_bad_arguments_raise_clear_errors_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kwargs)
