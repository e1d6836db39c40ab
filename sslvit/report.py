"""Collect pretraining, linear-probe and fine-tuning runs into tables (markdown, CSV) and plots: `report.py`.

A run dir is any directory holding a `results.json` whose `stage` is registered in `STAGES`; its config is the
resolved one Hydra saved (`.hydra/config.yaml`), else the one in the results, else the checkpoint meta's. Each
stage gets one table whose option columns are the flattened config keys (`stem.name`, `mask_ratio`,
`finetune.mode`, `seed`, ...) that DIFFER between its runs, followed by the stage's result columns. Runs that
differ only in seed keys are also summarised as mean ± sample std (ddof=1).

Probe and fine-tune configs only name their source run, so their rows are described by what was actually used:
the encoder from `results['model']` (as `model.*` and `stem.*`, overriding the config's unused defaults) and the
source pretraining run's config under `pretrain.*` (`pretrain.mask_ratio`, `pretrain.target.name`, ...; `source.*`
when the source is itself a fine-tuning run).

A new stage = one `StageSpec` in `STAGES`. JAX is imported only for runs without a saved config (checkpoint-meta
fallback) and for loss curves (`sslvit.metrics.read_metrics`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sslvit.errors import ConfigError

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"  # sslvit.metrics.METRICS_FILE (not imported: it pulls in JAX)
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
SKIP_DIRS = {".hydra", "checkpoints", "tb", "__pycache__"}  # never hold run dirs; checkpoints can be huge

# Keys that never explain a difference in results (paths, logging, resume bookkeeping).
IGNORED_KEYS = {"progress", "resume", "run", "data.data_dir", "log_every", "ckpt_every", "keep_checkpoints",
                "max_nonfinite_streak", "target.path"}
IGNORED_PREFIXES = ("distributed.",)  # process/launcher setup: results do not depend on it
# Option columns come first in this order (the ablations of the paper), then alphabetically, seed keys last.
KEY_PRIORITY = ("stem.name", "stem.norm", "model.num_parallel_branches", "model.depth", "model.dim",
                "target.name", "mask.name", "mask_ratio", "pretrain.target.name", "pretrain.mask.name",
                "pretrain.mask_ratio", "init", "random_init", "finetune.mode", "finetune.image_size")
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


STAGES: dict[str, StageSpec] = {
    "pretrain": StageSpec(
        "pretrain", ("test_accuracy", "test_mse"),
        ("test_accuracy", "chance_accuracy", "test_mse", "train_loss", "train_accuracy", "images_per_sec", "params"),
        ("test_accuracy", "test_mse", "train_loss", "images_per_sec"), chance="chance_accuracy"),
    "linear_probe": StageSpec(
        "linear_probe", ("best_top1",),
        ("best_top1", "best_layer", "best_knn_top1", "best_knn_layer", "chance_top1", "feature_dim"),
        ("best_top1", "best_knn_top1"), chance="chance_top1"),
    "finetune": StageSpec(
        "finetune", ("test_top1",),
        ("test_top1", "trainable_params", "total_params", "peak_memory_mib", "images_per_sec", "step_time_s",
         "train_loss"),
        ("test_top1", "peak_memory_mib", "images_per_sec", "train_loss")),
}


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
            raise ConfigError(f"{os.fspath(p)!r} does not exist: pass run dirs or sweep dirs (e.g. multirun/pretrain/"
                              f"<date>) holding {RESULTS_FILE}")
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
        from omegaconf import OmegaConf  # noqa: PLC0415

        cfg = OmegaConf.load(hydra_file)
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - an interpolation needing Hydra's runtime (${hydra:...}): keep it as text
            return OmegaConf.to_container(cfg, resolve=False)
    if results and isinstance(results.get("config"), Mapping):
        return dict(results["config"])
    if (run_dir / "checkpoints").is_dir():
        try:
            from sslvit.checkpoint import load_meta  # noqa: PLC0415  (orbax/JAX only on this fallback)

            meta = load_meta(run_dir)
            if isinstance(meta.get("config"), Mapping):
                return dict(meta["config"])
        except Exception as e:  # noqa: BLE001 - a report must not die on one unreadable run
            log.warning("%s: no config (checkpoint meta unreadable: %s)", run_dir, e)
    log.warning("%s: no resolved config found (.hydra/config.yaml, results 'config' or checkpoint meta)", run_dir)
    return {}


def _model_view(model_cfg: Mapping) -> dict[str, Any]:
    """A saved `model_config` dict in the pretraining config's names: model.<key>, stem.name, stem.norm."""
    out = {f"model.{k}": _hashable(v) for k, v in model_cfg.items() if k not in ("stem", "stem_norm")}
    if "stem" in model_cfg:
        out["stem.name"] = model_cfg["stem"]
    if "stem_norm" in model_cfg:
        out["stem.norm"] = model_cfg["stem_norm"]
    return out


def _source_run(stage: str, results: Mapping) -> str | None:
    if stage == "linear_probe":
        return results.get("run")
    if stage == "finetune":
        return results.get("source_run")
    return None


def describe(stage: str, config: Mapping, results: Mapping, source_config: Mapping | None,
             source_prefix: str = "pretrain.") -> dict[str, Any]:
    """The flattened option view of one run (see the module docstring). The source run's options get
    `source_prefix` ('pretrain.'; 'source.' when a probe or fine-tune starts from a fine-tuned run)."""
    flat = flatten(config)
    if stage == "pretrain":
        return flat
    model_cfg = results.get("model")
    if isinstance(model_cfg, Mapping):  # the encoder actually used beats the config's model/stem defaults
        flat = {k: v for k, v in flat.items() if not k.startswith(("model.", "stem."))}
        flat.update(_model_view(model_cfg))
    if stage == "finetune":  # the baseline of every fine-tune comparison: from scratch or from a trained encoder
        flat["init"] = "pretrained" if results.get("source_run") else "scratch"
    if source_config:
        for k, v in flatten(source_config).items():
            if not k.startswith(("model.", "stem.")):  # already described by the encoder's own view
                flat[f"{source_prefix}{k}"] = v
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
            log.warning("skipping %s: stage %r is not one of %s", run_dir, stage, list(STAGES))
            continue
        config = load_config(run_dir, results)
        source_cfg, prefix = None, "pretrain."
        src = _source_run(stage, results)
        if src:
            if src not in source_cache:
                src_dir = Path(src)
                src_results = _read_json(src_dir / RESULTS_FILE) if (src_dir / RESULTS_FILE).is_file() else None
                src_stage = (src_results or {}).get("stage", "pretrain")
                source_cache[src] = (load_config(src_dir, src_results) if src_dir.is_dir() else {},
                                     "pretrain." if src_stage == "pretrain" else "source.")
                if not src_dir.is_dir():
                    log.warning("%s: its source run %s is gone; its options are unknown", run_dir, src)
            source_cfg, prefix = source_cache[src]
        runs.append(Run(run_dir, stage, _derive(stage, results),
                        describe(stage, config, results, source_cfg, prefix)))
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


# ------------------------------------------------------------------------------------------ tables
_MISSING = "<missing>"


def is_seed_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == "seed"


def _base_key(key: str) -> str:
    """The key inside its own run's config: without the 'pretrain.'/'source.' prefix of a source run's options."""
    for prefix in SOURCE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def differing_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Flattened keys whose value is not the same in every config (absent counts as a value), ordered: the
    ablation keys of `KEY_PRIORITY` first, then alphabetically, seed keys last. `IGNORED_KEYS` never count.

    Source options (`pretrain.*`) are compared only between runs that have a source: a from-scratch baseline next
    to fine-tuned runs differs from them in `init`, not in every option of their pretraining."""
    keys = set().union(*[set(c) for c in configs]) if configs else set()
    with_source = [c for c in configs if any(k.startswith(SOURCE_PREFIXES) for k in c)]

    def differs(k: str) -> bool:
        group = with_source if k.startswith(SOURCE_PREFIXES) else configs
        return len({_sort_token(c.get(k, _MISSING)) for c in group}) > 1

    out = [k for k in keys if _base_key(k) not in IGNORED_KEYS and not _base_key(k).startswith(IGNORED_PREFIXES)
           and differs(k)]
    prio = {k: i for i, k in enumerate(KEY_PRIORITY)}
    return sorted(out, key=lambda k: (is_seed_key(k), prio.get(k, len(prio)), k))


def _sort_token(v: Any) -> tuple:
    """A total order over mixed option values: None < numbers < strings < anything else."""
    if v is None or v == _MISSING:
        return (0, 0, "")
    if isinstance(v, bool):
        return (1, int(v), "")
    if isinstance(v, (int, float)):
        return (1, v, "")
    return (2, 0, str(v))


@dataclasses.dataclass
class Table:
    """Rows of one stage; `columns` = ['run'] + `keys` (differing options) + `metrics` (result columns)."""

    stage: str
    keys: list[str]
    metrics: list[str]
    rows: list[dict[str, Any]]
    id_columns: tuple[str, ...] = ("run",)

    @property
    def columns(self) -> list[str]:
        return [*self.id_columns, *self.keys, *self.metrics]

    @property
    def main_metric(self) -> str | None:
        present = [m for m in STAGES[self.stage].main_metrics if m in self.metrics] if self.stage in STAGES else []
        return present[0] if present else (self.metrics[0] if self.metrics else None)


def build_tables(runs: Sequence[Run]) -> dict[str, Table]:
    """One `Table` per stage present, in `STAGES` order."""
    tables: dict[str, Table] = {}
    for stage, spec in STAGES.items():
        mine = [r for r in runs if r.stage == stage]
        if not mine:
            continue
        keys = differing_keys([r.config for r in mine])
        metrics = [c for c in spec.columns if any(_is_value(r.results.get(c)) for r in mine)]
        rows = []
        for r in mine:
            row = {"run": r.name, "_path": str(r.path)}
            row.update({k: r.config.get(k) for k in keys})
            row.update({m: r.results.get(m) for m in metrics})
            rows.append(row)
        rows.sort(key=lambda row: ([_sort_token(row[k]) for k in keys], row["run"]))
        tables[stage] = Table(stage, keys, metrics, rows)
    return tables


def _is_value(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1); std is NaN for a single value."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else float("nan"))


def seed_summary(table: Table) -> Table | None:
    """Mean ± std over the runs that differ only in seed keys, or None when no seed key differs.

    Rows hold `n_seeds` and, per aggregated metric, `<metric>_mean` and `<metric>_std` (NaN when n_seeds == 1).
    """
    seed_keys = [k for k in table.keys if is_seed_key(k)]
    if not seed_keys:
        return None
    keys = [k for k in table.keys if not is_seed_key(k)]
    agg = [m for m in STAGES[table.stage].aggregate if m in table.metrics]
    groups: dict[tuple, list[dict]] = {}
    for row in table.rows:
        groups.setdefault(tuple(_hashable(row[k]) for k in keys), []).append(row)
    rows, metrics = [], []
    for m in agg:
        metrics += [f"{m}_mean", f"{m}_std"]
    for values, members in groups.items():
        row: dict[str, Any] = dict(zip(keys, values))
        row["n_seeds"] = len(members)
        for m in agg:
            xs = [r[m] for r in members if _is_number(r.get(m))]
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std(xs) if xs else (None, None)
        rows.append(row)
    rows.sort(key=lambda row: [_sort_token(row[k]) for k in keys])
    return Table(table.stage, keys, metrics, rows, id_columns=("n_seeds",))


# ------------------------------------------------------------------------------------------ formatting
def format_value(v: Any, option: bool = False) -> str:
    """Cell text: result floats to 4 decimals (none from 100 on), option floats as written (0.4), None as 'null'."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if option:
            return f"{v:g}"
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.4f}"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(format_value(x, option) for x in v) + "]"
    return str(v)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def to_markdown(table: Table) -> str:
    """A markdown table; in a seed summary each aggregated metric is one 'mean ± std' column."""
    if table.id_columns == ("n_seeds",):
        agg = [m[: -len("_mean")] for m in table.metrics if m.endswith("_mean")]
        header = [*table.keys, "n_seeds", *[f"{m} (mean ± std)" for m in agg]]
        body = []
        for row in table.rows:
            cells = [format_value(row[k], option=True) for k in table.keys] + [str(row["n_seeds"])]
            for m in agg:
                mu, sd = row[f"{m}_mean"], row[f"{m}_std"]
                cells.append("-" if mu is None else format_value(mu) if not _is_number(sd)
                             else f"{format_value(mu)} ± {format_value(sd)}")
            body.append(cells)
    else:
        header = table.columns
        n_opt = len(table.id_columns) + len(table.keys)
        body = [[format_value(row[c], option=i < n_opt) for i, c in enumerate(table.columns)] for row in table.rows]
    n_left = len(table.keys) + (0 if table.id_columns == ("n_seeds",) else len(table.id_columns))
    align = ["---" if i < n_left else "---:" for i in range(len(header))]  # options left, numbers right
    lines = ["| " + " | ".join(map(_md_escape, header)) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(map(_md_escape, cells)) + " |" for cells in body]
    return "\n".join(lines)


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, tuple):
        return format_value(v)
    return v


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow([_csv_value(row.get(c)) for c in columns])
    return path


# ------------------------------------------------------------------------------------------ plots
def _label(row: Mapping, keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={format_value(row[k], option=True)}" for k in keys) or str(row.get("run", ""))


def _chance_level(table: Table, rows: Sequence[Mapping]) -> float | None:
    col = STAGES[table.stage].chance if table.stage in STAGES else None
    xs = [float(r[col]) for r in rows if col and _is_number(r.get(col))]
    return statistics.fmean(xs) if xs else None


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_by_option(table: Table, path: Path) -> Path | None:
    """One bar chart per differing (non-seed) option: the main metric's mean per value, ± std, runs as dots."""
    metric = table.main_metric
    rows = [r for r in table.rows if _is_number(r.get(metric))]
    if metric is None or not rows:
        return None
    keys = [k for k in table.keys if not is_seed_key(k)] or [None]
    plt = _pyplot()
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.0, 4.2 * ncols), 3.6 * nrows), squeeze=False)
    chance = _chance_level(table, rows)
    for ax, key in zip(axes.flat, keys):
        groups: dict[Any, list[float]] = {}
        for r in rows:
            groups.setdefault(_hashable(r[key]) if key else "all runs", []).append(float(r[metric]))
        values = sorted(groups, key=_sort_token)
        stats = [mean_std(groups[v]) for v in values]
        x = range(len(values))
        ax.bar(x, [m for m, _ in stats], yerr=[0 if math.isnan(s) else s for _, s in stats], capsize=4,
               color="tab:blue", alpha=0.7)
        for i, v in enumerate(values):
            ax.scatter([i] * len(groups[v]), groups[v], color="black", s=10, zorder=3)
        if chance is not None:
            ax.axhline(chance, color="tab:red", ls="--", lw=1, label="chance (mean)")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(list(x), [format_value(v, option=True) for v in values], rotation=20 if len(values) > 4 else 0)
        ax.set_xlabel(key or "")
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(f"{table.stage}: {metric} per option\n(bars: mean ± std over runs, dots: runs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_loss_curves(table: Table, runs_by_path: Mapping[str, Run], path: Path) -> Path | None:
    """Training loss against step for each run that logged one (metrics.jsonl)."""
    curves = []
    others = [k for k in table.keys if not is_seed_key(k)]
    combos: dict[tuple, int] = {}
    for row in table.rows:
        run = runs_by_path[row["_path"]]
        if not run.metrics_file.is_file():
            continue
        from sslvit.metrics import read_metrics  # noqa: PLC0415  (imports JAX; only when a run has metrics)

        pts = [(m["step"], m["loss"]) for m in read_metrics(run.path) if _is_number(m.get("loss"))]
        if pts:  # one colour per option combination, one line style per seed
            combo = tuple(_hashable(row[k]) for k in others)
            combos.setdefault(combo, len(combos))
            seen = sum(1 for c in curves if c[1] == combos[combo])
            curves.append((_label(row, table.keys) if table.keys else row["run"], combos[combo], seen, pts))
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ("-", "--", ":", "-.")
    for label, colour, style, pts in curves:
        ax.plot([s for s, _ in pts], [v for _, v in pts], label=label, lw=1.3, color=f"C{colour % 10}",
                ls=styles[style % len(styles)])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{table.stage}: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mask_ratio_key(table: Table) -> str | None:
    for k in ("mask_ratio", "pretrain.mask_ratio"):
        if k in table.keys:
            return k
    return None


def plot_vs_mask_ratio(table: Table, path: Path) -> Path | None:
    """The main metric against the mask ratio, one line per combination of the other options (mean ± std)."""
    key, metric = mask_ratio_key(table), table.main_metric
    if key is None or metric is None:
        return None
    others = [k for k in table.keys if k != key and not is_seed_key(k)]
    lines: dict[tuple, dict[float, list[float]]] = {}
    for r in table.rows:
        if _is_number(r.get(metric)) and _is_number(r.get(key)):
            lines.setdefault(tuple(_hashable(r[k]) for k in others), {}).setdefault(float(r[key]), []).append(
                float(r[metric]))
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for combo in sorted(lines, key=lambda c: [_sort_token(v) for v in c]):
        xs = sorted(lines[combo])
        stats = [mean_std(lines[combo][x]) for x in xs]
        label = ", ".join(f"{k}={format_value(v, option=True)}" for k, v in zip(others, combo)) or metric
        ax.errorbar(xs, [m for m, _ in stats], yerr=[0 if math.isnan(s) else s for _, s in stats], marker="o",
                    capsize=3, label=label)
    chance = _chance_level(table, table.rows)
    if chance is not None:
        ax.axhline(chance, color="tab:red", ls="--", lw=1, label="chance (mean)")
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{table.stage}: {metric} vs {key}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ report
def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclasses.dataclass
class Report:
    tables: dict[str, Table]
    seed_tables: dict[str, Table]
    markdown: str
    files: list[Path]


def make_report(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Report:
    """Find the runs under `paths`, write report.md, report.csv (all rows, a `stage` column), report_seeds.csv
    (when seeds vary) and the PNG plots into `out_dir`."""
    runs = load_runs(paths)
    if not runs:
        raise ConfigError(f"no run dirs under {', '.join(map(str, paths))}: a run dir holds {RESULTS_FILE} (written "
                          f"when pretrain.py, linear_probe.py or finetune.py finishes); pass finished runs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(runs)
    by_path = {str(r.path): r for r in runs}
    files: list[Path] = []
    seed_tables: dict[str, Table] = {}
    md = [f"# Report: {_plural(len(runs), 'run')}", ""]
    for stage, table in tables.items():
        md += [f"## {stage} ({_plural(len(table.rows), 'run')})", ""]
        md += [("Options that differ: " + ", ".join(f"`{k}`" for k in table.keys)) if table.keys
               else "No option differs between these runs.", "", to_markdown(table), ""]
        summary = seed_summary(table)
        if summary is not None:
            seed_tables[stage] = summary
            md += ["Mean ± sample std over seeds:", "", to_markdown(summary), ""]
        for name, fn in ((f"{stage}_by_option.png", lambda p, t=table: plot_by_option(t, p)),
                         (f"{stage}_loss_curves.png", lambda p, t=table: plot_loss_curves(t, by_path, p)),
                         (f"{stage}_vs_mask_ratio.png", lambda p, t=table: plot_vs_mask_ratio(t, p))):
            written = fn(out / name)
            if written is not None:
                files.append(written)
                md += [f"![{name}]({name})", ""]
    markdown = "\n".join(md).rstrip() + "\n"
    (out / "report.md").write_text(markdown)
    files.insert(0, out / "report.md")

    columns = ["stage", "run"]
    for t in tables.values():
        columns += [k for k in t.keys if k not in columns]
    for t in tables.values():
        columns += [m for m in t.metrics if m not in columns]
    rows = [{"stage": t.stage, **row} for t in tables.values() for row in t.rows]
    files.insert(1, write_csv(rows, columns, out / "report.csv"))
    if seed_tables:
        scols = ["stage", "n_seeds"]
        for t in seed_tables.values():
            scols += [c for c in [*t.keys, *t.metrics] if c not in scols]
        srows = [{"stage": t.stage, **row} for t in seed_tables.values() for row in t.rows]
        files.insert(2, write_csv(srows, scols, out / "report_seeds.csv"))
    return Report(tables, seed_tables, markdown, files)
