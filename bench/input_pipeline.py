"""Input pipeline alone vs the pretraining step: is the data ever the bottleneck?

Times exactly what pretraining feeds its step: `Pretraining.host_batches` (the tf.data train iterator of
`sslvit.data` with augmentation, plus the mask sampler) for the pretraining config with the given overrides, in
images/s, after a warm-up (the first batches fill the shuffle buffer / cache). Also with the host->device
transfer (`to_global`). Then the train step of the same model and batch (bench/throughput.py's pretraining step),
measured in the same run, or passed in with --step-images-per-sec; prints the ratio (target >= 5x).

The two share the machine's cores when training, so also printed: the CPU time the pipeline takes per image, and
the share of the machine it would take at the step's rate.

    TFDS_DATA_DIR=... python bench/input_pipeline.py                  # default config: CIFAR-10, tiny 6x2, 128
    python bench/input_pipeline.py --step-images-per-sec 14.1         # skip the step measurement
    python bench/input_pipeline.py --override data=imagenet2012 model=small batch_size=64
"""

from __future__ import annotations

import argparse
import os
import time


import common  # noqa: E402, F401  (the scripts' host-allocator setting, before JAX)


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir  # noqa: PLC0415

    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        return hydra_compose("pretrain", overrides=list(overrides))


def time_batches(it, n: int, warmup: int, transfer=None) -> tuple[float, float, int]:
    """(wall s, process CPU s) for `n` batches after `warmup` ones; `transfer` applied to each batch."""
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--override", nargs="*", default=[], help="pretraining config overrides (Hydra syntax)")
    ap.add_argument("--batches", type=int, default=60, help="timed batches (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--step-images-per-sec", type=float, default=None,
                    help="the train step's images/s; measured here when not given")
    ap.add_argument("--repeats", type=int, default=2, help="pipeline measurements (the best is reported)")
    args = ap.parse_args()

    import jax  # noqa: PLC0415

    from sslvit.pretraining import Pretraining  # noqa: PLC0415
    from sslvit.train import batch_sharding, make_mesh, to_global  # noqa: PLC0415

    cfg = compose(args.override)
    p = Pretraining(cfg, "/tmp/sslvit_input_bench")
    n_cores = os.cpu_count() or 1
    print(f"machine: {n_cores} CPU cores; jax {jax.default_backend()} x {jax.device_count()}")
    print(f"config: data {p.data_cfg.name} ({p.data_cfg.train_split}), {p.image_size}px, batch {p.batch_size}, "
          f"mask {type(p.sampler).__name__} {p.sampler.num_masked}/{p.encoder.num_patches}, "
          f"tf.data cache={p.data_cfg.cache}")

    sharding = batch_sharding(make_mesh())
    rows = {}
    for name, transfer in (("pipeline (images + masks)", None),
                           ("pipeline + host->device", lambda b: to_global(b, sharding))):
        best = None
        for _ in range(args.repeats):
            it = p.host_batches(0)
            wall, cpu, n = time_batches(it, args.batches, args.warmup, transfer)
            if best is None or wall < best[0]:
                best = (wall, cpu, n)
        wall, cpu, n = best
        rows[name] = (n / wall, cpu / n)
        print(f"{name:>28}: {n / wall:9.0f} img/s  ({cpu / n * 1e3:.3f} CPU-ms per image, {n} images)")

    step_ips = args.step_images_per_sec
    if step_ips is None:
        import throughput  # noqa: PLC0415

        from sslvit.config import model_config  # noqa: PLC0415

        model = model_config(cfg)
        r = throughput.pretrain_step_bench(model, p.batch_size, model.pop("dtype"), stem=model.pop("stem"),
                                           vocab=int(cfg.target.get("vocab_size", 512)),
                                           stem_norm=model.pop("stem_norm"))
        step_ips = r["images_per_sec"]
        print(f"{'train step (same run)':>28}: {step_ips:9.1f} img/s  ({r['sec_per_step'] * 1e3:.0f} ms/step, "
              f"compile {r['compile_s']:.1f}s)")
    for name, (ips, cpu_per_img) in rows.items():
        share = cpu_per_img * step_ips / n_cores
        print(f"ratio {name}: {ips / step_ips:.0f}x the step's rate (target >= 5x); at the step's rate it takes "
              f"{100 * share:.1f}% of the machine's CPU")


if __name__ == "__main__":
    main()
