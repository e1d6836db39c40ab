"""The shared train step and optimiser: accumulation, non-finite guard, frozen leaves, layer decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import OmegaConf

from sslvit import ConfigError
from sslvit.finetune_modes import make_mode, partition, trainable_paths
from sslvit.models import ViT
from sslvit.optim import decay_mask, layer_decay_scales, make_optimizer
from sslvit.train import TrainState, make_train_step

OPTIM = OmegaConf.create(
    dict(
        lr=1e-3,
        min_lr=0.0,
        warmup_steps=2,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.05,
        clip_grad_norm=3.0,
        layer_decay=None,
        accum_steps=1,
    )
)


def small_vit(**kw):
    return ViT(
        image_size=8, patch_size=4, num_classes=5, dim=16, depth=2, heads=2, mlp_dim=32, num_parallel_branches=2, **kw
    )


def classification_loss(model):
    def loss_fn(params, batch_stats, batch, rng, consts):
        logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng, "emb_dropout": rng})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, ({"accuracy": (logits.argmax(-1) == batch["label"]).mean()}, batch_stats)

    return loss_fn


def setup(mode="full", **kw):
    model = small_vit(**kw)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    trainable, frozen = partition(params, make_mode(mode))
    opt, sched = make_optimizer(OPTIM, trainable, total_steps=10)
    state = TrainState.create(trainable, frozen, {}, opt)
    batch = {"image": jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 3)), "label": jnp.arange(8) % 5}
    return model, opt, sched, state, batch


def test_gradient_accumulation_matches_full_batch():
    model, opt, sched, state, batch = setup()
    full = jax.jit(make_train_step(classification_loss(model), opt, seed=0))
    accum = jax.jit(make_train_step(classification_loss(model), opt, seed=0, accum_steps=4))
    s1, m1 = full(state, batch)
    s2, m2 = accum(state, batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nonfinite_step_is_skipped_and_counted():
    model, opt, sched, state, batch = setup()
    step = jax.jit(make_train_step(classification_loss(model), opt, seed=0))
    bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
    s1, m1 = step(state, bad)
    assert int(s1.nonfinite_total) == 1 and int(s1.nonfinite_streak) == 1 and int(s1.step) == 1
    for a, b in zip(jax.tree.leaves((s1.params, s1.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)
    s2, _ = step(s1, bad)
    assert int(s2.nonfinite_streak) == 2
    s3, _ = step(s2, batch)  # a good step applies and resets the streak, not the total
    assert int(s3.nonfinite_streak) == 0 and int(s3.nonfinite_total) == 2
    assert not np.allclose(jax.tree.leaves(s3.params)[0], jax.tree.leaves(state.params)[0])


def test_same_seed_same_result_and_dropout_depends_on_step():
    model, opt, sched, state, batch = setup(drop_path=0.3)
    step = jax.jit(make_train_step(classification_loss(model), opt, seed=3))
    a, ma = step(state, batch)
    b, mb = step(state, batch)
    np.testing.assert_array_equal(ma["loss"], mb["loss"])
    other = jax.jit(make_train_step(classification_loss(model), opt, seed=4))
    _, mc = other(state, batch)
    assert float(ma["loss"]) != float(mc["loss"])  # drop-path masks come from the seed


def test_frozen_leaves_get_no_optimizer_state_and_stay_bitwise():
    model, opt, sched, state, batch = setup(mode="attn_only")
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_train = sum(x.size for x in jax.tree.leaves(state.params))
    assert n_state <= 2 * n_train + 8  # Adam's two moments of the trainable leaves only (+ counters)
    step = jax.jit(make_train_step(classification_loss(model), opt, seed=0))
    s = state
    for _ in range(3):
        s, _ = step(s, batch)
    for a, b in zip(jax.tree.leaves(s.frozen), jax.tree.leaves(state.frozen)):
        np.testing.assert_array_equal(a, b)
    qkv0, qkv1 = state.params["layers"]["attn"]["qkv_kernel"], s.params["layers"]["attn"]["qkv_kernel"]
    for branch in range(2):  # both parallel branches train (the official code's name filter froze 'attn1')
        assert not np.allclose(qkv0[:, branch], qkv1[:, branch])


def test_attn_only_selects_exactly_attention_head_and_pos_embedding():
    params = small_vit().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    assert trainable_paths(params, "attn_only") == [
        "head/bias",
        "head/kernel",
        "layers/attn/out_bias",
        "layers/attn/out_kernel",
        "layers/attn/qkv_bias",
        "layers/attn/qkv_kernel",
        "pos_embedding",
    ]
    assert "layers/mlp/fc1_kernel" in trainable_paths(params, "mlp_only")
    assert trainable_paths(params, "head_only") == ["head/bias", "head/kernel"]


def test_weight_decay_mask_and_layer_decay_scales():
    params = small_vit(layer_scale_init=0.1).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    mask = decay_mask(params)
    assert mask["layers"]["attn"]["qkv_kernel"] and mask["head"]["kernel"] and mask["stem"]["proj"]["kernel"]
    for leaf in (
        mask["layers"]["attn"]["norm_scale"],
        mask["layers"]["mlp"]["fc1_bias"],
        mask["pos_embedding"],
        mask["cls_token"],
        mask["layers"]["attn"]["layer_scale"],
        mask["norm"]["scale"],
    ):
        assert not leaf
    scales = layer_decay_scales(params, depth=2, decay=0.5)
    assert float(scales["head"]["kernel"]) == 1.0
    assert float(scales["pos_embedding"]) == 0.5**3  # embedding: decay^(L+1)
    per_layer = np.asarray(scales["layers"]["attn"]["qkv_kernel"]).reshape(-1)
    np.testing.assert_allclose(per_layer, [0.5**2, 0.5**1])  # layer i (1-based) gets decay^(L+1-i)


def test_layer_decay_scales_the_update_per_layer():
    model, _, _, state, batch = setup()
    cfg = OPTIM.copy()
    cfg.layer_decay = 0.5
    cfg.weight_decay = 0.0
    cfg.clip_grad_norm = None
    opt, _ = make_optimizer(cfg, state.params, total_steps=10, depth=2)
    opt_ref, _ = make_optimizer(dict(cfg, layer_decay=None), state.params, total_steps=10, depth=2)
    g = jax.tree.map(jnp.ones_like, state.params)
    u, _ = opt.update(g, opt.init(state.params), state.params)
    r, _ = opt_ref.update(g, opt_ref.init(state.params), state.params)
    ratio = u["layers"]["mlp"]["fc1_kernel"] / r["layers"]["mlp"]["fc1_kernel"]
    np.testing.assert_allclose(np.asarray(ratio[:, 0, 0, 0]), [0.25, 0.5], rtol=1e-5)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("lr", -1.0, "optim.lr=-1.0"),
        ("lr", "fast", "optim.lr='fast'"),
        ("layer_decay", 1.5, "optim.layer_decay"),
        ("accum_steps", 0, "optim.accum_steps"),
        ("clip_grad_norm", 0, "optim.clip_grad_norm"),
    ],
)
def test_bad_optimizer_config(key, value, match):
    cfg = dict(OPTIM, **{key: value})
    with pytest.raises(ConfigError, match=match):
        make_optimizer(OmegaConf.create(cfg), {"w": jnp.zeros(2)}, total_steps=10)


def test_device_prefetcher_close_stops_its_thread_and_closes_the_host_iterator():
    """`close()` returns only once the input thread has ended and the host iterator (a generator over an endless
    pipeline) was closed in it: nothing of the input pipeline runs on while the process exits. Batches arrive in
    order and an error of the host iterator reaches the consumer."""
    from sslvit.train import batch_sharding, make_mesh, prefetch_to_device

    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield {"x": np.full((8, 2), i, np.float32)}
                i += 1
        finally:
            closed.append(True)

    sharding = batch_sharding(make_mesh())
    batches = prefetch_to_device(endless(), sharding)
    assert [float(next(batches)["x"][0, 0]) for _ in range(5)] == [0, 1, 2, 3, 4]
    batches.close()
    assert closed == [True] and not batches._thread.is_alive()
    with pytest.raises(StopIteration):
        next(batches)

    def failing():
        yield {"x": np.zeros((8, 2), np.float32)}
        raise ValueError("image 7 cannot be decoded")

    with prefetch_to_device(failing(), sharding) as batches:
        next(batches)
        with pytest.raises(ValueError, match="image 7"):
            next(batches)
    assert not batches._thread.is_alive()
