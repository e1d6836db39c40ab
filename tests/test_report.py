"""Tests for sslvit.report / report.py on run dirs written with the real writers (Hydra-composed configs saved
the way Hydra saves them, MetricWriter's metrics.jsonl, results.json as the stages write it)."""

import csv
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from sslvit.errors import ConfigError
from sslvit.metrics import MetricWriter
from sslvit.report import (
    build_tables,
    differing_keys,
    flatten,
    load_runs,
    make_report,
    mean_std,
    seed_summary,
    to_markdown,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import report as report_script

# (stem, seed) -> pretraining test accuracy; 4 runs that differ in stem and seed only.
ACC = {("hmlp", 0): 0.31, ("hmlp", 1): 0.33, ("linear", 0): 0.27, ("linear", 1): 0.26}
PRETRAIN_METRICS = ["test_accuracy", "chance_accuracy", "train_loss", "train_accuracy", "images_per_sec", "params"]


def write_run(run_dir: Path, cfg, results: dict, losses=None) -> Path:
    """A run dir as the stages leave it: .hydra/config.yaml, results.json, metrics.jsonl."""
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what Hydra writes for the job's config
    if losses is not None:
        with MetricWriter(run_dir) as w:
            for i, loss in enumerate(losses, start=1):
                w.write(10 * i, {"loss": loss, "accuracy": 0.1 * i, "images_per_sec": 100.0})
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return run_dir


def pretrain_results(run_dir: Path, acc: float, loss: float, **extra) -> dict:
    return {
        "stage": "pretrain",
        "run_dir": str(run_dir),
        "steps": 30,
        "params": 123456,
        "train_loss": loss,
        "train_accuracy": 0.2,
        "images_per_sec": 250.0,
        "nonfinite_steps": 0,
        "chance_accuracy": 0.05,
        "test_accuracy": acc,
        "test_codebook_usage": 0.9,
        "test_batches": 4,
        **extra,
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, hydra_compose):
    """A Hydra-style sweep dir with 4 pretraining runs (stem x seed) and a stray non-run dir."""
    root = tmp_path_factory.mktemp("sweep")
    for i, ((stem, seed), acc) in enumerate(ACC.items()):
        cfg = hydra_compose("pretrain", [f"stem={stem}", f"seed={seed}", "steps=30"])
        run = root / f"{i}_seed={seed},stem={stem}"
        write_run(run, cfg, pretrain_results(run, acc, loss=3.0 - acc), losses=[4.0, 3.5 - seed * 0.1, 3.0 - acc])
    (root / "notes").mkdir()  # no results.json: not a run
    (root / "notes" / "x.txt").write_text("hi")
    return root


def test_flatten_and_differing_keys():
    a = flatten(
        {
            "stem": {"name": "hmlp", "norm": "batch"},
            "mask_ratio": 0.4,
            "seed": 0,
            "data": {"mean": [1, 2]},
            "progress": True,
        }
    )
    b = flatten(
        {
            "stem": {"name": "conv", "norm": "batch"},
            "mask_ratio": 0.4,
            "seed": 1,
            "data": {"mean": [1, 3]},
            "progress": False,
        }
    )
    assert a["stem.name"] == "hmlp" and a["data.mean"] == (1, 2)
    # progress never explains a result; seeds go last; lists compare by value
    assert differing_keys([a, b]) == ["stem.name", "data.mean", "seed"]
    assert differing_keys([a, dict(a)]) == []
    c = dict(a, extra=1)  # a key only some runs have differs
    assert differing_keys([a, c]) == ["extra"]
    d = dict(a, **{"distributed.enabled": "auto", "pretrain.resume": True})  # infra and bookkeeping never count
    assert differing_keys([a, d]) == []


def test_table_columns_values_and_seed_summary(sweep):
    runs = load_runs([sweep])
    assert len(runs) == 4 and {r.stage for r in runs} == {"pretrain"}
    table = build_tables(runs)["pretrain"]
    assert table.keys == ["stem.name", "seed"]
    assert table.columns == ["run", "stem.name", "seed", *PRETRAIN_METRICS]
    got = {(r["stem.name"], r["seed"]): r for r in table.rows}
    assert set(got) == set(ACC)
    for key, acc in ACC.items():
        assert got[key]["test_accuracy"] == acc
        assert got[key]["train_loss"] == pytest.approx(3.0 - acc)
    assert [(r["stem.name"], r["seed"]) for r in table.rows] == sorted(ACC)  # ordered by the option values

    summary = seed_summary(table)
    assert summary.keys == ["stem.name"]
    rows = {r["stem.name"]: r for r in summary.rows}
    for stem in ("hmlp", "linear"):
        xs = [ACC[(stem, s)] for s in (0, 1)]
        assert rows[stem]["n_seeds"] == 2
        assert rows[stem]["test_accuracy_mean"] == pytest.approx(np.mean(xs))
        assert rows[stem]["test_accuracy_std"] == pytest.approx(np.std(xs, ddof=1))
    md = to_markdown(summary)
    assert "| hmlp | 2 | 0.3200 ± 0.0141 |" in md and "| linear | 2 | 0.2650 ± 0.0071 |" in md


def _png_ok(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 5000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"), dtype=np.float32)
        assert arr.std() > 5, f"{path} is blank"
        return im.size


def test_make_report_files(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert report_script.main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert md in printed
    header = "| run | stem.name | seed | " + " | ".join(PRETRAIN_METRICS) + " |"
    assert header in md
    assert "| 0_seed=0,stem=hmlp | hmlp | 0 | 0.3100 | 0.0500 | 2.6900 | 0.2000 | 250 | 123456 |" in md

    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["stage", "run", "stem.name", "seed", *PRETRAIN_METRICS]
    assert {(r["stem.name"], int(r["seed"])): float(r["test_accuracy"]) for r in rows} == ACC
    with open(out / "report_seeds.csv") as f:
        seeds = {r["stem.name"]: r for r in csv.DictReader(f)}
    assert float(seeds["linear"]["test_accuracy_mean"]) == pytest.approx(0.265)
    assert float(seeds["linear"]["test_accuracy_std"]) == pytest.approx(statistics.stdev([0.27, 0.26]))

    for name in ("pretrain_by_option.png", "pretrain_loss_curves.png"):
        w, h = _png_ok(out / name)
        assert w >= 400 and h >= 300
        assert f"![{name}]({name})" in md
    assert not (out / "pretrain_vs_mask_ratio.png").exists()  # mask_ratio is the same in every run


def test_mask_ratio_plot_and_mixed_stages(tmp_path, hydra_compose):
    """A mask-ratio sweep plus a probe and a fine-tune of one of its runs: pretrain.* options and the encoder
    actually used describe the downstream rows; the accuracy-vs-mask-ratio plot is drawn."""
    pre = {}
    for ratio, acc in ((0.2, 0.40), (0.4, 0.30), (0.6, 0.22)):
        run = tmp_path / "pre" / f"mask_ratio={ratio}"
        cfg = hydra_compose("pretrain", [f"mask_ratio={ratio}", "stem=conv"])
        pre[ratio] = write_run(run, cfg, pretrain_results(run, acc, loss=2.0))
    model = {
        "image_size": 32,
        "patch_size": 4,
        "dim": 192,
        "depth": 6,
        "num_parallel_branches": 2,
        "stem": "conv",
        "stem_norm": "batch",
    }
    for ratio in (0.2, 0.6):
        run = tmp_path / "probe" / f"r{ratio}"
        cfg = hydra_compose("linear_probe", [f"run='{pre[ratio]}'"])
        write_run(
            run,
            cfg,
            {
                "stage": "linear_probe",
                "run": str(pre[ratio]),
                "best_top1": ratio,
                "best_layer": 4,
                "best_knn_top1": ratio / 2,
                "chance_top1": 0.1,
                "model": model,
            },
        )
    for mode, top1, mem in (("full", 0.7, 300 * 2**20), ("attn_only", 0.68, 270 * 2**20)):
        run = tmp_path / "ft" / mode
        cfg = hydra_compose("finetune", [f"run='{pre[0.4]}'", f"finetune.mode={mode}"])  # its stem default: hmlp
        write_run(
            run,
            cfg,
            {
                "stage": "finetune",
                "source_run": str(pre[0.4]),
                "mode": mode,
                "test_top1": top1,
                "trainable_params": 1000 if mode == "full" else 400,
                "total_params": 1000,
                "peak_memory_bytes": mem,
                "model": model,
            },
            losses=[2.3, 1.9],
        )

    rep = make_report([tmp_path / "pre", tmp_path / "probe", tmp_path / "ft"], tmp_path / "out")
    assert list(rep.tables) == ["pretrain", "linear_probe", "finetune"]
    assert rep.tables["pretrain"].keys == ["mask_ratio"]
    probe = rep.tables["linear_probe"]
    assert probe.keys == ["pretrain.mask_ratio"]  # not `run` (a path), not the probe's own unused keys
    assert [r["pretrain.mask_ratio"] for r in probe.rows] == [0.2, 0.6]
    ft = rep.tables["finetune"]
    assert ft.keys == ["finetune.mode.name"]
    runs = {r.stage: r for r in load_runs([tmp_path / "ft"])}
    # the encoder comes from results['model'] (conv), not the fine-tune config's unused stem default (hmlp)
    assert runs["finetune"].config["stem.name"] == "conv" and runs["finetune"].config["pretrain.mask_ratio"] == 0.4
    assert {r["finetune.mode.name"]: r["peak_memory_mib"] for r in ft.rows} == {"full": 300.0, "attn_only": 270.0}
    assert ft.metrics == ["test_top1", "trainable_params", "total_params", "peak_memory_mib"]
    names = {p.name for p in rep.files}
    assert {
        "report.md",
        "report.csv",
        "pretrain_by_option.png",
        "pretrain_vs_mask_ratio.png",
        "linear_probe_vs_mask_ratio.png",
        "finetune_loss_curves.png",
    } <= names
    assert "report_seeds.csv" not in names  # no seed differs
    for name in ("pretrain_vs_mask_ratio.png", "linear_probe_vs_mask_ratio.png", "finetune_by_option.png"):
        _png_ok(tmp_path / "out" / name)
    with open(tmp_path / "out" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["pretrain"] * 3 + ["linear_probe"] * 2 + ["finetune"] * 2

    # a from-scratch baseline next to the fine-tunes differs in `init`, not in every pretraining option
    run = tmp_path / "ft" / "scratch"
    write_run(
        run,
        hydra_compose("finetune", ["run=null"]),
        {"stage": "finetune", "source_run": None, "mode": "full", "test_top1": 0.5, "model": model},
    )
    ft = build_tables(load_runs([tmp_path / "ft"]))["finetune"]
    assert ft.keys == ["init", "finetune.mode.name"]
    assert {(r["init"], r["finetune.mode.name"]): r["test_top1"] for r in ft.rows} == {
        ("pretrained", "attn_only"): 0.68,
        ("pretrained", "full"): 0.7,
        ("scratch", "full"): 0.5,
    }

    # a probe of a fine-tuned encoder: the source's options are `source.*`, not `pretrain.*`
    run = tmp_path / "probe_of_ft"
    write_run(
        run,
        hydra_compose("linear_probe", [f"run='{tmp_path / 'ft' / 'full'}'"]),
        {"stage": "linear_probe", "run": str(tmp_path / "ft" / "full"), "best_top1": 0.5, "model": model},
    )
    (cfg,) = [r.config for r in load_runs([run])]
    assert cfg["source.finetune.mode.name"] == "full" and not any(k.startswith("pretrain.") for k in cfg)


def test_config_from_checkpoint_meta(tmp_path):
    """A run made by calling pretrain() directly has no .hydra dir: the checkpoint meta's config is used."""
    from sslvit.checkpoint import Checkpointer

    for stem in ("hmlp", "linear"):
        run = tmp_path / stem
        with Checkpointer(run / "checkpoints") as ck:
            ck.save(
                1,
                {"params": {"w": np.zeros(2, np.float32)}},
                meta={"stage": "pretrain", "config": {"stem": {"name": stem}, "seed": 0}},
            )
        (run / "results.json").write_text(json.dumps(pretrain_results(run, 0.5, 1.0)))
    table = build_tables(load_runs([tmp_path]))["pretrain"]
    assert table.keys == ["stem.name"] and [r["stem.name"] for r in table.rows] == ["hmlp", "linear"]


def test_bad_input(tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        load_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no run dirs under"):
        make_report([tmp_path / "empty"], tmp_path / "out")
    assert report_script.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    # a broken or foreign results.json is skipped, not fatal
    (tmp_path / "empty" / "results.json").write_text("{not json")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps({"stage": "something_else"}))
    assert load_runs([tmp_path]) == []


def test_mean_std():
    m, s = mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and s == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert math.isnan(mean_std([3.0])[1])
