"""Plots of a report: the main metric by option, loss curves, and the metric against the mask ratio."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sslvit.report.discovery import STAGES, Run, _hashable
from sslvit.report.tables import Table, _is_number, _sort_token, format_value, is_seed_key, mean_std

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ plots
def _label(row: Mapping, keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={format_value(row[k], option=True)}" for k in keys) or str(row.get("run", ""))


def _chance_level(table: Table, rows: Sequence[Mapping]) -> float | None:
    col = STAGES.get(table.stage).chance if table.stage in STAGES else None
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
        ax.bar(
            x,
            [m for m, _ in stats],
            yerr=[0 if math.isnan(s) else s for _, s in stats],
            capsize=4,
            color="tab:blue",
            alpha=0.7,
        )
        for i, v in enumerate(values):
            ax.scatter([i] * len(groups[v]), groups[v], color="black", s=10, zorder=3)
        if chance is not None:
            ax.axhline(chance, color="tab:red", ls="--", lw=1, label="chance (mean)")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(list(x), [format_value(v, option=True) for v in values], rotation=20 if len(values) > 4 else 0)
        ax.set_xlabel(key or "")
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
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

        try:
            rows = read_metrics(run.path)
        except (OSError, UnicodeDecodeError) as e:  # not text (damaged): the run still has its row in the tables
            log.warning(
                "%s: no loss curve (%s is not readable: %s)",
                run.path,
                run.metrics_file.name,
                " ".join(str(e).split())[:100],
            )
            continue
        pts = [(m["step"], m["loss"]) for m in rows if _is_number(m.get("loss"))]
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
        ax.plot(
            [s for s, _ in pts],
            [v for _, v in pts],
            label=label,
            lw=1.3,
            color=f"C{colour % 10}",
            ls=styles[style % len(styles)],
        )
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
                float(r[metric])
            )
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for combo in sorted(lines, key=lambda c: [_sort_token(v) for v in c]):
        xs = sorted(lines[combo])
        stats = [mean_std(lines[combo][x]) for x in xs]
        label = ", ".join(f"{k}={format_value(v, option=True)}" for k, v in zip(others, combo)) or metric
        ax.errorbar(
            xs,
            [m for m, _ in stats],
            yerr=[0 if math.isnan(s) else s for _, s in stats],
            marker="o",
            capsize=3,
            label=label,
        )
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
