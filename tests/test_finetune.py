"""Fine-tuning: attention-only trains exactly the attention of every branch and nothing else, frozen weights cost
no optimiser state and less memory, Mixup/CutMix, a 32 px checkpoint fine-tuned at 48 px, and the bad inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sslvit.errors import ConfigError
from sslvit.finetune import Finetuning
from sslvit.finetune_modes import FINETUNE_MODES, trainable_paths
from sslvit.mixup import mix_batch, smooth_one_hot
from sslvit.models import resize_pos_embedding
from sslvit.models.vit import branch_axis
from sslvit.pretrained import load_into
from sslvit.stage import count_params
from sslvit.train import memory_report

# A small parallel ViT trained from scratch on synthetic batches: 2 layers x 2 branches, hMLP stem with BatchNorm,
# LayerScale: every kind of leaf a real model has. No dataset needed (data.num_classes is set by the cifar10 group).
SMALL = [
    "run=null",
    "model.dim=32",
    "model.depth=2",
    "model.heads=2",
    "model.mlp_dim=64",
    "model.image_size=16",
    "batch_size=8",
    "steps=3",
    "optim.warmup_steps=0",
    "optim.lr=1e-2",
]

ATTN_ONLY = [
    "head/bias",
    "head/kernel",
    "layers/attn/out_bias",
    "layers/attn/out_kernel",
    "layers/attn/qkv_bias",
    "layers/attn/qkv_kernel",
    "pos_embedding",
]


def synthetic_batch(n=8, size=16, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.normal(size=(n, size, size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, classes, n), jnp.int32),
    }


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def test_attn_only_trains_exactly_every_branch_attention(hydra_compose):
    from sslvit.train import make_mesh

    mesh = make_mesh()
    ft = Finetuning(hydra_compose("finetune", SMALL + ["finetune.mode=attn_only"]), None)
    variables = ft.init_variables()
    state, step = ft.build(mesh, 3, variables=ft.split(*variables))
    assert sorted(flat(state.params)) == ATTN_ONLY
    assert trainable_paths(state.all_params(), "attn_only") == ATTN_ONLY
    # The optimiser keeps state (Adam's two moments) for the trainable leaves only.
    moments = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert moments == 2 * count_params(state.params) < 2 * count_params(state.all_params())

    compiled = step.lower(state, ft.abstract_batch(mesh), None).compile()
    before = flat(state.all_params())
    batch = jax.device_put(synthetic_batch(), ft.abstract_batch(mesh)["image"].sharding)
    for _ in range(3):
        state, metrics = compiled(state, batch, None)
    assert np.isfinite(float(metrics["loss"]))
    after = flat(state.all_params())
    assert before.keys() == after.keys()
    for name in before:
        if name in ATTN_ONLY:
            assert not np.array_equal(before[name], after[name]), f"{name} did not train"
            if name.startswith("layers/"):  # (depth, ...): every layer's every branch trained
                for layer in range(2):
                    for branch in range(2):
                        b0, b1 = (
                            np.take(x[layer], branch, axis=branch_axis(name)) for x in (before[name], after[name])
                        )
                        assert not np.array_equal(b0, b1), f"{name} layer {layer} branch {branch} did not train"
        else:
            assert np.array_equal(before[name], after[name]), f"frozen {name} changed"

    # No weight gradient and no optimiser state for frozen leaves: XLA's memory analysis of the compiled step
    # shows smaller buffers than full fine-tuning of the same model.
    full = Finetuning(hydra_compose("finetune", SMALL + ["finetune.mode=full"]), None)
    full_state, full_step = full.build(mesh, 3, variables=full.split(*variables))
    mem_full = memory_report(full_step.lower(full_state, full.abstract_batch(mesh), None).compile())
    mem_attn = memory_report(compiled)
    if mem_full:
        assert mem_attn["argument"] < mem_full["argument"]
        assert mem_attn["peak"] < mem_full["peak"]


def test_modes_select_the_intended_leaves(hydra_compose):
    ft = Finetuning(hydra_compose("finetune", SMALL), None)
    shape = (1, 16, 16, 3)
    params = jax.eval_shape(ft.model.init, jax.random.key(0), jnp.zeros(shape))["params"]
    every = sorted(flat(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)))
    expected = {
        "full": every,
        "attn_only": ATTN_ONLY,
        "mlp_only": [
            "head/bias",
            "head/kernel",
            "layers/mlp/fc1_bias",
            "layers/mlp/fc1_kernel",
            "layers/mlp/fc2_bias",
            "layers/mlp/fc2_kernel",
            "pos_embedding",
        ],
        "head_only": ["head/bias", "head/kernel"],
    }
    assert set(expected) == set(FINETUNE_MODES.names())
    for mode, paths in expected.items():
        assert trainable_paths(params, mode) == paths, mode


def test_mixup_and_cutmix_mix_images_and_targets_alike():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
    targets = smooth_one_hot(jnp.arange(4), 4, 0.0)
    same = mix_batch(jax.random.key(0), images, targets, mixup_alpha=0.0, cutmix_alpha=0.0)
    assert same[0] is images and same[1] is targets
    for seed in range(5):
        out, t = mix_batch(jax.random.key(seed), images, targets, mixup_alpha=0.0, cutmix_alpha=1.0)
        out, t = np.asarray(out), np.asarray(t)
        # CutMix: each pixel comes from the image or its partner (the reversed batch); the target weight of the
        # partner is exactly the fraction of pasted pixels.
        from_partner = np.all(out == np.asarray(images)[::-1], axis=-1) & ~np.all(out == np.asarray(images), -1)
        np.testing.assert_allclose(t[0, 3], from_partner[0].mean(), atol=1e-6)
        np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-6)
        out, t = mix_batch(jax.random.key(seed), images, targets, mixup_alpha=0.8, cutmix_alpha=0.0)
        lam = float(t[0, 0])
        np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], atol=1e-5)
    smooth = np.asarray(smooth_one_hot(jnp.array([1]), 10, 0.1))
    np.testing.assert_allclose(smooth[0, 1], 0.91, atol=1e-6)


def test_load_into_rejects_another_model():
    template = {"pos_embedding": np.zeros((1, 4, 8)), "layers": {"w": np.zeros((2, 8))}, "head": {"k": np.zeros(3)}}
    ok = {"pos_embedding": np.ones((1, 4, 8)), "layers": {"w": np.ones((2, 8))}, "mask_token": np.ones((1, 1, 8))}
    out = load_into(template, ok, old_grid=(2, 2), new_grid=(2, 2), where="x")
    assert np.array_equal(out["layers"]["w"], np.ones((2, 8))) and np.array_equal(out["head"]["k"], np.zeros(3))
    with pytest.raises(ConfigError, match="layers/w has shape .* another model config"):
        load_into(template, dict(ok, layers={"w": np.ones((3, 8))}), old_grid=(2, 2), new_grid=(2, 2), where="x")
    with pytest.raises(ConfigError, match="has no parameter layers/w"):
        load_into(template, {"pos_embedding": ok["pos_embedding"]}, old_grid=(2, 2), new_grid=(2, 2), where="x")


# ---------------------------------------------------------------------------------------- with a real run
def _ft_overrides(run, *extra):
    return [
        f"run={run}",
        "data.train_split='train[:256]'",
        "data.test_split='test[:128]'",
        "batch_size=32",
        "steps=3",
        "log_every=1",
        "ckpt_every=3",
        "optim.warmup_steps=1",
        "progress=false",
        *extra,
    ]


def test_finetune_32px_checkpoint_at_48px(pretrain_run, hydra_compose, tmp_path):
    from sslvit.checkpoint import load_meta, load_params

    overrides = _ft_overrides(
        pretrain_run,
        "finetune.image_size=48",
        "finetune.mode=attn_only",
        "finetune.mixup_alpha=0.8",
        "finetune.cutmix_alpha=1.0",
    )
    ft = Finetuning(hydra_compose("finetune", overrides), tmp_path, overrides)
    assert ft.model.grid_size == (12, 12) and ft.source_image_size == 32
    saved = load_params(pretrain_run)[0]["encoder"]
    params, stats = ft.init_variables()
    np.testing.assert_allclose(
        np.asarray(params["pos_embedding"]),
        np.asarray(resize_pos_embedding(saved["pos_embedding"], (12, 12), (8, 8))),
        atol=1e-6,
    )
    assert params["pos_embedding"].shape == (1, 144, 64)
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["mlp"]["fc1_kernel"]), saved["layers"]["mlp"]["fc1_kernel"]
    )
    assert "mask_token" not in params and stats  # pretext-only leaf dropped; hMLP BatchNorm statistics loaded

    results = ft.run()
    assert results["image_size"] == 48 and results["source_image_size"] == 32
    assert 0.0 <= results["test_top1"] <= 1.0 and results["test_examples"] == 128
    assert np.isfinite(results["train_loss"])
    assert 0 < results["trainable_params"] < results["total_params"]
    assert results["peak_memory_bytes"] > 0 and results["step_time_s"] > 0
    meta = load_meta(tmp_path)
    assert meta["stage"] == "finetune" and meta["encoder"]["model"]["image_size"] == 48 and meta["mode"] == "attn_only"
    assert (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["finetune.mode=attention"],
            r"finetune.mode='attention' is not a fine-tune mode: choose one of attn_only, full",
        ),
        (["finetune/mode=attn_only", "finetune.mode.head=yes"], r"finetune.mode.head='yes' must be true or false"),
        (
            ["finetune/mode=attn_only", "+finetune.mode.heads=false"],
            r"finetune.mode.heads is not an option of fine-tune mode 'attn_only'",
        ),
        (["finetune.image_size=50"], r"finetune.image_size=50 is not divisible by the patch size 4"),
        (["model.dim=128"], r"model.dim=128 conflicts with the checkpoint's model.dim=64"),
        (["stem=linear"], r"stem.name='linear' conflicts with the checkpoint's stem.name='hmlp'"),
        (["model.image_size=48"], r"set finetune.image_size=48"),
        (["step=7"], r"step=7 is not a checkpoint"),
    ],
)
def test_bad_input_one_line(overrides, match, pretrain_run, hydra_compose, tmp_path):
    overrides = _ft_overrides(pretrain_run, *overrides)
    with pytest.raises(ConfigError, match=match) as err:
        Finetuning(hydra_compose("finetune", overrides), tmp_path, overrides)
    assert "\n" not in str(err.value)


def test_run_dir_without_checkpoint(hydra_compose, tmp_path):
    with pytest.raises(ConfigError, match=r"run is not set: .* or run=null to train from scratch"):
        Finetuning(hydra_compose("finetune", []), tmp_path / "out")  # run: ??? must not mean "from scratch"
    (tmp_path / "empty").mkdir()
    for run, match in ((tmp_path / "empty", "holds no checkpoint"), (tmp_path / "missing", "does not exist")):
        overrides = [f"run={run}"]
        with pytest.raises(ConfigError, match=match) as err:
            Finetuning(hydra_compose("finetune", overrides), tmp_path / "out", overrides)
        assert "\n" not in str(err.value)
