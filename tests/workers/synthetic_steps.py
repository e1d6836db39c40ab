"""Three pretraining steps on synthetic data (global batch `batch`, each process feeding its own rows), through the
pretraining stage's own state and step builders; reports the losses. Optional: then the real stage on CIFAR-10
(both processes into one run dir), with a resumed run that only process 1 is told to stop (SIGTERM)."""

from __future__ import annotations

import os
import signal
import threading
import time

from prelude import report, start

pid, n, (run_dir, batch_size) = start()
batch_size = int(batch_size)

import jax
import jax.numpy as jnp
import numpy as np
from conftest import TINY_PRETRAIN, compose_config

from sslvit.pretraining import Pretraining, pretrain
from sslvit.train import Preempted, batch_sharding, make_mesh, to_global

p = Pretraining(compose_config("pretrain", TINY_PRETRAIN + ["model.drop_path=0.0", f"batch_size={batch_size}"]), None)
mesh = make_mesh()
rng = np.random.default_rng(0)
images = rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32)
consts = {"codebook": jnp.asarray(rng.normal(size=(64, 48)).astype(np.float32)), "counts": jnp.ones(64, jnp.int32)}
state, step = p.build(mesh, 10)
rows = slice(pid * batch_size // n, (pid + 1) * batch_size // n)
losses = []
for i in range(3):
    mask = p.sampler(np.random.default_rng(i), batch_size)
    batch = to_global({"image": images[rows], "mask": mask[rows]}, batch_sharding(mesh))
    state, m = step(state, batch, consts)
    losses.append(float(m["loss"]))
out = {
    "process": jax.process_index(),
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    "losses": losses,
    "local_rows": int(batch["image"].addressable_shards[0].data.shape[0]),
    "sharded": len(batch["image"].sharding.device_set),
}

if run_dir != "-":
    from sslvit.metrics import read_metrics

    common = TINY_PRETRAIN + [
        "log_every=1",
        "ckpt_every=2",
        "batch_size=16",
        "target.num_samples=1000",
        "eval_batches=1",
        "data.train_split='train[:512]'",
        "monitor.num_train=64",
        "monitor.num_test=32",
    ]
    res = pretrain(compose_config("pretrain", common + ["steps=4"]), run_dir)  # the k-NN monitor at step 4
    out["stage"] = {k: res.get(k) for k in ("train_loss", "test_accuracy", "test_batches", "monitor/knn_top1")}
    if pid == 1:

        def watch():
            while not any(r["step"] >= 6 for r in read_metrics(run_dir)):
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, daemon=True).start()
    try:
        pretrain(compose_config("pretrain", common + ["steps=12", "ckpt_every=100", "resume=true"]), run_dir)
        out["stopped_at"] = None
    except Preempted as e:
        out["stopped_at"] = e.step
report(out)
