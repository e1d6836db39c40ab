"""Where a train step's time goes: a JAX profiler trace of a few steps, each executed op sorted into a category by
what the optimised HLO says it is.

    python bench/profile_step.py                                    # CIFAR preset pretraining step, batch 128
    python bench/profile_step.py --step finetune                    # the fine-tuning step
    python bench/profile_step.py --preset vit_b18x2 --batch 128 --dtype bfloat16 --vocab 8192   # ViT-B 18x2 (GPU)

Categories (per executed op: a CPU thunk or a GPU kernel, matched to its HLO instruction by name):

- matmul: fusions and custom calls holding a dot or convolution (projections, MLP, stem, heads, the tokenizer's
  assignment) outside the attention scope;
- attention: q·kᵀ, softmax, probs·v and their backward (the model's `attention` named scope, or a cuDNN
  fused-attention call);
- layernorm, gelu, drop_path (mask sampling, scaling, the per-sample bias), fold (LayerNorm/LayerScale weight
  folding, forward and backward): the model's named scopes (sslvit/models/vit.py), by the scope most of a fusion's
  instructions carry;
- layout: copies and transposes (outside the named scopes), e.g. q, k, v taken apart into heads;
- optimizer: ops outside the loss's forward and backward (AdamW, gradient clipping, the non-finite guard);
- other: everything else the model and loss run (residual adds, biases, copies and layout changes, the loss);
- host: the step's wall time not covered by any op (dispatch, synchronisation, idle).

Op times are summed per category (ops that overlap on several threads each count); `host` is wall time minus the
union of op intervals. The figures describe one device and one run; print them with the machine's load.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import tempfile
from collections import Counter, defaultdict

from common import PRESETS, device_line, finetune_step, parse_overrides, pretrain_step

import jax
import numpy as np

SCOPES = ("attention", "drop_path", "layernorm", "gelu", "fold")
CATEGORIES = ("matmul", "attention", "layernorm", "gelu", "drop_path", "fold", "layout", "other", "optimizer", "host")
CONTROL_FLOW = ("while", "conditional", "call")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_DIMS = re.compile(r"\w+\[([\d,]*)\]")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def parse_hlo(text: str) -> dict:
    """{instruction name: (opcode, op_name, called computations, custom-call target, elements)} and
    {computation: [instruction names]}."""
    instrs, comps, current = {}, defaultdict(list), None
    for line in text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            m = _COMP.match(line.strip())
            current = m.group(1) if m else None
            continue
        m = _INSTR.match(line)
        if not m or current is None:
            continue
        name, shape, opcode, rest = m.groups()
        elems = sum(int(np.prod([int(d) for d in dims.split(",") if d])) for dims in _DIMS.findall(shape))
        op_name = re.search(r'op_name="([^"]*)"', rest)
        called = re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", rest)
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        instrs[name] = (opcode, op_name.group(1) if op_name else "", called, target.group(1) if target else "", elems)
        comps[current].append(name)
    return {"instrs": instrs, "comps": comps}


def _inner(hlo: dict, name: str, seen=None) -> list[str]:
    """All instructions a fusion / call executes (transitively), including itself."""
    seen = set() if seen is None else seen
    out = [name]
    for comp in hlo["instrs"][name][2]:
        if comp in seen:
            continue
        seen.add(comp)
        for inner in hlo["comps"].get(comp, []):
            out += _inner(hlo, inner, seen)
    return out


def categorize(hlo: dict, name: str) -> str:
    """The category of an executed instruction (module doc). A fusion's named scope is read from the instructions
    on its main loop (as many elements as its output): a weight-sized fold fused into an activation-sized bias add
    is the add's, not the fold's."""
    opcode, op_name, _, target, _ = hlo["instrs"][name]
    inner = [hlo["instrs"][n] for n in _inner(hlo, name)]
    names = [o for _, o, _, _, _ in inner if o]
    if "fmha" in target.lower() or "attention" in target.lower():
        return "attention"
    dots = [o for c, o, _, t, _ in inner if c in ("dot", "convolution") or "gemm" in t.lower() or "matmul" in t.lower()]
    if dots:
        if any("/attention/" in o for o in dots):
            return "attention"
        return "drop_path" if all("/drop_path/" in o for o in dots) else "matmul"
    size = hlo["instrs"][name][4]
    main = [(c, o) for c, o, _, _, e in inner if o and e == size and c != "parameter"]
    tags = Counter(s for _, o in main for s in SCOPES if f"/{s}/" in o)
    if not tags and any(c in ("transpose", "copy") for c, _ in main):
        return "layout"
    tags = tags or Counter(s for o in names for s in SCOPES if f"/{s}/" in o)
    if tags:
        return tags.most_common(1)[0][0]
    if not any(("jvp(" in o or "transpose(" in o) for o in names + [op_name]):
        return "optimizer"
    return "other"


def _union(intervals) -> float:
    total, end = 0.0, -np.inf
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def trace_events(logdir: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        raise SystemExit(f"no perfetto trace written under {logdir}")
    data = json.load(gzip.open(files[-1]))
    return data["traceEvents"] if isinstance(data, dict) else data


def profile(step, steps: int, hlo: dict) -> dict:
    """Trace `steps` runs of a compiled bench Step; per-category op milliseconds per step, wall, host."""
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for i in range(steps):
                with jax.profiler.StepTraceAnnotation("train", step_num=i):
                    step.run()
        events = trace_events(logdir)
    procs = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device_pids = {p for p, n in procs.items() if "/device:" in n and "CPU" not in n.upper()}
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e["name"] == "train")
    per_cat, per_op, intervals, unmatched = defaultdict(float), defaultdict(float), [], Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if device_pids and e["pid"] not in device_pids:
            continue  # on a GPU: count the kernels, not the host threads that launch them
        args = e.get("args", {})
        name = args.get("hlo_op") or e["name"]
        if name not in hlo["instrs"]:
            if device_pids:
                unmatched[e["name"][:60]] += e["dur"]
            continue
        if hlo["instrs"][name][0] in CONTROL_FLOW:
            continue  # the ops of its body are events of their own
        cat = categorize(hlo, name)
        per_cat[cat] += e["dur"]
        per_op[name] += e["dur"]
        intervals.append((e["ts"], e["ts"] + e["dur"]))
    wall = sum(b - a for a, b in windows)
    busy = sum(_union([iv for iv in intervals if iv[0] < b and iv[1] > a]) for a, b in windows)
    n = max(len(windows), 1)
    ms = {c: per_cat.get(c, 0.0) / 1e3 / n for c in CATEGORIES if c != "host"}
    ms["host"] = max(wall - busy, 0.0) / 1e3 / n
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
    return {
        "wall_ms": wall / 1e3 / n,
        "busy_ms": busy / 1e3 / n,
        "ms": ms,
        "steps": len(windows),
        "top_ops": [(k, categorize(hlo, k), v / 1e3 / n, hlo["instrs"][k][1][-90:]) for k, v in top],
        "unmatched_ms": {k: v / 1e3 / n for k, v in unmatched.most_common(10)},
    }


def report(res: dict, title: str) -> str:
    lines = [title, f"wall {res['wall_ms']:.1f} ms/step (ops cover {res['busy_ms']:.1f} ms), {res['steps']} steps"]
    total = sum(res["ms"].values())
    lines.append(f"{'category':>10} | {'ms/step':>9} | share of op+host time")
    for c in CATEGORIES:
        lines.append(f"{c:>10} | {res['ms'][c]:9.2f} | {100 * res['ms'][c] / total:5.1f}%")
    lines.append("heaviest ops (ms/step, category, op_name):")
    for name, cat, ms, op_name in res["top_ops"]:
        lines.append(f"  {ms:8.2f}  {cat:>9}  {name:<28} {op_name}")
    if res["unmatched_ms"]:
        lines.append(f"device events not matched to the step's HLO (ms/step): {res['unmatched_ms']}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar", choices=sorted(PRESETS))
    ap.add_argument("--step", default="pretrain", choices=("pretrain", "finetune"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vocab", type=int, default=512, help="k-means codes of the pretraining target")
    ap.add_argument("--steps", type=int, default=3, help="traced steps (after 2 warm-up steps)")
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides")
    ap.add_argument("--json", default=None, help="also write the breakdown to this file")
    args = ap.parse_args()
    over = parse_overrides(args.model)
    if args.step == "pretrain":
        step = pretrain_step(args.preset, args.batch, dtype=args.dtype, vocab=args.vocab, **over)
    else:
        step = finetune_step(args.preset, args.batch, dtype=args.dtype, **over)
    compiled = step.compile()
    hlo = parse_hlo(compiled.as_text())
    step.run(), step.run()
    res = profile(step, args.steps, hlo)
    title = (
        f"{device_line()}\n{args.step} step, {args.preset}, batch {args.batch}, {args.dtype}"
        + (f", vocab {args.vocab}" if args.step == "pretrain" else "")
        + (f"; overrides {over}" if over else "")
        + f"; load {os.getloadavg()[0]:.1f}"
    )
    print(report(res, title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(res, step=args.step, preset=args.preset, batch=args.batch, dtype=args.dtype, device=device_line()),
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
