#!/usr/bin/env python3
"""What the pretraining buys, on CIFAR-10, end to end: pretrained vs random-init encoder (linear probe) and
pretrained vs from-scratch fine-tuning with the same recipe and budget, plus a transfer probe on a dataset the
encoder never saw.

    python experiments/cifar10_evidence.py --budget cpu                       # ~45 min on a 2-core CPU
    python experiments/cifar10_evidence.py --budget gpu --data <dir>          # <= 9 min on one H200
    python experiments/cifar10_evidence.py --budget gpu --stems linear,conv   # the second run: the other stems

Per stem (hmlp by default), each stage a plain command of this repository (the log holds them all):

  1. `pretrain.py experiment=cifar10_pretrain`: BEiT-style masked-token pretraining (held-out masked-token accuracy
     on the whole test split, against its chance level);
  2. `linear_probe.py` of that encoder and of the same architecture at random init (`random_init=true`): a linear
     classifier per layer on frozen cls+mean features, tested on all 10,000 test images; the best layer counts;
  3. `finetune.py experiment=cifar10_finetune` from the pretrained encoder, and from scratch (`run=null`): the same
     recipe and budget, top-1 on all 10,000 test images;
  4. the transfer probe: (2) on scikit-learn's handwritten digits (experiments/make_digits.py), pretrained vs random.

then `report.py` (tables, loss curves), `evidence.png` (the curves side by side) and `evidence.json`, whose entry per
(budget, stem) `--results` merges into docs/results/cifar10_evidence.json. The data is the arrays source
(`data=cifar10_arrays`): the training split lives on the accelerator and no TensorFlow is needed. `--data DIR`
holds train.npz / test.npz; without it they are written from tfds first (`python -m sslvit.data.materialize`).

Time guard: every stage has an estimate; one that would end past `--deadline` (gpu: 540 s, cpu: 2,820 s) is skipped
and recorded as such, and a stage still running at the deadline is stopped. A JAX compilation cache under the
output dir lets the runs that compile the same program (the random-init probe, the from-scratch fine-tune) skip it.

A GPU host without internet, TensorFlow or hydra-core (e.g. a JAX CUDA container: JAX, flax, optax, orbax, numpy,
Pillow, matplotlib): on a machine with internet, prepare wheels, data and the digits set beside the checkout,

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl hydra-core==1.3.2 omegaconf==2.3.0
    python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3     # an sdist on PyPI: built here
    python3 -m sslvit.data.materialize cifar10 .data/cifar10                  # train.npz / test.npz (needs tfds)
    python3 experiments/make_digits.py .data/digits                            # needs scikit-learn

copy the checkout with .whl/ and .data/ to the GPU host, and there run

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 experiments/cifar10_evidence.py --budget gpu --data .data/cifar10 --digits .data/digits --out /tmp/evidence

then, back here, `python3 experiments/cifar10_evidence.py --merge /tmp/evidence/evidence.json` adds its entries to
docs/results/cifar10_evidence.json. `--stems linear,conv` is the second run, same command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "cifar10_evidence.json"
LAYERS = "[1,2,3,4,5,6]"  # every layer of the 6-layer encoder: masked-image models probe best in the middle

# Budget-specific overrides of the recipes (conf/experiment/cifar10_pretrain.yaml, cifar10_finetune.yaml).
BUDGETS = {
    "gpu": {  # the recipes as they are: tiny 6x2 (dim 192), bfloat16, batch 1024; 80 + 30 epochs
        "deadline_s": 540,
        "model": [],
        "pretrain": ["progress=false"],
        "finetune": ["progress=false"],
        "probe": ["batch_size=1024", "progress=false"],
        # seconds, from README's H200 throughput (~40k img/s pretraining, ~28k fine-tuning, bf16, batch 1024)
        # plus start-up, compile and evaluation
        "estimates": {"pretrain": 180, "probe": 40, "finetune": 95, "transfer": 25},
    },
    "cpu": {  # the same shape at dim 64 (0.6M parameters), float32, batch 64: ~1 epoch + 1/2 epoch on 2 cores
        "deadline_s": 2820,
        "model": ["model.dim=64", "model.heads=2", "model.mlp_dim=256", "model.dtype=float32"],
        "pretrain": [
            "batch_size=64",
            "steps=700",
            "log_every=25",
            "ckpt_every=700",
            "optim.warmup_steps=50",
            "optim.lr=2e-3",
            "target.vocab_size=256",
            "target.num_samples=100000",
            "progress=false",
        ],
        "finetune": [
            "batch_size=64",
            "steps=400",
            "log_every=25",
            "ckpt_every=400",
            "optim.warmup_steps=40",
            "optim.lr=1e-3",
            "progress=false",
        ],
        "probe": ["data.train_split='train[:10000]'", "batch_size=256", "progress=false"],
        # seconds on a 2-core VM at load 5-12: pretraining ~1.3 s/step, fine-tuning ~1 s/step
        "estimates": {"pretrain": 1080, "probe": 240, "finetune": 560, "transfer": 90},
    },
    "smoke": {  # every stage for a few steps on small splits: checks the script, measures nothing (~6 min on CPU)
        "deadline_s": 900,
        "model": ["model.dim=32", "model.heads=2", "model.mlp_dim=64", "model.dtype=float32"],
        "pretrain": [
            "batch_size=32",
            "steps=20",
            "log_every=5",
            "ckpt_every=20",
            "optim.warmup_steps=5",
            "target.vocab_size=64",
            "target.num_samples=5000",
            "eval_batches=4",
            "progress=false",
        ],
        "finetune": [
            "batch_size=32",
            "steps=20",
            "log_every=5",
            "ckpt_every=20",
            "optim.warmup_steps=5",
            "eval_batches=4",
            "progress=false",
        ],
        "probe": [
            "data.train_split='train[:1000]'",
            "data.test_split='test[:500]'",
            "batch_size=250",
            "probe.epochs=5",
            "progress=false",
        ],
        "estimates": {"pretrain": 120, "probe": 60, "finetune": 90, "transfer": 40},
    },
}


def sh(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


class Runner:
    """Runs the stages one after another under the time guard, logging each command and its outcome."""

    def __init__(self, out: Path, deadline_s: float, log: Path):
        self.out, self.deadline, self.log = out, deadline_s, log
        self.t0 = time.time()
        self.outcomes: dict[str, dict] = {}
        self.env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            TF_CPP_MIN_LOG_LEVEL="3",
            JAX_COMPILATION_CACHE_DIR=str(out / "jax_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1",
        )
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def say(self, text: str) -> None:
        line = f"[{self.elapsed():6.0f} s] {text}"
        print(line, flush=True)
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def __call__(self, name: str, estimate: float, script: str, args: list[str]) -> dict | None:
        """Run `python <script> args hydra.run.dir=<out>/<name>`; its results.json, or None (skipped / failed)."""
        run_dir = self.out / name
        cmd = [sys.executable, script, *args, f"hydra.run.dir={run_dir}"]
        if (run_dir / "results.json").is_file():  # a re-run of the script continues where it stopped
            self.say(f"DONE already: {name}")
            self.outcomes[name] = {"status": "done", "command": sh(cmd)}
            return json.loads((run_dir / "results.json").read_text())
        left = self.deadline - self.elapsed()
        if estimate > left:
            self.say(f"SKIP {name}: its estimate {estimate:.0f} s does not fit the {left:.0f} s left")
            self.outcomes[name] = {"status": "skipped", "command": sh(cmd)}
            return None
        shutil.rmtree(run_dir, ignore_errors=True)  # a previous attempt that did not finish
        self.say(f"START {name}: {sh(cmd)}")
        t = time.time()
        with open(self.out / f"{name}.out", "w") as f:
            try:
                rc = subprocess.run(
                    cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT, timeout=max(left, 1)
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        seconds = round(time.time() - t, 1)
        ok = rc == 0 and (run_dir / "results.json").is_file()
        self.say(f"END {name}: {'ok' if ok else f'FAILED (exit {rc}, see {name}.out)'} in {seconds} s")
        self.outcomes[name] = {"status": "ok" if ok else f"failed ({rc})", "seconds": seconds, "command": sh(cmd)}
        return json.loads((run_dir / "results.json").read_text()) if ok else None


def machine() -> dict:
    import flax
    import jax
    import optax

    d = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if d.platform == "cpu":
        device = f"cpu ({os.cpu_count()}-core {cpu})"  # the load is recorded beside it
    else:
        device = f"{d.device_kind} x {jax.device_count()} ({d.platform}; host {os.cpu_count()} cores {cpu})"
    return {
        "device": device,
        "versions": f"python {platform.python_version()}, jax {jax.__version__}, flax "
        f"{flax.__version__}, optax {optax.__version__}",
    }


def pct(x) -> float | None:
    return None if x is None else round(100.0 * float(x), 2)


def per_layer(res: dict | None) -> dict | None:
    return None if res is None else {k: pct(v) for k, v in res["top1"].items()}


def entry(stem: str, budget: str, r: dict, wall_s: float, info: dict, runner: Runner, args) -> dict:
    """One (budget, stem) entry of the results: top-1 in %, the budgets, where and how it ran."""
    pre, ft, scr = r.get("pretrain"), r.get("finetune"), r.get("scratch")
    probe, rand = r.get("probe"), r.get("probe_random")
    tp, tr = r.get("transfer"), r.get("transfer_random")
    steps_per_epoch = lambda res: 50_000 // res["batch_size"]  # noqa: E731
    out = {
        "budget": budget,
        "stem": stem,
        "probe_pretrained": pct(probe and probe["best_top1"]),
        "probe_pretrained_layer": probe and probe["best_layer"],
        "probe_random_init": pct(rand and rand["best_top1"]),
        "probe_random_init_layer": rand and rand["best_layer"],
        "probe_per_layer": {"pretrained": per_layer(probe), "random_init": per_layer(rand)},
        "probe_train_images": probe and probe["num_train"],
        "probe_test_images": probe and probe["num_test"],
        "finetune_pretrained": pct(ft and ft.get("test_top1")),
        "finetune_scratch": pct(scr and scr.get("test_top1")),
        "finetune_test_images": ft and ft.get("test_examples"),
        "masked_token_accuracy": pct(pre and pre.get("test_accuracy")),
        "masked_token_chance": pct(pre and pre.get("chance_accuracy")),
        "pretrain_epochs": pre and round(pre["steps"] / steps_per_epoch(pre), 2),
        "finetune_epochs": ft and round(ft["steps"] / steps_per_epoch(ft), 2),
        "pretrain_steps": pre and pre["steps"],
        "pretrain_batch": pre and pre["batch_size"],
        "finetune_steps": ft and ft["steps"],
        "finetune_batch": ft and ft["batch_size"],
        "pretrain_images_per_sec": pre and round(pre["images_per_sec"], 1),
        "finetune_images_per_sec": ft and round(ft["images_per_sec"], 1),
        "params": pre and pre.get("params"),
        "transfer": {
            "dataset": "scikit-learn digits (1,000 train / 797 test, 8x8 grey -> 32 px)",
            "probe_pretrained": pct(tp and tp["best_top1"]),
            "probe_random_init": pct(tr and tr["best_top1"]),
            "probe_per_layer": {"pretrained": per_layer(tp), "random_init": per_layer(tr)},
        },
        "wall_s": round(wall_s, 1),
        **info,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"python experiments/cifar10_evidence.py --budget {budget} --stems {stem}",
        "runs": {k: v for k, v in runner.outcomes.items() if k.endswith(f"_{stem}")},
    }
    if out["probe_pretrained"] is not None and out["probe_random_init"] is not None:
        out["probe_gain"] = round(out["probe_pretrained"] - out["probe_random_init"], 2)
    if out["finetune_pretrained"] is not None and out["finetune_scratch"] is not None:
        out["finetune_gain"] = round(out["finetune_pretrained"] - out["finetune_scratch"], 2)
    if out["masked_token_accuracy"] and out["masked_token_chance"]:
        out["masked_token_over_chance"] = round(out["masked_token_accuracy"] / out["masked_token_chance"], 2)
    return out


def plot(out: Path, stems: list[str], results: dict[str, dict]) -> Path | None:
    """evidence.png: pretraining curves, fine-tuning pretrained vs scratch, probe top-1 per layer (CIFAR, digits)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def rows(run_dir: Path) -> list[dict]:
        path = run_dir / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []

    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    for stem in stems:
        pre = rows(out / f"pretrain_{stem}")
        if pre:
            ax[0].plot([r["step"] for r in pre], [100 * r["accuracy"] for r in pre], label=f"{stem}: train")
        res = results[stem].get("pretrain")
        if res and res.get("test_accuracy") is not None:
            ax[0].axhline(100 * res["test_accuracy"], ls="--", lw=1, label=f"{stem}: held-out")
            ax[0].axhline(100 * res["chance_accuracy"], ls=":", color="grey", lw=1, label="chance")
        for name, what in ((f"finetune_{stem}", "pretrained"), (f"scratch_{stem}", "scratch")):
            ft = rows(out / name)
            if ft:
                ax[1].plot([r["step"] for r in ft], [100 * r["accuracy"] for r in ft], label=f"{stem} {what}")
            res = results[stem].get("finetune" if what == "pretrained" else "scratch")
            if res and res.get("test_top1") is not None:
                ax[1].axhline(100 * res["test_top1"], ls="--", lw=1, color=ax[1].lines[-1].get_color() if ft else None)
        for i, (a, b, title) in enumerate(
            (
                ("probe", "probe_random", "CIFAR-10 linear probe"),
                ("transfer", "transfer_random", "digits linear probe (transfer)"),
            )
        ):
            for key, what, style in ((a, "pretrained", "-o"), (b, "random init", "--s")):
                res = results[stem].get(key)
                if res:
                    layers = res["layers"]
                    ax[2 + i].plot(layers, [100 * res["top1"][str(x)] for x in layers], style, label=f"{stem} {what}")
            ax[2 + i].set_title(title)
    ax[0].set_title("masked-token accuracy (pretraining)")
    ax[1].set_title("fine-tuning: train accuracy (dashed: test top-1)")
    for a, xl in zip(ax, ("step", "step", "layer", "layer")):
        a.set_xlabel(xl)
        a.set_ylabel("%")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "evidence.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def merge(entries: list[dict], path: Path) -> None:
    """Add entries to the results file, replacing those of the same (budget, stem)."""
    doc = json.loads(path.read_text()) if path.is_file() else {}
    keep = [
        e for e in doc.get("entries", []) if (e["budget"], e["stem"]) not in {(x["budget"], x["stem"]) for x in entries}
    ]
    doc["entries"] = sorted(keep + entries, key=lambda e: (e["budget"] != "gpu", e["stem"] != "hmlp", e["stem"]))
    measured = {e["budget"] for e in doc["entries"]}
    doc["pending"] = (
        []
        if "gpu" in measured
        else [
            "budget gpu (the recipes as they are: tiny 6x2, 80 pretraining + 30 fine-tuning epochs, <= 9 min on one "
            "H200): not run yet; the command is in experiments/cifar10_evidence.py"
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"merged {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} into {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--stems", default="hmlp", help="comma-separated: hmlp, linear, conv")
    ap.add_argument("--data", default=None, help="a folder holding CIFAR-10's train.npz and test.npz")
    ap.add_argument(
        "--digits",
        default=None,
        help="a folder holding the digits' train.npz and test.npz "
        "(default: written by experiments/make_digits.py if it can)",
    )
    ap.add_argument("--out", default=None, help="default outputs/evidence_<budget>")
    ap.add_argument("--deadline", type=float, default=None, help="seconds (default: the budget's)")
    ap.add_argument("--no-scratch", action="store_true", help="skip the from-scratch fine-tune")
    ap.add_argument("--summary", default=None, help="also copy evidence.json, evidence.png, report.md and the log here")
    ap.add_argument("--results", default=str(RESULTS), help="merge the entries into this file ('' to skip)")
    ap.add_argument(
        "--merge",
        default=None,
        metavar="EVIDENCE_JSON",
        help="only merge this evidence.json's entries into --results, run nothing",
    )
    args = ap.parse_args()
    if args.merge:
        merge(json.loads(Path(args.merge).read_text())["entries"], Path(args.results))
        return 0

    budget = BUDGETS[args.budget]
    stems = [s.strip() for s in args.stems.split(",") if s.strip()]
    out = Path(args.out or ROOT / "outputs" / f"evidence_{args.budget}").absolute()
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(out, args.deadline or budget["deadline_s"], out / "evidence.log")
    load0 = os.getloadavg()
    run.say(f"evidence, budget {args.budget}, stems {stems}, out {out}; load {load0[0]:.1f}")
    info = machine()
    run.say(f"{info['device']}; {info['versions']}")

    data = Path(args.data) if args.data else out / "cifar10_arrays"
    if not (data / "train.npz").is_file():
        run.say(f"writing CIFAR-10 arrays to {data} (python -m sslvit.data.materialize cifar10)")
        subprocess.run(
            [sys.executable, "-m", "sslvit.data.materialize", "cifar10", str(data)], cwd=ROOT, env=run.env, check=True
        )
    digits = Path(args.digits) if args.digits else out / "digits"
    if not (digits / "train.npz").is_file():
        made = subprocess.run(
            [sys.executable, str(ROOT / "experiments" / "make_digits.py"), str(digits)],
            cwd=ROOT,
            env=run.env,
            capture_output=True,
            text=True,
        )
        run.say(
            made.stdout.strip()
            if made.returncode == 0
            else "no transfer dataset: experiments/make_digits.py needs scikit-learn (pip install scikit-learn)"
        )
    has_digits = (digits / "train.npz").is_file()

    est = budget["estimates"]
    cifar = ["data=cifar10_arrays", f"data.path={data}"]
    transfer = [
        "data=cifar10_arrays",
        f"data.path={digits}",
        "data.name=digits",
        "data.num_classes=null",
        "data.train_split=train",
        "data.test_split=test",
        "batch_size=256",
        "knn.k=10",
        "progress=false",
    ]
    results: dict[str, dict] = {}
    entries = []
    for stem in stems:
        t_stem = time.time()
        r = results[stem] = {}
        pre_dir = out / f"pretrain_{stem}"
        r["pretrain"] = run(
            f"pretrain_{stem}",
            est["pretrain"],
            "pretrain.py",
            ["experiment=cifar10_pretrain", *cifar, f"stem={stem}", *budget["model"], *budget["pretrain"]],
        )
        probe = ["linear_probe.py", [f"run={pre_dir}", *cifar, f"layers={LAYERS}", *budget["probe"]]]
        if r["pretrain"] is not None:
            r["probe"] = run(f"probe_{stem}", est["probe"], probe[0], probe[1])
            r["probe_random"] = run(f"probe_random_{stem}", est["probe"], probe[0], [*probe[1], "random_init=true"])
            r["finetune"] = run(
                f"finetune_{stem}",
                est["finetune"],
                "finetune.py",
                [
                    "experiment=cifar10_finetune",
                    *cifar,
                    f"run={pre_dir}",
                    "model.drop_path_schedule=linear",
                    *budget["finetune"],
                ],
            )
        if not args.no_scratch:
            r["scratch"] = run(
                f"scratch_{stem}",
                est["finetune"],
                "finetune.py",
                [
                    "experiment=cifar10_finetune",
                    *cifar,
                    "run=null",
                    f"stem={stem}",
                    "model.drop_path_schedule=linear",
                    *budget["model"],
                    *budget["finetune"],
                ],
            )
        if has_digits and r["pretrain"] is not None:
            t = ["linear_probe.py", [f"run={pre_dir}", *transfer, f"layers={LAYERS}"]]
            r["transfer"] = run(f"transfer_{stem}", est["transfer"], t[0], t[1])
            r["transfer_random"] = run(f"transfer_random_{stem}", est["transfer"], t[0], [*t[1], "random_init=true"])
        entries.append(entry(stem, args.budget, r, time.time() - t_stem, info, run, args))

    load1 = os.getloadavg()
    for e in entries:
        e["load_average"] = f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end (1-minute, {os.cpu_count()} cores)"
        e["deadline_s"] = run.deadline
    rep = subprocess.run(
        [sys.executable, "report.py", str(out), "--out", str(out / "report")],
        cwd=ROOT,
        env=run.env,
        capture_output=True,
        text=True,
    )
    run.say("report.py: " + ("ok" if rep.returncode == 0 else f"failed: {rep.stderr.strip()[-300:]}"))
    png = plot(out, stems, results)
    summary = {
        "what": "sslvit on CIFAR-10: pretrained vs random-init (linear probe, best layer) and pretrained vs "
        "from-scratch fine-tuning (same recipe and budget); top-1 in % on the whole test split",
        "total_wall_s": round(run.elapsed(), 1),
        "entries": entries,
    }
    (out / "evidence.json").write_text(json.dumps(summary, indent=2) + "\n")
    for e in entries:
        run.say(
            f"{e['stem']}: probe {e['probe_pretrained']} vs random init {e['probe_random_init']} "
            f"(gain {e.get('probe_gain')}); fine-tune {e['finetune_pretrained']} vs scratch "
            f"{e['finetune_scratch']} (gain {e.get('finetune_gain')}); masked tokens {e['masked_token_accuracy']}"
            f" vs chance {e['masked_token_chance']}; digits {e['transfer']['probe_pretrained']} vs "
            f"{e['transfer']['probe_random_init']}"
        )
    run.say(f"total {run.elapsed():.0f} s; results {out / 'evidence.json'}")
    if args.summary:
        dest = Path(args.summary)
        dest.mkdir(parents=True, exist_ok=True)
        for f in (out / "evidence.json", png, out / "report" / "report.md", out / "evidence.log"):
            if f is not None and Path(f).is_file():
                shutil.copy(f, dest / Path(f).name)
    if args.results:
        merge(entries, Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
