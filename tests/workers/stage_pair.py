"""The fine-tuning or linear-probe stage on CIFAR-10 from the tiny pretraining run (`run`), into `out_dir`.

A pair of processes shares `out_dir`; the 1-process reference (n=1) trains on the pair's global batches: shard 0's
rows, then shard 1's, read through the same iterator with process_index/process_count given. Reports each step's
loss, this process's rows of the first batch, the probe classifiers and the files this process wrote."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from prelude import report, start

pid, n, (stage, run, out_dir, *overrides) = start()

import jax
import numpy as np
from conftest import compose_config

import sslvit.data as data_lib
import sslvit.train as train_lib

written, write_text, replace = [], Path.write_text, os.replace


def recording_write_text(self, *a, **k):
    if ".tmp" not in Path(self).name:  # written aside and renamed: recorded at the rename
        written.append(Path(self).name)
    return write_text(self, *a, **k)


def recording_replace(src, dst, *a, **k):
    written.append(Path(dst).name)
    return replace(src, dst, *a, **k)


Path.write_text, os.replace = recording_write_text, recording_replace

if n == 1:
    make = data_lib.make_train_iterator

    def both_shards(cfg, *, batch_size, **kw):
        halves = [make(cfg, batch_size=batch_size // 2, process_index=i, process_count=2, **kw) for i in range(2)]
        return ({k: np.concatenate([b[k] for b in pair]) for k in pair[0]} for pair in zip(*halves))

    data_lib.make_train_iterator = both_shards

out = {"process": jax.process_index(), "processes": jax.process_count(), "losses": []}
cfg = compose_config(stage, [f"run={run}", "progress=false", *overrides])
if stage == "finetune":
    from sslvit.finetune import finetune

    fit = train_lib.fit

    def recording_fit(*, step_fn, **kw):
        def step(state, batch, consts):
            if not out["losses"]:
                out["first_labels"] = np.asarray(batch["label"].addressable_shards[0].data).tolist()
            state, metrics = step_fn(state, batch, consts)
            out["losses"].append(float(metrics["loss"]))
            return state, metrics

        return fit(step_fn=step, **kw)

    train_lib.fit = recording_fit
    results = finetune(cfg, out_dir)
    results.pop("encoder")
else:
    import sslvit.probe as probe_lib

    train = probe_lib.train_linear_probes

    def recording_train(*a, **kw):
        params = train(*a, **kw)
        out["classifiers_sha256"] = hashlib.sha256(
            np.asarray(params["w"]).tobytes() + np.asarray(params["b"]).tobytes()
        ).hexdigest()
        out["w"] = np.asarray(params["w"]).tolist()
        return params

    probe_lib.train_linear_probes = recording_train
    results = probe_lib.linear_probe(cfg, out_dir)
out["results"], out["written"] = results, written
report(out)
