"""Evaluators: small objects whose `run(state)` yields `(name, value)` pairs, one shape for every measurement a stage
reports (masked-token accuracy, top-1, the online k-NN monitor). Each compiles one jitted function over a batch and
sums over the test split (or its first `max_batches` batches); the data comes from an iterator factory, so an
evaluator can run again: at the end of a run (`TrainingStage.evaluators`), or every so many steps while it trains
(`TrainingStage.periodic_evaluators`, run by `train.fit`).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from sslvit.train import batch_sharding, replicated, to_global


def _variables(state) -> dict:
    params = state.all_params()
    return {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}


class MaskedPatchEvaluator:
    """The pretraining objective on held-out images: masked-token accuracy (k-means tokens) or pixel MSE, averaged
    over full batches, with masks fixed by `seed` (the same masks for every evaluation of a run).

    `model` is the masked image model, `target` the pretraining target, `consts` its state (the codebook)."""

    def __init__(
        self,
        model,
        target,
        consts,
        sampler,
        batches: Callable[[], Iterable[dict]],
        *,
        mesh,
        seed: int,
        local_batch_size: int,
        max_batches: int | None,
        prefix: str = "test_",
    ):
        self.model, self.target, self.consts, self.sampler = model, target, consts, sampler
        self.batches, self.mesh, self.seed = batches, mesh, seed
        self.local_batch_size, self.max_batches, self.prefix = local_batch_size, max_batches, prefix

        def metrics(variables, batch, consts):
            tokens = self.target.compute(consts, batch["image"])
            preds = self.model.apply(variables, batch["image"], batch["mask"], train=False)
            return self.target.loss(preds, tokens, batch["mask"])[1]

        self._step = jax.jit(metrics, out_shardings=replicated(mesh))

    def run(self, state) -> Iterator[tuple[str, float]]:
        if self.max_batches == 0:
            return
        variables, sharding = _variables(state), batch_sharding(self.mesh)
        sums: dict[str, float] = {}
        count = 0
        for i, batch in enumerate(self.batches()):
            if self.max_batches is not None and i >= self.max_batches:
                break
            if not np.asarray(batch["valid"]).all():  # static shapes: evaluate full batches only
                break
            rng = np.random.default_rng([self.seed, 10**9 + i, jax.process_index()])
            b = to_global({"image": batch["image"], "mask": self.sampler(rng, self.local_batch_size)}, sharding)
            for k, v in jax.device_get(self._step(variables, b, self.consts)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
        for k, v in sums.items():
            yield f"{self.prefix}{k}", v / max(count, 1)
        yield f"{self.prefix}batches", count


class Top1Evaluator:
    """Top-1 of a classifier on a labelled split: every example counted once (padding rows masked out)."""

    def __init__(
        self, model, batches: Callable[[], Iterable[dict]], *, mesh, max_batches: int | None, prefix: str = "test_"
    ):
        self.batches, self.mesh, self.max_batches, self.prefix = batches, mesh, max_batches, prefix

        def count(variables, batch):
            logits = model.apply(variables, batch["image"], train=False)
            hit = (jnp.argmax(logits, -1) == batch["label"]) & batch["valid"]
            return hit.sum(), batch["valid"].sum()

        self._step = jax.jit(count, out_shardings=(replicated(mesh),) * 2)

    def run(self, state) -> Iterator[tuple[str, float]]:
        if self.max_batches == 0:
            return
        variables, sharding = _variables(state), batch_sharding(self.mesh)
        correct = seen = 0
        for i, batch in enumerate(self.batches()):
            if self.max_batches is not None and i >= self.max_batches:
                break
            c, n = jax.device_get(self._step(variables, to_global(batch, sharding)))
            correct, seen = correct + int(c), seen + int(n)
        yield f"{self.prefix}top1", correct / max(seen, 1)
        yield f"{self.prefix}examples", seen


class KnnMonitor:
    """The online k-NN monitor of pretraining: weighted k-NN top-1 (cosine similarity, votes exp(sim / T), as in
    InstDisc and DINO: sslvit/probe/knn.py) of the encoder's pooled features of one layer, the first `num_test` images
    of the test split queried against the first `num_train` of the train split, both standardised with the bank's
    statistics as the linear probe does. The subsets are fixed, so values are comparable from step to step.

    The encoder runs data-parallel over every device and process (each process reads the first batches of its own
    shard of both splits; the features come back to every process), then each process runs the small k-NN. `variables`
    maps the train state to the encoder's variables. `latest` holds the last values, `seconds` the time spent."""

    def __init__(
        self,
        feature_fn,
        variables: Callable,
        bank: Callable[[], Iterable[dict]],
        queries: Callable[[], Iterable[dict]],
        *,
        mesh,
        global_batch: int,
        num_train: int,
        num_test: int,
        num_classes: int,
        k: int,
        temperature: float,
        prefix: str = "monitor/",
    ):
        from sslvit.probe.features import feature_step  # noqa: PLC0415  (the probe package imports the stages)

        self.feature_fn, self.variables, self.bank, self.queries, self.mesh = feature_fn, variables, bank, queries, mesh
        self.bank_batches = math.ceil(num_train / global_batch)
        self.query_batches = math.ceil(num_test / global_batch)
        self.num_classes, self.k, self.temperature, self.prefix = num_classes, k, temperature, prefix
        self._step = feature_step(feature_fn, mesh)
        self.latest: dict[str, float] = {}
        self.seconds = 0.0

    def run(self, state) -> Iterator[tuple[str, float]]:
        from sslvit.probe.features import extract_features, standardize  # noqa: PLC0415
        from sslvit.probe.knn import knn_accuracy  # noqa: PLC0415

        t0 = time.perf_counter()
        variables = self.variables(state)
        kw = dict(mesh=self.mesh, progress=False, step=self._step)
        xb, yb = extract_features(self.feature_fn, variables, self.bank(), max_batches=self.bank_batches, **kw)
        xq, yq = extract_features(self.feature_fn, variables, self.queries(), max_batches=self.query_batches, **kw)
        xb, xq = standardize(xb, xq)
        top1 = knn_accuracy(xb, yb, xq, yq, self.num_classes, k=self.k, temperature=self.temperature)
        self.latest = {f"{self.prefix}knn_top1": float(top1[0])}
        self.seconds += time.perf_counter() - t0
        yield from self.latest.items()
