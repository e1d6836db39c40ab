"""Each script's whole config, as its stage parses it before anything is computed: unknown keys (also those added
with `+key=value`), missing required keys and bad values are one `ConfigError` line each.

Keys whose value is checked where it is used are declared with `AnyValue` and say where: `mask_ratio` by the mask
sampler, `layers` against the encoder's depth, the options of registered implementations by those implementations.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sslvit.config.checks import (AnyValue, Boolean, Group, Integer, Name, Optional, Path, Registered, String, Sub,
                                  key)
from sslvit.config.groups import (DataConfig, DistributedConfig, FinetuneOptions, KnnOptions, LoopConfig,
                                  ModelConfig, MonitorOptions, OptimConfig, ProbeOptions)
from sslvit.finetune_modes import FINETUNE_MODES
from sslvit.masking import MASK_SAMPLERS
from sslvit.models.stems import STEM_GIVEN, STEMS
from sslvit.pooling import POOLINGS
from sslvit.targets import TARGETS

_RUN_HINT = "a pretraining run dir: the dir pretrain.py printed, e.g. outputs/pretrain/<date>"
_STEP = Optional(Integer(min=0), "null for the latest")


def _stem():
    return key(Registered(STEMS, given=STEM_GIVEN), {"name": "linear", "norm": "batch"})


def _distributed():
    return key(Sub(DistributedConfig), {})


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig(LoopConfig):
    """conf/pretrain.yaml: masked-patch pretraining."""

    mask_ratio: Any = key(AnyValue())  # checked by the mask sampler (sslvit/masking.py)
    model: ModelConfig = key(Sub(ModelConfig))
    stem: dict = _stem()
    mask: dict = key(Registered(MASK_SAMPLERS))
    target: dict = key(Registered(TARGETS, ignore=("path",), given=("patch_size", "channels")))
    data: DataConfig = key(Sub(DataConfig))
    optim: OptimConfig = key(Sub(OptimConfig))
    distributed: DistributedConfig = _distributed()
    monitor: MonitorOptions = key(Sub(MonitorOptions), {})  # absent (older configs): off

    def validate(self) -> None:
        Name(POOLINGS)(self.monitor.pool, "monitor.pool")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig(LoopConfig):
    """conf/finetune.yaml: fine-tuning a pretrained encoder (`run`), or training from scratch (`run=null`, the
    `model` and `stem` groups)."""

    run: str | None = key(Optional(Path(), "null to train from scratch"),
                          hint=f"{_RUN_HINT}; or run=null to train from scratch")
    step: int | None = key(_STEP, None)
    model: ModelConfig = key(Sub(ModelConfig, cross=False))  # checked across keys when used: run=null
    stem: dict = _stem()
    data: DataConfig = key(Sub(DataConfig))
    optim: OptimConfig = key(Sub(OptimConfig))
    distributed: DistributedConfig = _distributed()
    finetune: FinetuneOptions = key(Sub(FinetuneOptions), {"mode": {"name": "full"}})

    def validate(self) -> None:
        Registered(FINETUNE_MODES)(self.finetune.mode, "finetune.mode")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearProbeConfig(Group):
    """conf/linear_probe.yaml: linear probe and k-NN of a trained encoder's frozen features."""

    PREFIX = ""

    run: str = key(Path(), hint=f"{_RUN_HINT} (or of a fine-tuning run)")
    step: int | None = key(_STEP, None)
    random_init: bool = key(Boolean(), False)  # probe an untrained encoder of the same config (the baseline)
    seed: int = key(Integer(min=0), 0)
    layers: Any = key(AnyValue(), None)  # checked against the encoder's depth (sslvit/probe/__init__.py)
    pool: str = key(Name(POOLINGS), "cls+mean")
    batch_size: int = key(Integer(min=1), 256, hint="(feature extraction, global)")
    progress: bool = key(Boolean(), True)
    data: DataConfig = key(Sub(DataConfig))
    distributed: DistributedConfig = _distributed()
    probe: ProbeOptions = key(Sub(ProbeOptions), {})
    knn: KnnOptions = key(Sub(KnnOptions), {})


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisualizeConfig(Group):
    """conf/visualize.yaml: masks, targets and predictions of a pretraining run drawn on test images."""

    PREFIX = ""

    run: str = key(Path(), hint=_RUN_HINT)
    step: int | None = key(_STEP, None)
    num_images: int = key(Integer(min=1), 8)
    seed: int = key(Integer(min=0), 0)
    split: str | None = key(Optional(String(), "null for the run's data.test_split"), None)
    data_dir: str | None = key(Optional(Path()), None)
    scale: int | None = key(Optional(Integer(min=1), "null for about 128 px"), None)
    out: str | None = key(Optional(Path(), "null for <run>/mask_predictions.png"), None)


__all__ = ["FinetuneConfig", "LinearProbeConfig", "PretrainConfig", "VisualizeConfig"]
