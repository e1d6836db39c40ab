"""Finding runs and describing them: a run dir is any directory holding a `results.json` whose `stage` is registered
in `STAGES`; its config is the resolved one Hydra saved (`.hydra/config.yaml`), else the one in the results, else
the checkpoint meta's.

Probe and fine-tune configs only name their source run, so their rows are described by what was actually used:
the encoder from `results['model']` (as `model.*` and `stem.*`, overriding the config's unused defaults) and the
source pretraining run's config under `pretrain.*` (`pretrain.mask_ratio`, `pretrain.target.name`, ...; `source.*`
when the source is itself a fine-tuning run). A new stage is one `StageSpec` registered in `STAGES`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sslvit.errors import ConfigError
from sslvit.registry import Registry
from sslvit.rundir import CHECKPOINT_SUBDIR, HYDRA_SUBDIR, METRICS_FILE, RESULTS_FILE, TB_DIR

log = logging.getLogger(__name__)

HYDRA_CONFIG = Path(HYDRA_SUBDIR) / "config.yaml"
SKIP_DIRS = {HYDRA_SUBDIR, CHECKPOINT_SUBDIR, TB_DIR, "__pycache__"}  # never hold run dirs; checkpoints can be huge

# Keys that never explain a difference in results (paths, logging, resume bookkeeping).
IGNORED_KEYS = {
    "progress",
    "resume",
    "resume_changes",
    "run",
    "data.data_dir",
    "log_every",
    "ckpt_every",
    "keep_checkpoints",
    "max_nonfinite_streak",
    "target.path",
}
IGNORED_PREFIXES = ("distributed.",)  # process/launcher setup: results do not depend on it
# Option columns come first in this order (the ablations of the paper), then alphabetically, seed keys last.
KEY_PRIORITY = (
    "stem.name",
    "stem.norm",
    "model.num_parallel_branches",
    "model.depth",
    "model.dim",
    "target.name",
    "mask.name",
    "mask_ratio",
    "pretrain.target.name",
    "pretrain.mask.name",
    "pretrain.mask_ratio",
    "init",
    "random_init",
    "finetune.mode.name",
    "finetune.image_size",
)
SOURCE_PREFIXES = ("pretrain.", "source.")  # options of the run a probe / fine-tune started from


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """How to read one stage's results: its main metric (first present wins), its result columns, and which of
    those are averaged over seeds."""

    name: str
    main_metrics: tuple[str, ...]
    columns: tuple[str, ...]
    aggregate: tuple[str, ...]
    chance: str | None = None  # the result column holding chance level (drawn as a line in the plots)


STAGES: Registry = Registry("stage", "results.json stage")
for _spec in (
    StageSpec(
        "pretrain",
        ("test_accuracy", "test_mse"),
        ("test_accuracy", "chance_accuracy", "test_mse", "train_loss", "train_accuracy", "images_per_sec", "params"),
        ("test_accuracy", "test_mse", "train_loss", "images_per_sec"),
        chance="chance_accuracy",
    ),
    StageSpec(
        "linear_probe",
        ("best_top1",),
        ("best_top1", "best_layer", "best_knn_top1", "best_knn_layer", "chance_top1", "feature_dim"),
        ("best_top1", "best_knn_top1"),
        chance="chance_top1",
    ),
    StageSpec(
        "finetune",
        ("test_top1",),
        (
            "test_top1",
            "trainable_params",
            "total_params",
            "peak_memory_mib",
            "images_per_sec",
            "step_time_s",
            "train_loss",
        ),
        ("test_top1", "peak_memory_mib", "images_per_sec", "train_loss"),
    ),
):
    STAGES.add(_spec.name, _spec)


# ------------------------------------------------------------------------------------------ runs
@dataclasses.dataclass
class Run:
    """One run dir: its stage, results (plus derived columns) and flattened, described config."""

    path: Path
    stage: str
    results: dict
    config: dict[str, Any]  # flattened dotted keys -> hashable values
    name: str = ""  # display name: the path relative to the runs' common ancestor

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every dir under `paths` (each a run dir or a sweep dir) holding a results file, sorted, deduplicated."""
    found: set[Path] = set()
    for p in paths:
        root = Path(os.path.expanduser(os.fspath(p))).absolute()
        if not root.exists():
            raise ConfigError(
                f"{os.fspath(p)!r} does not exist: pass run dirs or sweep dirs (e.g. multirun/pretrain/"
                f"<date>) holding {RESULTS_FILE}"
            )
        if root.is_file():
            root = root.parent if root.name == RESULTS_FILE else root
            if not (root / RESULTS_FILE).is_file():
                raise ConfigError(f"{os.fspath(p)!r} is a file: pass a run dir or a sweep dir")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
            if RESULTS_FILE in filenames:
                found.add(Path(dirpath))
    return sorted(found)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}, 'c': [1, 2]} -> {'a.b': 1, 'c': (1, 2)}: dotted keys, lists as tuples (hashable)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = _hashable(v)
    return out


def _hashable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, Mapping):
        return tuple(sorted((str(k), _hashable(x)) for k, x in v.items()))
    return v


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("skipping %s: not readable JSON (%s)", path, e)
        return None
    return data if isinstance(data, dict) else None


def load_config(run_dir: Path, results: Mapping | None = None) -> dict:
    """The run's resolved config: `.hydra/config.yaml`, else `results['config']`, else the checkpoint meta's."""
    hydra_file = run_dir / HYDRA_CONFIG
    if hydra_file.is_file():
        from omegaconf import DictConfig, OmegaConf  # noqa: PLC0415

        try:
            cfg = OmegaConf.load(hydra_file)
        except Exception as e:
            cfg = None
            log.warning(
                "%s: not a readable YAML config (%s); using the config saved with its results or checkpoint",
                hydra_file,
                " ".join(str(e).split())[:120],
            )
        if isinstance(cfg, DictConfig):
            try:
                return OmegaConf.to_container(cfg, resolve=True)
            except Exception:
                return OmegaConf.to_container(cfg, resolve=False)
        if cfg is not None:
            log.warning("%s: not a mapping of keys; using the config saved with its results or checkpoint", hydra_file)
    if results and isinstance(results.get("config"), Mapping):
        return dict(results["config"])
    if (run_dir / CHECKPOINT_SUBDIR).is_dir():
        try:
            from sslvit.checkpoint import load_meta  # noqa: PLC0415  (orbax/JAX only on this fallback)

            meta = load_meta(run_dir)
            if isinstance(meta.get("config"), Mapping):
                return dict(meta["config"])
        except Exception as e:
            log.warning("%s: no config (checkpoint meta unreadable: %s)", run_dir, e)
    log.warning("%s: no resolved config found (.hydra/config.yaml, results 'config' or checkpoint meta)", run_dir)
    return {}


def _encoder_view(results: Mapping) -> dict[str, Any] | None:
    """The encoder a probe or fine-tune used, as flattened `model.*` and `stem.*` keys: its saved description
    (`results['encoder']`: the model and stem groups). Results written before that description existed carry the
    ViT's flat arguments in `results['model']` (the stem as `stem` and `stem_norm`)."""
    enc = results.get("encoder")
    if isinstance(enc, Mapping):
        return flatten({"model": enc.get("model", {}), "stem": enc.get("stem", {})})
    flat = results.get("model")
    if isinstance(flat, Mapping):
        model = {k: v for k, v in flat.items() if k not in ("stem", "stem_norm")}
        stem = {"name": flat.get("stem"), "norm": flat.get("stem_norm")}
        return flatten({"model": model, "stem": {k: v for k, v in stem.items() if v is not None}})
    return None


def _source_run(stage: str, results: Mapping) -> str | None:
    if stage == "linear_probe":
        return results.get("run")
    if stage == "finetune":
        return results.get("source_run")
    return None


def describe(
    stage: str, config: Mapping, results: Mapping, source_config: Mapping | None, source_prefix: str = "pretrain."
) -> dict[str, Any]:
    """The flattened option view of one run (see the module docstring). The source run's options get
    `source_prefix` ('pretrain.'; 'source.' when a probe or fine-tune starts from a fine-tuned run)."""
    flat = _flat_config(config)
    if stage == "pretrain":
        return flat
    encoder = _encoder_view(results)
    if encoder is not None:  # the encoder actually used beats the config's model/stem defaults
        flat = {k: v for k, v in flat.items() if not k.startswith(("model.", "stem."))}
        flat.update(encoder)
    if stage == "finetune":  # the baseline of every fine-tune comparison: from scratch or from a trained encoder
        flat["init"] = "pretrained" if results.get("source_run") else "scratch"
    if source_config:
        for k, v in _flat_config(source_config).items():
            if not k.startswith(("model.", "stem.")):  # already described by the encoder's own view
                flat[f"{source_prefix}{k}"] = v
    return flat


def _flat_config(config: Mapping) -> dict[str, Any]:
    """`flatten`, with one spelling per option: `finetune.mode=attn_only` (a bare mode name) is the mode group's
    `finetune.mode.name`."""
    flat = flatten(config)
    if isinstance(flat.get("finetune.mode"), str):
        flat["finetune.mode.name"] = flat.pop("finetune.mode")
    return flat


def _derive(stage: str, results: dict) -> dict:
    out = dict(results)
    if stage == "finetune" and isinstance(out.get("peak_memory_bytes"), (int, float)):
        out["peak_memory_mib"] = out["peak_memory_bytes"] / 2**20
    return out


def load_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """Every run under `paths` with a registered stage, configs described; source configs read once each."""
    runs: list[Run] = []
    source_cache: dict[str, tuple[dict, str]] = {}  # source run -> (config, option prefix)
    for run_dir in find_runs(paths):
        results = _read_json(run_dir / RESULTS_FILE)
        if results is None:
            continue
        stage = results.get("stage")
        if stage not in STAGES:
            log.warning("skipping %s: stage %r is not one of %s", run_dir, stage, STAGES.names())
            continue
        config = load_config(run_dir, results)
        source_cfg, prefix = None, "pretrain."
        src = _source_run(stage, results)
        if src:
            if src not in source_cache:
                src_dir = Path(src)
                src_results = _read_json(src_dir / RESULTS_FILE) if (src_dir / RESULTS_FILE).is_file() else None
                src_stage = (src_results or {}).get("stage", "pretrain")
                source_cache[src] = (
                    load_config(src_dir, src_results) if src_dir.is_dir() else {},
                    "pretrain." if src_stage == "pretrain" else "source.",
                )
                if not src_dir.is_dir():
                    log.warning("%s: its source run %s is gone; its options are unknown", run_dir, src)
            source_cfg, prefix = source_cache[src]
        runs.append(Run(run_dir, stage, _derive(stage, results), describe(stage, config, results, source_cfg, prefix)))
    _name_runs(runs)
    return runs


def _name_runs(runs: Sequence[Run]) -> None:
    if not runs:
        return
    if len(runs) == 1:
        runs[0].name = runs[0].path.name
        return
    common = Path(os.path.commonpath([str(r.path) for r in runs]))
    for r in runs:
        r.name = str(r.path.relative_to(common)) if r.path != common else r.path.name
