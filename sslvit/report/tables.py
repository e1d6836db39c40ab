"""Tables of runs: option columns are the flattened config keys that DIFFER between a stage's runs (`stem.name`,
`mask_ratio`, `finetune.mode`, `seed`, ...), then the stage's result columns; runs that differ only in seed keys are
also summarised as mean ± sample std (ddof=1). Markdown and CSV writers."""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sslvit.report.discovery import (
    IGNORED_KEYS,
    IGNORED_PREFIXES,
    KEY_PRIORITY,
    SOURCE_PREFIXES,
    STAGES,
    Run,
    _hashable,
)

# ------------------------------------------------------------------------------------------ tables
_MISSING = "<missing>"


def is_seed_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == "seed"


def _base_key(key: str) -> str:
    """The key inside its own run's config: without the 'pretrain.'/'source.' prefix of a source run's options."""
    for prefix in SOURCE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
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

    out = [
        k
        for k in keys
        if _base_key(k) not in IGNORED_KEYS and not _base_key(k).startswith(IGNORED_PREFIXES) and differs(k)
    ]
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
        present = [m for m in STAGES.get(self.stage).main_metrics if m in self.metrics] if self.stage in STAGES else []
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
    agg = [m for m in STAGES.get(table.stage).aggregate if m in table.metrics]
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
                cells.append(
                    "-"
                    if mu is None
                    else format_value(mu)
                    if not _is_number(sd)
                    else f"{format_value(mu)} ± {format_value(sd)}"
                )
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
