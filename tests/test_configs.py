"""Every shipped config composes and passes validation (cheap: nothing is trained or read)."""

import pytest
from conftest import CONF_DIR, compose_config

from sslvit.pretraining import Pretraining

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
FINETUNE_EXPERIMENTS = [e for e in EXPERIMENTS if e.endswith("_finetune")]  # recipes of finetune.py
PRETRAIN_EXPERIMENTS = [e for e in EXPERIMENTS if e not in FINETUNE_EXPERIMENTS]
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("experiment", PRETRAIN_EXPERIMENTS)
def test_experiment_recipes_compose_and_validate(experiment):
    cfg = compose_config("pretrain", [f"experiment={experiment}"])
    p = Pretraining(cfg, None)  # validates the model, mask, target, optimiser and data config
    assert p.config.steps == cfg.steps and p.encoder.stem == cfg.stem.name and p.target.name == cfg.target.name


@pytest.mark.parametrize("experiment", FINETUNE_EXPERIMENTS)
def test_finetune_recipes_compose_and_validate(experiment):
    from sslvit.finetune import Finetuning

    f = Finetuning(compose_config("finetune", [f"experiment={experiment}", "run=null"]), None)
    assert f.config.steps > 0 and f.model.drop_path_schedule == f.config.model.drop_path_schedule


def test_cifar10_recipes_fine_tune_from_scratch_the_architecture_they_pretrain():
    """The from-scratch baseline of the evidence (experiments/cifar10_evidence.py) is the pretrained encoder's
    architecture, with the same fine-tuning recipe as the pretrained run."""
    from sslvit.finetune import Finetuning

    p = Pretraining(compose_config("pretrain", ["experiment=cifar10_pretrain"]), None)
    f = Finetuning(compose_config("finetune", ["experiment=cifar10_finetune", "run=null"]), None)
    arch = ("dim", "depth", "heads", "mlp_dim", "num_parallel_branches", "patch_size", "image_size", "layer_scale_init")
    assert {k: p.encoder_cfg["model"][k] for k in arch} == {k: f.encoder_cfg["model"][k] for k in arch}
    assert p.encoder_cfg["stem"] == f.encoder_cfg["stem"]
    # The pretraining run saves the linear drop-path schedule that its fine-tuning then applies.
    assert p.encoder_cfg["model"]["drop_path_schedule"] == f.encoder_cfg["model"]["drop_path_schedule"] == "linear"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stem", ["linear", "conv", "hmlp"])
def test_every_model_preset_builds_with_every_stem(model, stem):
    cfg = compose_config("pretrain", [f"model={model}", f"stem={stem}"])
    p = Pretraining(cfg, None)
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


@pytest.mark.parametrize(
    "script,overrides",
    [
        ("pretrain", []),
        ("finetune", ["run=null"]),
        ("linear_probe", ["run=/some/run"]),
        ("visualize", ["run=/some/run"]),
    ],
)
def test_every_script_config_parses_with_its_schema(script, overrides):
    from sslvit.config.stages import FinetuneConfig, LinearProbeConfig, PretrainConfig, VisualizeConfig

    schema = {
        "pretrain": PretrainConfig,
        "finetune": FinetuneConfig,
        "linear_probe": LinearProbeConfig,
        "visualize": VisualizeConfig,
    }[script]
    cfg = compose_config(script, overrides)
    parsed = schema.parse(cfg)
    assert set(cfg.keys()) <= set(parsed.to_dict())  # every key of the YAML is declared in the schema


@pytest.mark.parametrize(
    "override,expected",
    [
        ("+model.dimm=64", "model.dimm is not a key of model: the keys are"),
        ("+optim.lrr=5", "optim.lrr is not a key of optim"),
        ("+stem.width=3", "stem.width is not an option of stem 'hmlp': its options are name, norm"),
        ("+mask.min_ratio=0.3", "mask.min_ratio is not an option of mask sampler 'block'"),
        ("+target.codes=8", "target.codes is not an option of target 'kmeans'"),
        ("+data.paths=/x", "data.paths is not a key of data"),
        ("+stepz=3", "stepz is not a key of this config"),
    ],
)
def test_keys_added_with_plus_are_rejected_in_one_line(override, expected):
    from sslvit.config.stages import PretrainConfig
    from sslvit.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        PretrainConfig.parse(compose_config("pretrain", [override]))
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "script,overrides,keys",
    [
        ("pretrain", [], {}),
        ("finetune", ["run=null"], {"run": None}),
        ("linear_probe", ["run=/a/run"], {"run": "/a/run"}),
    ],
)
def test_benchmarks_compose_the_configs_as_hydra_does(script, overrides, keys):
    """bench/common.py composes the stages' configs without Hydra (a bare GPU host): the same config."""
    import importlib.util

    from omegaconf import OmegaConf

    spec = importlib.util.spec_from_file_location("bench_common", CONF_DIR.parent / "bench" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    ours = OmegaConf.to_container(common.compose(script, **keys))
    assert ours == OmegaConf.to_container(compose_config(script, overrides), resolve=True)
