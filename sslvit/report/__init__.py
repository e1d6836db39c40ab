"""Collect pretraining, linear-probe and fine-tuning runs into one report (markdown, CSV, plots): `report.py`.

- `discovery.py`: find run dirs (a `results.json` of a registered stage) and describe each by its flattened config;
- `tables.py`: one table per stage, its option columns the config keys that differ between runs, mean ± std over
  seeds; markdown and CSV;
- `plots.py`: the main metric by option, loss curves, metric against the mask ratio.

JAX is imported only for runs without a saved config (checkpoint-meta fallback) and for loss curves
(`sslvit.metrics.read_metrics`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from sslvit.errors import ConfigError
from sslvit.paths import check_dir
from sslvit.report.discovery import RESULTS_FILE, STAGES, Run, StageSpec, describe, find_runs, flatten, load_runs
from sslvit.report.plots import plot_by_option, plot_loss_curves, plot_vs_mask_ratio
from sslvit.report.tables import (
    Table,
    build_tables,
    differing_keys,
    format_value,
    mean_std,
    seed_summary,
    to_markdown,
    write_csv,
)


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
        raise ConfigError(
            f"no run dirs under {', '.join(map(str, paths))}: a run dir holds {RESULTS_FILE} (written "
            f"when pretrain.py, linear_probe.py or finetune.py finishes); pass finished runs"
        )
    out = check_dir(out_dir, "out")  # a file, a path under a file, a read-only place: one line, before any work
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out={os.fspath(out_dir)} cannot be created ({e.strerror}): choose another directory") from e
    tables = build_tables(runs)
    by_path = {str(r.path): r for r in runs}
    files: list[Path] = []
    seed_tables: dict[str, Table] = {}
    md = [f"# Report: {_plural(len(runs), 'run')}", ""]
    for stage, table in tables.items():
        md += [f"## {stage} ({_plural(len(table.rows), 'run')})", ""]
        md += [
            ("Options that differ: " + ", ".join(f"`{k}`" for k in table.keys))
            if table.keys
            else "No option differs between these runs.",
            "",
            to_markdown(table),
            "",
        ]
        summary = seed_summary(table)
        if summary is not None:
            seed_tables[stage] = summary
            md += ["Mean ± sample std over seeds:", "", to_markdown(summary), ""]
        for name, fn in (
            (f"{stage}_by_option.png", lambda p, t=table: plot_by_option(t, p)),
            (f"{stage}_loss_curves.png", lambda p, t=table: plot_loss_curves(t, by_path, p)),
            (f"{stage}_vs_mask_ratio.png", lambda p, t=table: plot_vs_mask_ratio(t, p)),
        ):
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


__all__ = [
    "Report",
    "Run",
    "STAGES",
    "StageSpec",
    "Table",
    "build_tables",
    "describe",
    "differing_keys",
    "find_runs",
    "flatten",
    "format_value",
    "load_runs",
    "make_report",
    "mean_std",
    "seed_summary",
    "to_markdown",
    "write_csv",
]
