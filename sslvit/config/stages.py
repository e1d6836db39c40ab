"""Each script's whole config, as its stage parses it before anything is computed: unknown keys (also those added
with `+key=value`), missing required keys and bad values are one `ConfigError` line each.

Keys whose value is checked where it is used are declared with `AnyValue` and say where: `mask_ratio` by the mask
sampler, `layers` against the encoder's depth, the options of registered implementations by those implementations.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sslvit.config.checks import (
    MISSING_VALUE,
    AnyValue,
    Boolean,
    Group,
    Integer,
    Name,
    Optional,
    Path,
    Registered,
    String,
    Sub,
    key,
)
from sslvit.config.groups import (
    DataConfig,
    DistributedConfig,
    FinetuneOptions,
    KnnOptions,
    LoopConfig,
    ModelConfig,
    MonitorOptions,
    OptimConfig,
    ProbeOptions,
)
from sslvit.errors import ConfigError
from sslvit.finetune_modes import FINETUNE_MODES
from sslvit.masking import MASK_SAMPLERS
from sslvit.models.stems import STEM_GIVEN, STEMS
from sslvit.pooling import POOLINGS
from sslvit.targets import TARGETS

_RUN_HINT = "a pretraining run dir: the dir pretrain.py printed, e.g. outputs/pretrain/<date>"
MAX_VISUALIZE_IMAGES = 256  # rows of the PNG
MAX_VISUALIZE_SCALE = 64  # integer upscaling of each image (32 px -> 2048 px)
_INIT_HINT = "a timm or DeiT checkpoint (.safetensors, .pth), described by the model and stem groups"


def check_run_or_init(run: Any, init: Any, *, scratch: bool) -> None:
    """Exactly one start: `run=<run dir>`, `init=<file>` or (fine-tuning) `run=null` from scratch."""
    if run == MISSING_VALUE and init is None:
        raise ConfigError(
            f"run is not set: pass run=<{_RUN_HINT}>, init=<{_INIT_HINT}>"
            + (", or run=null to train from scratch" if scratch else "")
        )
    if init is not None and run not in (None, MISSING_VALUE):
        raise ConfigError(f"run={run} and init={init} are both set: start from a run or from a file (drop one)")


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

    run: str | None = key(Optional(Path(), "null to train from scratch"), unset_ok=True)
    init: str | None = key(Optional(Path(), "null"), None, hint=_INIT_HINT)
    step: int | None = key(_STEP, None)
    model: ModelConfig = key(Sub(ModelConfig, cross=False))  # checked across keys when used: run=null, init=
    stem: dict = _stem()
    data: DataConfig = key(Sub(DataConfig))
    optim: OptimConfig = key(Sub(OptimConfig))
    distributed: DistributedConfig = _distributed()
    finetune: FinetuneOptions = key(Sub(FinetuneOptions), {"mode": {"name": "full"}})

    def validate(self) -> None:
        Registered(FINETUNE_MODES)(self.finetune.mode, "finetune.mode")
        check_run_or_init(self.run, self.init, scratch=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearProbeConfig(Group):
    """conf/linear_probe.yaml: linear probe and k-NN of a trained encoder's frozen features."""

    PREFIX = ""

    run: str | None = key(Optional(Path()), unset_ok=True)  # a pretraining (or fine-tuning) run dir
    init: str | None = key(Optional(Path(), "null"), None, hint=_INIT_HINT)
    step: int | None = key(_STEP, None)
    model: ModelConfig | None = key(Optional(Sub(ModelConfig)), None)  # with init=<file> only
    stem: dict | None = key(Optional(Registered(STEMS, given=STEM_GIVEN)), None)  # with init=<file> only
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

    def validate(self) -> None:
        check_run_or_init(self.run, self.init, scratch=False)
        if self.run == MISSING_VALUE or self.run is None:
            if self.init is None:
                raise ConfigError(f"run=null: pass run=<{_RUN_HINT}> or init=<{_INIT_HINT}>")
            if self.model is None or self.stem is None:
                raise ConfigError(
                    "init=<file> needs the model and stem groups to describe the file's architecture: "
                    "pass model=<preset> stem=<stem> (and model.* options)"
                )
        elif self.model is not None or self.stem is not None:
            raise ConfigError(
                "model/stem options describe an init=<file>; with run= the run's saved config rebuilds "
                "the encoder: drop them"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportTimmConfig(Group):
    """conf/export_timm.yaml: a run's encoder written as a timm state dict."""

    PREFIX = ""

    run: str = key(Path(), hint=f"{_RUN_HINT} (or of a fine-tuning run)")
    step: int | None = key(_STEP, None)
    out: str | None = key(Optional(Path(), "null for <run>/timm_step<step>.safetensors"), None)
    head: bool = key(Boolean(), True)  # a fine-tuned classifier's head too


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisualizeConfig(Group):
    """conf/visualize.yaml: masks, targets and predictions of a pretraining run drawn on test images."""

    PREFIX = ""

    run: str = key(Path(), hint=_RUN_HINT)
    step: int | None = key(_STEP, None)
    num_images: int = key(Integer(min=1, max=MAX_VISUALIZE_IMAGES), 8, hint="(one row each)")
    seed: int = key(Integer(min=0), 0)
    split: str | None = key(Optional(String(), "null for the run's data.test_split"), None)
    data_dir: str | None = key(Optional(Path()), None)
    # The PNG's size also depends on the run's image size: sslvit/visualize.py checks it before computing anything.
    scale: int | None = key(Optional(Integer(min=1, max=MAX_VISUALIZE_SCALE), "null for about 128 px"), None)
    out: str | None = key(Optional(Path(), "null for <run>/mask_predictions.png"), None)


__all__ = [
    "ExportTimmConfig",
    "FinetuneConfig",
    "LinearProbeConfig",
    "PretrainConfig",
    "VisualizeConfig",
    "check_run_or_init",
]
