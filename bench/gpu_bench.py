"""The GPU measurements behind bench/gpu_check.sh, and the summary/README table made from them.

    python bench/gpu_bench.py jax --out DIR [--variant NAME] [--rows NAME ...]   # our steps (+ the JAX matmul peak)
    python bench/gpu_bench.py torch --out DIR                                    # timm peers + the torch matmul peak
    python bench/gpu_bench.py summary --out DIR [--readme README.md]             # DIR/summary.json, table

Each measurement appends one JSON row to DIR/rows.jsonl as soon as it is done, so a command stopped by its time
limit keeps what it measured. `summary` takes the dense matmul peak of each dtype as the higher of JAX's and
torch's random-operand n³ matmul measured in the same run (it says which), computes MFU = model FLOPs per step
(sslvit/flops.py) / step time / peak, and writes DIR/summary.json: rows {step, preset, dtype, batch,
images_per_sec, mfu, peak_tflops, ...} (timm rows carry "peer": "timm") and the issue's targets checked.

SSLVIT_BENCH_TINY=1 swaps every shape for a tiny one (32 px, dim 64, 2 layers; batch 4-8; 256² matmuls): the
whole pipeline runs on a CPU in a few minutes, to check the script; its figures mean nothing.

Nothing here imports TensorFlow or Hydra (a bare GPU image has neither).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

TINY = os.environ.get("SSLVIT_BENCH_TINY", "") not in ("", "0")
TINY_MODEL = dict(
    image_size=32,
    patch_size=8,
    dim=64,
    depth=2,
    num_parallel_branches=2,
    heads=2,
    dim_head=None,
    mlp_dim=128,
    pool="cls",
    pos_embedding="learned",
    drop_path=0.1,
    layer_scale_init=0.1,
    dropout=0.0,
    emb_dropout=0.0,
    channels=3,
    dtype="float32",
    remat=False,
    unroll_layers=False,
)
# The settings: ViT-B 18x2 at 224 px (196 patches), 40% block masks, 8192 k-means codes; CIFAR preset with
# the 512 codes of its recipe.
VOCAB = {"vit_b18x2": 16 if TINY else 8192, "cifar": 16 if TINY else 512}
BATCH = {"vit_b18x2": 4 if TINY else 128, "cifar": 8 if TINY else 1024}
TIMM_NAME = {"vit_b18x2": "vit_base_patch16_18x2_224"}
MATMUL_N = 256 if TINY else 8192


def preset_of(name: str):
    """A bench/common.py preset name, or (tiny mode) a tiny model dict of the same structure."""
    return dict(TINY_MODEL) if TINY else name


def model_cfg(name: str) -> dict:
    from common import PRESETS, load_model_yaml

    return dict(TINY_MODEL) if TINY else load_model_yaml(PRESETS[name])


def append(out: Path, row: dict) -> None:
    row = dict(row, tiny=TINY, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    with open(out / "rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    keys = ("step", "preset", "dtype", "batch", "variant", "images_per_sec", "tflops", "peak_memory_gib", "error")
    print(
        " ".join(
            f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row[k]}"
            for k in keys
            if row.get(k) is not None
        ),
        flush=True,
    )


# ------------------------------------------------------------------------------------------------ JAX
# name -> (kind, preset, dtype, batch multiplier, model overrides). Run in this order (most important first), each
# under the time left.
JAX_ROWS = {
    "vitb_pretrain_bf16": ("pretrain", "vit_b18x2", "bfloat16", 1, {}),
    "cifar_pretrain_bf16": ("pretrain", "cifar", "bfloat16", 1, {}),
    "cifar_pretrain_bf16_x4": ("pretrain", "cifar", "bfloat16", 4, {}),
    "vitb_finetune_bf16": ("finetune_full", "vit_b18x2", "bfloat16", 1, {}),
    "cifar_finetune_bf16": ("finetune_full", "cifar", "bfloat16", 1, {}),
    "cifar_finetune_attn_bf16": ("finetune_attn_only", "cifar", "bfloat16", 1, {}),
    "vitb_pretrain_bf16_explicit_attention": ("pretrain", "vit_b18x2", "bfloat16", 1, {"attention": "explicit"}),
    "vitb_pretrain_bf16_x2": ("pretrain", "vit_b18x2", "bfloat16", 2, {}),
    "vitb_finetune_attn_bf16": ("finetune_attn_only", "vit_b18x2", "bfloat16", 1, {}),
    "vitb_pretrain_bf16_x2_remat_dots": (
        "pretrain",
        "vit_b18x2",
        "bfloat16",
        2,
        {"remat": True, "remat_policy": "dots_with_no_batch_dims_saveable"},
    ),
    "cifar_pretrain_bf16_x0.25": ("pretrain", "cifar", "bfloat16", 0.25, {}),
    "cifar_pretrain_f32": ("pretrain", "cifar", "float32", 1, {}),
    "vitb_pretrain_bf16_unrolled": ("pretrain", "vit_b18x2", "bfloat16", 1, {"unroll_layers": True}),
}
FLAG_ROWS = ["cifar_pretrain_bf16", "vitb_pretrain_bf16"]  # what an XLA-flag variant measures


def jax_peak(out: Path, variant: str) -> None:
    from common import peak_matmul, timeit

    import jax.numpy as jnp

    for dtype in ("bfloat16", "float32"):
        fn, flops = peak_matmul(jnp.bfloat16 if dtype == "bfloat16" else jnp.float32, MATMUL_N)
        sec = timeit(fn, min_time=1.0)
        append(
            out,
            dict(step="peak_matmul", impl="jax", dtype=dtype, n=MATMUL_N, variant=variant, tflops=flops / sec / 1e12),
        )


def jax_row(out: Path, name: str, variant: str) -> None:
    from common import device_line, finetune_step, pretrain_step, timeit

    kind, preset, dtype, mult, over = JAX_ROWS[name]
    batch = max(1, int(BATCH[preset] * mult))
    if kind == "pretrain":
        s = pretrain_step(preset_of(preset), batch, dtype=dtype, vocab=VOCAB[preset], **over)
    else:
        s = finetune_step(preset_of(preset), batch, dtype=dtype, mode=kind.split("_", 1)[1], **over)
    compiled = s.compile()
    sec = timeit(s.run, min_time=1.0, min_iters=5, warmup=2)
    mem = peak_memory(compiled)
    append(
        out,
        dict(
            step=kind,
            preset=preset,
            dtype=dtype,
            batch=batch,
            variant=variant,
            row=name,
            overrides=over or None,
            sec_per_step=sec,
            images_per_sec=batch / sec,
            flops_per_step=s.flops,
            compile_s=s.compile_s,
            peak_memory_gib=mem / 2**30 if mem else None,
            device=device_line(),
        ),
    )


def peak_memory(compiled) -> int | None:
    """XLA's memory analysis of a compiled step: arguments + outputs + temporaries - donated aliases (bytes), as
    sslvit.finetune.memory_report (not imported: that module pulls in the TensorFlow input pipeline)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:
        return None
    if ma is None:
        return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes)


def cmd_jax(args) -> None:
    out = Path(args.out)
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    names = args.rows or (FLAG_ROWS if args.variant != "default" else list(JAX_ROWS))
    if args.variant == "default":
        jax_peak(out, args.variant)
    for name in names:
        if deadline and time.monotonic() > deadline:
            append(out, dict(step="skipped", row=name, variant=args.variant, error="time budget spent"))
            continue
        try:
            jax_row(out, name, args.variant)
        except Exception as e:
            traceback.print_exc()
            append(out, dict(step="failed", row=name, variant=args.variant, error=f"{type(e).__name__}: {e}"[:300]))


# ------------------------------------------------------------------------------------------------ torch / timm
def cmd_torch(args) -> None:
    from common import timeit

    import torch
    from torch_peers import TorchStep, timm_vit, torch_matmul

    out = Path(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    for dtype in ("bfloat16", "float32"):
        if device == "cuda" or TINY:
            fn, flops = torch_matmul(dtype, MATMUL_N, device)
            sec = timeit(fn, min_time=1.0)
            append(
                out,
                dict(
                    step="peak_matmul",
                    impl="torch",
                    dtype=dtype,
                    n=MATMUL_N,
                    tflops=flops / sec / 1e12,
                    torch=torch.__version__,
                ),
            )
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    for preset in ("cifar", "vit_b18x2"):
        if deadline and time.monotonic() > deadline:
            append(out, dict(step="skipped", preset=preset, peer="timm", error="time budget spent"))
            continue
        try:
            cfg = model_cfg(preset)
            model = timm_vit(cfg, 10, timm_name=None if TINY else TIMM_NAME.get(preset))
            batch = BATCH[preset]
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            s = TorchStep(model, batch, device=device, dtype="bfloat16", compile=True, image_size=cfg["image_size"])
            sec = timeit(s.run, min_time=1.0, min_iters=5, warmup=2)
            mem = s.peak_memory()
            append(
                out,
                dict(
                    step="supervised",
                    peer="timm",
                    preset=preset,
                    dtype="bfloat16",
                    batch=batch,
                    model=TIMM_NAME.get(preset, "VisionTransformer+ParallelThingsBlock"),
                    sec_per_step=sec,
                    images_per_sec=batch / sec,
                    flops_per_step=batch * _train_flops(cfg),
                    compile_s=s.compile_s,
                    peak_memory_gib=mem / 2**30 if mem else None,
                    torch=torch.__version__,
                    settings="torch.compile, bf16 autocast, AdamW",
                ),
            )
        except Exception as e:
            traceback.print_exc()
            append(out, dict(step="failed", preset=preset, peer="timm", error=f"{type(e).__name__}: {e}"[:300]))


def _train_flops(cfg: dict) -> int:
    """Analytic train FLOPs per image of the classifier with this config's shape (linear stem, 10 classes): the
    work of timm's step, counted as ours."""
    from sslvit.flops import train_flops
    from sslvit.models.build import build_vit, from_flat

    return train_flops(build_vit(from_flat(dict(cfg, stem="linear", stem_norm="batch")), num_classes=10))


# ------------------------------------------------------------------------------------------------ summary
def load_rows(out: Path) -> list[dict]:
    path = out / "rows.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarize(rows: list[dict]) -> tuple[list[dict], dict]:
    """(summary rows, target checks) from the raw rows of one run."""
    peaks = {}
    for r in rows:
        if r.get("step") == "peak_matmul" and (r["dtype"] not in peaks or r["tflops"] > peaks[r["dtype"]][0]):
            peaks[r["dtype"]] = (r["tflops"], r["impl"])
    summary = []
    for r in rows:
        if r.get("step") in ("peak_matmul", "skipped", "failed") or "images_per_sec" not in r:
            continue
        peak, impl = peaks.get(r["dtype"], (None, None))
        tflops = r["flops_per_step"] / r["sec_per_step"] / 1e12
        row = {
            "step": r["step"],
            "preset": r["preset"],
            "dtype": r["dtype"],
            "batch": r["batch"],
            "images_per_sec": round(r["images_per_sec"], 1),
            "mfu": round(tflops / peak, 4) if peak else None,
            "peak_tflops": float(f"{peak:.4g}") if peak else None,
            "peak_source": impl,
            "model_tflops": float(f"{tflops:.4g}"),
        }
        for k in ("peer", "variant", "overrides", "peak_memory_gib", "compile_s", "model"):
            if r.get(k) is not None:
                row[k] = round(r[k], 3) if isinstance(r[k], float) else r[k]
        summary.append(row)
    return summary, check_targets(summary, peaks)


def _best(rows, **match):
    cands = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and r.get("images_per_sec")]
    return max(cands, key=lambda r: r["mfu"] or 0.0, default=None)


def check_targets(summary: list[dict], peaks: dict) -> dict:
    """The issue's targets, each with the row it was read from (None where that row was not measured)."""
    ours = [r for r in summary if "peer" not in r]
    timm = {r["preset"]: r for r in summary if r.get("peer") == "timm"}
    t = {"peaks_tflops": {k: {"tflops": float(f"{v[0]:.4g}"), "source": v[1]} for k, v in peaks.items()}}
    for name, preset, goal in (
        ("vit_b18x2_pretrain_bf16_mfu", "vit_b18x2", 0.40),
        ("cifar_pretrain_bf16_mfu", "cifar", 0.30),
    ):
        best = _best(ours, step="pretrain", preset=preset, dtype="bfloat16")
        t[name] = {
            "goal": goal,
            "value": best and best["mfu"],
            "met": bool(best and best["mfu"] and best["mfu"] >= goal),
            "row": best,
        }
    for preset in ("vit_b18x2", "cifar"):
        peer = timm.get(preset)
        for step in ("pretrain", "finetune_full"):
            mine = [
                r
                for r in ours
                if r["step"] == step
                and r["preset"] == preset
                and r["dtype"] == "bfloat16"
                and peer
                and r["batch"] == peer["batch"]
            ]
            best = max(mine, key=lambda r: r["images_per_sec"], default=None)
            ratio = best["images_per_sec"] / peer["images_per_sec"] if best and peer else None
            t[f"{preset}_{step}_vs_timm"] = {
                "goal": 1.2,
                "value": ratio and round(ratio, 3),
                "met": bool(ratio and ratio >= 1.2),
            }
    for preset in ("cifar", "vit_b18x2"):
        mem = {
            r["step"]: r.get("peak_memory_gib")
            for r in ours
            if r["preset"] == preset
            and r["dtype"] == "bfloat16"
            and r["step"].startswith("finetune_")
            and "variant" in r
            and r["variant"] == "default"
        }
        full, attn = mem.get("finetune_full"), mem.get("finetune_attn_only")
        ratio = attn / full if full and attn else None
        t[f"{preset}_attn_only_memory"] = {
            "goal": "<= 0.80 of full",
            "value": ratio and round(ratio, 3),
            "met": bool(ratio and ratio <= 0.80),
        }
    return t


def table(summary: list[dict], device: str, tiny: bool = False) -> str:
    """The README's GPU table (markdown)."""
    lines = [
        "| step | preset | variant | dtype | batch | images/s | MFU | peak memory (GiB) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in summary:
        step = f"timm {r.get('model', 'supervised')}" if r.get("peer") else r["step"]
        overrides = [f"{k}={v}" for k, v in (r.get("overrides") or {}).items()]
        variant = ", ".join(([r["variant"]] if "variant" in r else []) + overrides)
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.3g}" if r.get("peak_memory_gib") is not None else ""
        lines.append(
            f"| {step} | {r['preset']} | {variant} | {r['dtype']} | {r['batch']} | "
            f"{r['images_per_sec']:,.0f} | {mfu} | {mem} |"
        )
    peaks = sorted({(r["dtype"], r["peak_tflops"], r["peak_source"]) for r in summary if r.get("peak_tflops")})
    lines.append("")
    lines.append(
        f"{device}. MFU against the dense matmul peak measured in the same run: "
        + "; ".join(f"{d} {p:.3g} TFLOP/s ({s})" for d, p, s in peaks)
        + "."
        + (" TINY SHAPES (SSLVIT_BENCH_TINY): a check of the script, not a measurement." if tiny else "")
    )
    return "\n".join(lines)


def cmd_summary(args) -> None:
    out = Path(args.out)
    rows = load_rows(out)
    summary, targets = summarize(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "targets.json").write_text(json.dumps(targets, indent=2) + "\n")
    device = (out / "device.txt").read_text().strip().splitlines()[0] if (out / "device.txt").exists() else "device ?"
    md = table(summary, device, tiny=any(r.get("tiny") for r in rows))
    (out / "table.md").write_text(md + "\n")
    print(md)
    for k, v in targets.items():
        if k != "peaks_tflops":
            verdict = "not measured" if v.get("value") is None else ("met" if v["met"] else "NOT met")
            print(f"target {k}: {v.get('value')} (goal {v['goal']}): {verdict}")
    failed = [r for r in rows if r.get("step") in ("failed", "skipped")]
    for r in failed:
        print(f"{r['step']}: {r.get('row') or r.get('preset')} {r.get('variant', '')} {r.get('error')}")
    if args.readme:
        replace_block(Path(args.readme), md)


BEGIN, END = "<!-- gpu-table: generated by bench/gpu_bench.py summary -->", "<!-- gpu-table end -->"


def replace_block(readme: Path, md: str) -> None:
    """Put `md` between the README's generated-table markers."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {readme} has no '{BEGIN}' ... '{END}' block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{md}\n{END}{tail}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("jax")
    j.add_argument("--out", required=True)
    j.add_argument("--variant", default="default", help="label of this process's XLA_FLAGS (rows carry it)")
    j.add_argument("--rows", nargs="*", choices=sorted(JAX_ROWS), help=f"default: all ({list(JAX_ROWS)})")
    j.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    t = sub.add_parser("torch")
    t.add_argument("--out", required=True)
    t.add_argument("--budget-s", type=float, default=None)
    s = sub.add_parser("summary")
    s.add_argument("--out", required=True)
    s.add_argument("--readme", default=None, help="also write the table into this README's generated block")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    {"jax": cmd_jax, "torch": cmd_torch, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    main()
