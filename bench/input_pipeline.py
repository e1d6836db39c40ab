"""Input pipeline alone vs the pretraining step: is the data ever the bottleneck, and how many cores does it take?

Times exactly what pretraining feeds its step: `Pretraining.train_batches` (the train iterator of `sslvit.data` with
augmentation — decode, random-resized crop, flip, normalisation, batching — plus the mask sampler; for image folders
Pillow's pipeline by default, `--override data.pipeline=tf` for tf.data's)
for the pretraining config with the given overrides, in images/s after a warm-up, also with the host->device copy
(`to_global`). The CPU time per image (all threads of the process) gives the images/s one core delivers, which is
robust to other jobs on the machine (wall-clock rates are not); `--threads` also times the pipeline with that many
decoding threads (`data.threads`; tf.data: a private thread pool).

The step it must feed: measured here (`throughput.py`'s pretraining step, same model and batch), given with
`--step-images-per-sec`, or derived with `--gpu-step`: the README's measured ViT-S 18x2 pretraining step on one H200
(224 px, bfloat16, batch 128: 1,269 img/s) scaled by model FLOPs (sslvit/flops.py) to the preset asked for, i.e. at
the same MFU. Prints the cores the pipeline needs to keep up.

    TFDS_DATA_DIR=... python bench/input_pipeline.py              # default config: CIFAR-10, tiny 6x2, batch 64
    python bench/synthetic_folder.py /tmp/sslvit_jpeg224 --classes 10 --train 200 --test 0 --size 375 500 --photo
    python bench/input_pipeline.py --gpu-step vit_b18x2 --threads 1 2 --override data=folder \\
        data.path=/tmp/sslvit_jpeg224 model=base batch_size=128 data.crop_scale=[0.08,1.0]
"""

from __future__ import annotations

import argparse
import os
import time

import common

from sslvit.data import SOURCES, DataConfig

# README, Performance, GPU table: the pretraining step of ViT-S 18x2 (conf/model/small.yaml), 224 px, batch 128,
# bfloat16, hMLP stem, block masks, k-means target of 512 codes, on one H200 (bench/results/h200_2/vits18x2.json).
ANCHOR = {"preset": "vit_s18x2", "images_per_sec": 1269.0, "vocab": 512}


def iterators_module(cfg) -> str:
    dc = DataConfig.from_cfg(cfg)
    return SOURCES.get(dc.source_name).iterators_for(dc)


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        return hydra_compose("pretrain", overrides=list(overrides))


def time_batches(it, n: int, warmup: int, transfer=None) -> tuple[float, float, int]:
    """(wall s, process CPU s, images) for `n` batches after `warmup` ones; `transfer` applied to each batch."""
    for _ in range(warmup):
        b = next(it)
        if transfer:
            transfer(b)
    w0, c0 = time.perf_counter(), time.process_time()
    images = 0
    for _ in range(n):
        b = next(it)
        if transfer:
            b = transfer(b)
            b["image"].block_until_ready()
        images += b["image"].shape[0]
    return time.perf_counter() - w0, time.process_time() - c0, images


def derived_gpu_step(preset: str) -> tuple[float, str]:
    """images/s of `preset`'s pretraining step on one H200 at the MFU measured for ViT-S 18x2 (FLOPs-scaled)."""
    from sslvit.flops import train_flops
    from sslvit.models.build import build_vit, from_flat

    def flops(name):
        enc = build_vit(from_flat(common.model_preset(name)), num_classes=0, use_mask_token=True)
        return train_flops(enc, head_outputs_per_patch=ANCHOR["vocab"])

    ratio = flops(ANCHOR["preset"]) / flops(preset)
    ips = ANCHOR["images_per_sec"] * ratio
    return ips, (
        f"{preset} on one H200, derived: ViT-S 18x2's measured {ANCHOR['images_per_sec']:,.0f} img/s x "
        f"{ratio:.3f} (the FLOPs ratio, {flops(ANCHOR['preset']) / 1e9:.0f} vs {flops(preset) / 1e9:.0f} "
        f"GFLOP per image): {ips:,.0f} img/s at the same MFU"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--override", nargs="*", default=[], help="pretraining config overrides (Hydra syntax)")
    ap.add_argument("--batches", type=int, default=30, help="timed batches (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="*", default=[], help="also time with data.threads=N")
    ap.add_argument("--step-images-per-sec", type=float, default=None, help="the train step's images/s")
    ap.add_argument(
        "--gpu-step",
        default=None,
        choices=sorted(common.PRESETS),
        help="derive the step's images/s on one H200 for this preset (see the module doc)",
    )
    ap.add_argument("--repeats", type=int, default=2, help="pipeline measurements (the best is reported)")
    args = ap.parse_args()

    import jax

    from sslvit.pretraining import Pretraining
    from sslvit.train import batch_sharding, make_mesh, to_global

    n_cores = os.cpu_count() or 1
    print(
        f"machine: {n_cores} CPU cores, load {os.getloadavg()[0]:.2f}; jax {jax.__version__} "
        f"{jax.default_backend()} x {jax.device_count()}"
    )
    sharding = batch_sharding(make_mesh())
    rows = {}
    variants = [(None, False), (None, True)] + [(t, False) for t in args.threads]
    for threads, transfer in variants:
        overrides = list(args.override) + ([f"data.threads={threads}"] if threads else [])
        p = Pretraining(compose(overrides), None)
        if not rows:
            print(
                f"config: data {p.data_cfg.name} ({p.data_cfg.train_split}), {p.image_size}px, batch {p.batch_size},"
                f" mask {type(p.sampler).__name__} {p.sampler.num_masked}/{p.encoder.num_patches}, crop scale "
                f"{list(p.data_cfg.crop_scale)}, cache={p.data_cfg.cache}, batches from {iterators_module(p.data_cfg)}"
            )
        best = None
        for _ in range(args.repeats):
            it = p.train_batches(0)
            fn = (lambda b: to_global(b, sharding)) if transfer else None
            wall, cpu, n = time_batches(it, args.batches, args.warmup, fn)
            if best is None or wall < best[0]:
                best = (wall, cpu, n)
        wall, cpu, n = best
        name = (
            "pipeline (images + masks)"
            + (" + host->device" if transfer else "")
            + (f", data.threads={threads}" if threads else "")
        )
        rows[name] = (n / wall, cpu / n)
        print(
            f"{name:>42}: {n / wall:8.1f} img/s wall, {cpu / n * 1e3:6.2f} CPU-ms per image = "
            f"{n / cpu:6.1f} img/s per core ({n} images, load {os.getloadavg()[0]:.2f})"
        )

    step_ips, what = args.step_images_per_sec, "given"
    if step_ips is None and args.gpu_step:
        step_ips, what = derived_gpu_step(args.gpu_step)
    elif step_ips is None:
        import throughput

        cfg = p.config
        model = {k: v for k, v in cfg.model.to_dict().items()}
        r = throughput.pretrain_step_bench(
            model,
            p.batch_size,
            model.pop("dtype"),
            stem=cfg.stem["name"],
            vocab=int(cfg.target.get("vocab_size", 512)),
            stem_norm=cfg.stem["norm"],
        )
        step_ips, what = r["images_per_sec"], f"measured here ({r['sec_per_step'] * 1e3:.0f} ms/step)"
    print(f"train step: {step_ips:,.1f} img/s ({what})")
    for name, (ips, cpu_per_img) in rows.items():
        cores = step_ips * cpu_per_img
        print(
            f"{name}: {ips / step_ips:.2f}x the step's rate on this machine; feeding the step takes "
            f"{cores:.2f} cores ({n_cores} here: {100 * cores / n_cores:.0f}% of them)"
        )


if __name__ == "__main__":
    main()
