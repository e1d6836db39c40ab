"""Linear probe and k-NN of a frozen encoder: the stage behind `linear_probe.py`.

Order of work: validate the config -> load the encoder from the run's checkpoint (its saved description rebuilds
it; or a random init of that config, the baseline) -> extract pooled features of the chosen layers once, for the
train and the test split, streamed to files in the run dir (features.py, store.py) -> standardise them with the train
statistics (on the fly) -> train one linear classifier per layer, all at once, on the stored features, holding at most
`probe.memory_mb` of them in memory (classifiers.py) -> top-1 per layer, and a cosine k-NN on the same features
(knn.py) -> results.json + a table; the feature files are removed. Poolings are a registry (pooling.py).

`probe.augment=true` trains the classifiers on features of new random-resized crops (and flips) every epoch, computed
by the frozen encoder as they are needed, as BEiT's linear evaluation does; standardised with the statistics of the
plain train features; evaluation and k-NN use the plain features.

Masked-image models probe best at middle layers (BEiT, MAE), hence several layers by default.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sslvit import data as data_lib
from sslvit.config.stages import LinearProbeConfig
from sslvit.data.config import check_classes
from sslvit.distributed import is_main_process
from sslvit.errors import ConfigError
from sslvit.models import build_vit
from sslvit.pooling import POOLINGS, get_pooling
from sslvit.pretrained import load_batch_stats, load_encoder, load_into
from sslvit.probe.classifiers import (
    init_params,
    make_optimizer,
    make_update,
    plan_windows,
    probe_accuracy,
    train_linear_probes,
)
from sslvit.probe.features import extract_features, extract_to_disk, make_feature_fn, standardize
from sslvit.probe.knn import knn_accuracy
from sslvit.probe.store import Standardized, feature_stats
from sslvit.stage import Stage, check_batch_size, to_dict
from sslvit.train import batch_sharding, make_mesh, prefetch_to_device, replicated

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ layers
def default_layers(depth: int) -> list[int]:
    """Every other layer counting back from the last (the last always in); every layer for depth <= 4."""
    if depth <= 4:
        return list(range(1, depth + 1))
    return sorted(range(depth, 0, -2))


def resolve_layers(spec: Any, depth: int) -> list[int]:
    """1-based layer numbers (layer l = the residual stream after the l-th layer; -1 = the last), sorted, unique."""
    if spec is None:
        return default_layers(depth)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        spec = [spec]
    try:
        items = list(spec)
    except TypeError:
        items = None
    if not items or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in items):
        raise ConfigError(
            f"layers={spec!r} must be a list of layer numbers in 1..{depth} (or -1 for the last), "
            f"or null for the default {default_layers(depth)}"
        )
    out = []
    for i in items:
        j = int(i) + depth + 1 if i < 0 else int(i)
        if not 1 <= j <= depth:
            raise ConfigError(
                f"layers={list(items)} has {i}, outside 1..{depth} (the encoder has {depth} layers; "
                f"negative numbers count from the last)"
            )
        out.append(j)
    return sorted(set(out))


class LinearProbe(Stage):
    """Everything built from a config and validated up front (one-line ConfigErrors); `run()` probes."""

    name = "linear_probe"
    Config = LinearProbeConfig

    def __init__(self, cfg: Mapping, out_dir: str | os.PathLike | None):
        super().__init__(cfg, out_dir)
        c = self.config
        self.seed, self.pool, self.random_init = c.seed, c.pool, c.random_init
        self.data_cfg = c.data
        # Loading the checkpoint (its params only) comes last: it is the slow part of validation.
        if c.init is not None:  # an external (timm / DeiT) checkpoint, described by the model and stem groups
            from sslvit.interop import load_init  # noqa: PLC0415

            self.trained = load_init(c.init, {"model": c.model.to_dict(), "stem": dict(c.stem)})
        else:
            self.trained = load_encoder(c.run, c.step)
        self.encoder_cfg = self.trained.encoder
        self.model = build_vit(self.encoder_cfg, num_classes=0)
        self.layers = resolve_layers(c.layers, self.model.depth)

    @property
    def image_size(self) -> int:
        return self.model.grid_size[0] * self.model.patch_size

    def check_devices(self) -> None:
        super().check_devices()
        if self.config.probe.augment:  # the classifiers' batches are then encoder batches, split over the devices
            check_batch_size(self.config.probe.batch_size, key="probe.batch_size")

    def variables(self) -> dict:
        """The encoder's variables: the checkpoint's, or a fresh init of the same config (random_init)."""
        shape = (1, self.image_size, self.image_size, self.model.channels)
        init = jax.jit(self.model.init)(jax.random.key(self.seed), jnp.zeros(shape))
        if self.random_init:
            return init
        where = str(self.trained.run_dir)
        grid = self.model.grid_size
        out = {"params": load_into(init["params"], self.trained.params, old_grid=grid, new_grid=grid, where=where)}
        if "batch_stats" in init:
            out["batch_stats"] = load_batch_stats(init["batch_stats"], self.trained.batch_stats, where)
        return jax.tree.map(jnp.asarray, out)

    def prepare(self):
        info = data_lib.dataset_info(self.data_cfg)  # a missing dataset fails here, before anything is written
        check_classes(info, "a linear probe")
        c = self.config
        row_bytes = len(self.layers) * POOLINGS.get(self.pool).width * self.model.dim * 4
        if not c.probe.augment:  # the budget must hold a batch of features (a one-line error now, not after hours)
            plan_windows(
                info.num_train,
                row_bytes,
                min(c.probe.batch_size, info.num_train),
                1,
                self.seed,
                c.probe.memory_mb * 2**20,
            )
        return info

    def execute(self) -> dict:
        info, c = self.info, self.config
        mesh = make_mesh()
        variables = jax.device_put(self.variables(), replicated(mesh))
        feature_fn = make_feature_fn(self.model, self.layers, self.pool)
        what = "random-init" if self.random_init else f"step {self.trained.step} of"
        log.info(
            "linear probe of %s %s: layers %s, pool %s, data %s (%d train / %d test)",
            what,
            self.trained.run_dir,
            self.layers,
            self.pool,
            info.name,
            info.num_train,
            info.num_test,
        )

        t0 = time.perf_counter()
        feature_dir = self.run_dir.path / "features"
        stores, labels = {}, {}
        for name, split in (("train", self.data_cfg.train_split), ("test", self.data_cfg.test_split)):
            it = data_lib.make_eval_iterator(
                self.data_cfg, split, batch_size=self.local_batch_size, image_size=self.image_size
            )
            stores[name], labels[name] = extract_to_disk(
                feature_fn, variables, it, feature_dir / name, mesh=mesh, desc=f"features {name}", progress=c.progress
            )
        mean, std = feature_stats(stores["train"])
        xtr, xte = Standardized(stores["train"], mean, std), Standardized(stores["test"], mean, std)
        ytr, yte = labels["train"], labels["test"]
        t_extract = time.perf_counter() - t0

        t0 = time.perf_counter()
        memory = c.probe.memory_mb * 2**20
        if c.probe.augment:
            params = self.train_augmented(variables, feature_fn, mean, std, mesh, xtr.num_layers, xtr.dim)
        else:
            params = train_linear_probes(
                xtr, ytr, info.num_classes, c.probe, seed=self.seed, progress=c.progress, memory_bytes=memory
            )
        train_top1 = probe_accuracy(params, xtr, ytr)
        top1 = probe_accuracy(params, xte, yte)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        knn = knn_accuracy(
            xtr, ytr, xte, yte, info.num_classes, k=c.knn.k, temperature=c.knn.temperature, memory_bytes=memory
        )
        t_knn = time.perf_counter() - t0
        feature_bytes = stores["train"].nbytes + stores["test"].nbytes
        windows = len(
            plan_windows(
                xtr.num_rows, xtr.num_layers * xtr.dim * 4, min(c.probe.batch_size, xtr.num_rows), 1, self.seed, memory
            ).windows[0]
        )
        if jax.process_count() > 1:  # every process is done reading the others' feature files
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices("probe features read")
        if is_main_process():
            shutil.rmtree(feature_dir, ignore_errors=True)

        best = int(np.argmax(top1))
        return {
            "stage": "linear_probe",
            "run": str(self.trained.run_dir),
            "checkpoint_step": self.trained.step,
            "random_init": self.random_init,
            "dataset": info.name,
            "num_classes": info.num_classes,
            "num_train": xtr.num_rows,
            "num_test": xte.num_rows,
            "chance_top1": 1.0 / info.num_classes,
            "pool": self.pool,
            "layers": self.layers,
            "feature_dim": xtr.dim,
            "top1": {str(l): float(a) for l, a in zip(self.layers, top1)},
            "train_top1": {str(l): float(a) for l, a in zip(self.layers, train_top1)},
            "knn_top1": {str(l): float(a) for l, a in zip(self.layers, knn)},
            "best_layer": self.layers[best],
            "best_top1": float(top1[best]),
            "best_knn_top1": float(knn.max()),
            "best_knn_layer": self.layers[int(np.argmax(knn))],
            "knn_k": c.knn.k,
            "epochs": c.probe.epochs,
            "augment": c.probe.augment,
            "feature_bytes": feature_bytes,
            "memory_mb": c.probe.memory_mb,
            "windows_per_epoch": windows,
            **({"skipped_images": info.num_skipped} if info.num_skipped else {}),  # data.on_corrupt=skip
            "seconds": {"features": round(t_extract, 2), "train": round(t_train, 2), "knn": round(t_knn, 2)},
            "encoder": self.encoder_cfg,
            "config": to_dict(self.raw_config),
        }

    def train_augmented(self, variables, feature_fn, mean, std, mesh, num_layers: int, dim: int) -> dict:
        """The classifiers trained on features of random-resized crops (+ flips) of the train split, new every epoch:
        each step runs the frozen encoder on a batch and updates every layer's classifier (one jitted step, the batch
        sharded over the devices)."""
        from tqdm import tqdm  # noqa: PLC0415

        c = self.config
        rep = replicated(mesh)
        it = data_lib.make_train_iterator(
            self.data_cfg,
            batch_size=c.probe.batch_size // jax.process_count(),
            image_size=self.image_size,
            seed=self.seed,
            crop_scale=c.probe.crop_scale,
        )
        total = c.probe.epochs * it.steps_per_epoch
        tx = make_optimizer(c.probe, total, it.steps_per_epoch)
        update = make_update(tx)
        params = jax.device_put(init_params(num_layers, dim, self.info.num_classes), rep)
        opt_state = jax.device_put(tx.init(params), rep)
        shift = jax.device_put(jnp.asarray(mean, jnp.float32), rep)
        scale = jax.device_put(jnp.asarray(1.0 / std, jnp.float32), rep)

        def step(p, s, v, batch):
            x = (feature_fn(v, batch["image"]) - shift) * scale
            return update(p, s, x, batch["label"])

        step = jax.jit(step, donate_argnums=(0, 1), out_shardings=(rep, rep, rep))
        bar = tqdm(
            range(total),
            desc="linear probe (augmented)",
            dynamic_ncols=True,
            disable=not (c.progress and is_main_process()),
        )
        with prefetch_to_device(it, batch_sharding(mesh)) as batches:
            for i in bar:
                params, opt_state, loss = step(params, opt_state, variables, next(batches))
                if (i + 1) % it.steps_per_epoch == 0:
                    bar.set_postfix(loss=f"{float(loss) / num_layers:.4f}")
        return jax.device_get(params)


def format_table(results: Mapping) -> str:
    """A small markdown table: top-1 and k-NN per layer, the best marked."""
    rows = ["| layer | linear top-1 | k-NN top-1 |", "|---:|---:|---:|"]
    for layer in results["layers"]:
        mark = " *" if layer == results["best_layer"] else ""
        rows.append(
            f"| {layer}{mark} | {100 * results['top1'][str(layer)]:.2f} | {100 * results['knn_top1'][str(layer)]:.2f} |"
        )
    what = "random init" if results["random_init"] else f"step {results['checkpoint_step']}"
    rows.append(
        f"best: layer {results['best_layer']} {100 * results['best_top1']:.2f}% linear, "
        f"{100 * results['best_knn_top1']:.2f}% k-NN (k={results['knn_k']}); chance "
        f"{100 * results['chance_top1']:.1f}% ({what}, pool {results['pool']}, {results['dataset']})"
    )
    return "\n".join(rows)


def linear_probe(cfg: Mapping, out_dir: str | os.PathLike) -> dict:
    return LinearProbe(cfg, out_dir).run()


__all__ = [
    "POOLINGS",
    "LinearProbe",
    "default_layers",
    "extract_features",
    "format_table",
    "get_pooling",
    "knn_accuracy",
    "linear_probe",
    "make_feature_fn",
    "probe_accuracy",
    "resolve_layers",
    "standardize",
    "train_linear_probes",
]
