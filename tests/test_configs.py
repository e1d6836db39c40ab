"""Every shipped config composes and passes validation (cheap: nothing is trained or read)."""

from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_config

from sslvit.pretraining import Pretraining

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_recipes_compose_and_validate(experiment):
    cfg = compose_config("pretrain", [f"experiment={experiment}"])
    Pretraining(cfg, "/tmp/unused")  # validates the model, mask, target, optimiser and data config


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stem", ["linear", "conv", "hmlp"])
def test_every_model_preset_builds_with_every_stem(model, stem):
    cfg = compose_config("pretrain", [f"model={model}", f"stem={stem}"])
    p = Pretraining(cfg, "/tmp/unused")
    assert p.encoder.stem == stem


def test_sequential_presets_have_the_parameters_of_their_parallel_twins():
    for par, seq in (("tiny", "tiny_seq"), ("small", "small_seq"), ("base", "base_seq")):
        a = compose_config("pretrain", [f"model={par}"]).model
        b = compose_config("pretrain", [f"model={seq}"]).model
        assert a.depth * a.num_parallel_branches == b.depth * b.num_parallel_branches
        assert (a.dim, a.mlp_dim, a.heads) == (b.dim, b.mlp_dim, b.heads)


def test_paper_recipe_values():
    cfg = compose_config("pretrain", ["experiment=imagenet_b18x2"])
    assert (cfg.model.depth, cfg.model.num_parallel_branches, cfg.model.dim) == (18, 2, 768)
    assert cfg.stem.name == "hmlp" and cfg.data.name == "imagenet2012" and cfg.batch_size == 2048
    assert cfg.optim.clip_grad_norm == 3.0 and cfg.optim.weight_decay == 0.05
