"""Linear probe and k-NN of a frozen encoder: the stage behind `linear_probe.py`.

Order of work: validate the config -> load the encoder from the run's checkpoint (its saved config rebuilds it; or
a random init of that config, the baseline) -> extract pooled features of the chosen layers once, for the train and
the test split (one jitted forward per batch, data-parallel) -> standardise them with the train statistics (a
parameter-free BatchNorm, as MAE and MoCo v3 put before the classifier, so one learning rate suits every layer) ->
train one linear classifier per layer, all at once, on the cached features (AdamW, warmup + cosine; one jitted scan
per epoch) -> top-1 per layer, and a cosine k-NN on the same features -> results.json + a table.

Masked-image models probe best at middle layers (REFERENCES §4-5), hence several layers by default.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sslvit import data as data_lib
from sslvit.config import build_vit, check_batch_size, model_config, to_dict
from sslvit.errors import ConfigError
from sslvit.pretrained import load_batch_stats, load_encoder, load_into
from sslvit.train import batch_sharding, make_mesh, replicated, to_global

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"


# ------------------------------------------------------------------------------------------ pooling (registry)
def _cls(tokens):
    return tokens[..., 0, :]


def _mean(tokens):
    return tokens[..., 1:, :].mean(axis=-2)


def _cls_mean(tokens):
    # BEiT's linear eval: [CLS] concatenated with the mean of the patch tokens.
    return jnp.concatenate([_cls(tokens), _mean(tokens)], axis=-1)


POOLINGS: dict[str, Callable[[jax.Array], jax.Array]] = {"cls": _cls, "mean": _mean, "cls+mean": _cls_mean}
FEATURE_MULTIPLIER = {"cls": 1, "mean": 1, "cls+mean": 2}  # feature width / model dim


def get_pooling(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in POOLINGS:
        raise ConfigError(f"pool={name!r} is not a probe pooling: choose one of {list(POOLINGS)}")
    return POOLINGS[name]


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
        raise ConfigError(f"layers={spec!r} must be a list of layer numbers in 1..{depth} (or -1 for the last), "
                          f"or null for the default {default_layers(depth)}")
    out = []
    for i in items:
        j = int(i) + depth + 1 if i < 0 else int(i)
        if not 1 <= j <= depth:
            raise ConfigError(f"layers={list(items)} has {i}, outside 1..{depth} (the encoder has {depth} layers; "
                              f"negative numbers count from the last)")
        out.append(j)
    return sorted(set(out))


# ------------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """The `probe` and `knn` config groups, validated."""

    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    knn_k: int = 20
    knn_temperature: float = 0.07

    @classmethod
    def from_cfg(cls, probe: Mapping, knn: Mapping) -> "ProbeConfig":
        probe, knn = dict(probe or {}), dict(knn or {})
        out = cls(epochs=_int("probe.epochs", probe.get("epochs", cls.epochs), 1),
                  batch_size=_int("probe.batch_size", probe.get("batch_size", cls.batch_size), 1),
                  lr=_num("probe.lr", probe.get("lr", cls.lr), 0, 10, "a number in (0, 10), e.g. 1e-3"),
                  weight_decay=_num("probe.weight_decay", probe.get("weight_decay", cls.weight_decay), 0, 10,
                                    "a number in [0, 10), e.g. 1e-4", closed_low=True),
                  warmup_epochs=_int("probe.warmup_epochs", probe.get("warmup_epochs", cls.warmup_epochs), 0),
                  knn_k=_int("knn.k", knn.get("k", cls.knn_k), 1),
                  knn_temperature=_num("knn.temperature", knn.get("temperature", cls.knn_temperature), 0, 1e3,
                                       "a number > 0, e.g. 0.07"))
        unknown = sorted(set(probe) - {"epochs", "batch_size", "lr", "weight_decay", "warmup_epochs"})
        unknown += sorted(set(knn) - {"k", "temperature"})
        if unknown:
            raise ConfigError(f"unknown probe/knn key {unknown[0]!r}: the keys are probe.epochs, probe.batch_size, "
                              f"probe.lr, probe.weight_decay, probe.warmup_epochs, knn.k, knn.temperature")
        return out


def _int(name: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ConfigError(f"{name}={v!r} must be an integer >= {minimum}")
    return int(v)


def _num(name: str, v: Any, lo: float, hi: float, allowed: str, closed_low: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not (lo <= v if closed_low else lo < v) or not v < hi:
        raise ConfigError(f"{name}={v!r} is out of range: must be {allowed}")
    return float(v)


# ------------------------------------------------------------------------------------------ features
def make_feature_fn(model, layers: Sequence[int], pool: str):
    """`(variables, images) -> (L, B, F)` pooled tokens of `layers` (1-based), float32, deterministic (eval)."""
    pooling = get_pooling(pool)
    index = np.asarray(layers, np.int32) - 1

    def features(variables, images):
        _, feats = model.apply(variables, images, train=False, return_features=True, collect_layers=True)
        tokens = feats["layers"][index]  # (L, B, 1+N, D): the residual stream after each chosen layer
        return pooling(tokens.astype(jnp.float32))

    return features


def extract_features(feature_fn, variables, iterator, *, mesh, desc: str = "features",
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One pass of an eval iterator ({'image', 'label', 'valid'}) -> (features (L, n, F) float32, labels (n,)).

    Images enter sharded over the batch axis; features, labels and the valid mask come back replicated, so every
    process holds all of them (padding rows dropped), in the split's order whatever the number of processes: a
    global batch holds a slice of each process's shard, so each row is tagged with its process and its position
    in that process's shard, and the rows are sorted by the tags (shards are contiguous ranges of the split, in
    process order). The probe's shuffles then draw the same examples as a 1-process run."""
    from tqdm import tqdm  # noqa: PLC0415

    rep, data_sh = replicated(mesh), batch_sharding(mesh)

    def fn(v, batch):
        return feature_fn(v, batch["image"]), batch["label"], batch["valid"], batch["process"], batch["position"]

    step = jax.jit(fn, out_shardings=(rep,) * 5)
    feats, labels, origin = [], [], []
    total = len(iterator) if hasattr(iterator, "__len__") else None
    pi = jax.process_index()
    show = progress and pi == 0
    seen = 0
    for batch in tqdm(iterator, total=total, desc=desc, disable=not show, dynamic_ncols=True):
        n = len(batch["label"])
        tags = {"process": np.full(n, pi, np.int32), "position": np.arange(seen, seen + n, dtype=np.int32)}
        seen += n
        f, y, valid, proc, pos = jax.device_get(step(variables, to_global({**batch, **tags}, data_sh)))
        valid = np.asarray(valid, bool)
        feats.append(np.asarray(f)[:, valid])
        labels.append(np.asarray(y)[valid])
        origin.append(np.stack([np.asarray(proc)[valid], np.asarray(pos)[valid]]))
    if not feats:
        raise ConfigError(f"{desc}: the split yielded no images")
    proc, pos = np.concatenate(origin, axis=1)
    order = np.lexsort((pos, proc))  # by process, then position in its shard
    return np.concatenate(feats, axis=1)[:, order], np.concatenate(labels).astype(np.int32)[order]


def standardize(train: np.ndarray, *others: np.ndarray, eps: float = 1e-6) -> list[np.ndarray]:
    """Parameter-free BatchNorm: per layer and feature, subtract the train mean and divide by the train std."""
    mean = train.mean(axis=1, keepdims=True, dtype=np.float64)
    std = np.sqrt(train.var(axis=1, keepdims=True, dtype=np.float64) + eps)
    return [((x - mean) / std).astype(np.float32) for x in (train, *others)]


# ------------------------------------------------------------------------------------------ linear classifiers
def train_linear_probes(x: np.ndarray, y: np.ndarray, num_classes: int, cfg: ProbeConfig, *, seed: int = 0,
                        progress: bool = True) -> dict:
    """One linear classifier per layer on features x (L, n, F), labels y (n,); all trained together.

    Returns {'w': (L, F, C), 'b': (L, C)}. The summed loss keeps the layers independent (disjoint parameters)."""
    from tqdm import tqdm  # noqa: PLC0415

    n_layers, n, f = x.shape
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    schedule = optax.warmup_cosine_decay_schedule(cfg.lr / max(warmup, 1) if warmup else cfg.lr, cfg.lr, warmup,
                                                  max(total, warmup + 1), 0.0)
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay, mask={"w": True, "b": False})
    params = {"w": jnp.zeros((n_layers, f, num_classes), jnp.float32),
              "b": jnp.zeros((n_layers, num_classes), jnp.float32)}
    opt_state = tx.init(params)
    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y)

    def loss_fn(p, xb, yb):
        logits = jnp.einsum("lbf,lfc->lbc", xb, p["w"]) + p["b"][:, None]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.broadcast_to(yb, logits.shape[:2]))
        return ce.mean(axis=1).sum()

    @jax.jit
    def epoch(p, s, key, xs, ys):
        order = jax.random.permutation(key, xs.shape[1])[: steps_per_epoch * bs].reshape(steps_per_epoch, bs)

        def body(carry, idx):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p, xs[:, idx], ys[idx])
            updates, s = tx.update(g, s, p)
            return (optax.apply_updates(p, updates), s), loss

        (p, s), losses = jax.lax.scan(body, (p, s), order)
        return p, s, losses.mean()

    key = jax.random.key(seed)
    show = progress and jax.process_index() == 0
    bar = tqdm(range(cfg.epochs), desc="linear probe", disable=not show, dynamic_ncols=True)
    for e in bar:
        params, opt_state, loss = epoch(params, opt_state, jax.random.fold_in(key, e), x_dev, y_dev)
        if e == cfg.epochs - 1 or e % 5 == 0:
            bar.set_postfix(loss=f"{float(loss) / n_layers:.4f}")
    return jax.device_get(params)


def probe_accuracy(params: Mapping, x: np.ndarray, y: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Top-1 of each layer's classifier on features x (L, n, F): (L,)."""
    predict = jax.jit(lambda p, xb: jnp.argmax(jnp.einsum("lbf,lfc->lbc", xb, p["w"]) + p["b"][:, None], -1))
    correct = np.zeros(x.shape[0], np.int64)
    for i in range(0, x.shape[1], chunk):
        pred = np.asarray(predict(params, x[:, i:i + chunk]))
        correct += (pred == y[None, i:i + chunk]).sum(axis=1)
    return correct / max(x.shape[1], 1)


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, num_classes: int,
                 *, k: int = 20, temperature: float = 0.07, chunk: int = 256) -> np.ndarray:
    """Weighted k-NN top-1 per layer (cosine similarity; votes exp(sim / T), as in DINO): (L,)."""
    k = min(k, train_x.shape[1])

    @jax.jit
    def predict(bank, bank_y, q):
        q = q / (jnp.linalg.norm(q, axis=-1, keepdims=True) + 1e-12)
        sims = q @ bank.T
        top, idx = jax.lax.top_k(sims, k)
        votes = jax.nn.one_hot(bank_y[idx], num_classes) * jnp.exp(top / temperature)[..., None]
        return jnp.argmax(votes.sum(axis=1), -1)

    out = []
    for layer in range(train_x.shape[0]):
        bank = jnp.asarray(train_x[layer])
        bank = bank / (jnp.linalg.norm(bank, axis=-1, keepdims=True) + 1e-12)
        bank_y = jnp.asarray(train_y)
        correct = 0
        for i in range(0, test_x.shape[1], chunk):
            q = test_x[layer, i:i + chunk]
            pad = chunk - q.shape[0]  # fixed chunk shape: one compile
            pred = np.asarray(predict(bank, bank_y, np.pad(q, ((0, pad), (0, 0)))))[: q.shape[0]]
            correct += int((pred == test_y[i:i + chunk]).sum())
        out.append(correct / max(test_x.shape[1], 1))
    return np.asarray(out)


# ------------------------------------------------------------------------------------------ the stage
class LinearProbe:
    """Everything built from a config and validated up front (one-line ConfigErrors); `run()` probes."""

    def __init__(self, cfg: Mapping, out_dir: str | os.PathLike):
        self.cfg = cfg
        self.out_dir = Path(out_dir).absolute()
        self.seed = _int("seed", cfg.get("seed", 0), 0)
        self.pool = str(cfg.get("pool", "cls+mean"))
        get_pooling(self.pool)
        self.probe_cfg = ProbeConfig.from_cfg(cfg.get("probe") or {}, cfg.get("knn") or {})
        self.batch_size = check_batch_size(cfg.get("batch_size", 256))
        self.random_init = cfg.get("random_init", False)
        if not isinstance(self.random_init, bool):
            raise ConfigError(f"random_init={self.random_init!r} must be true or false")
        self.data_cfg = data_lib.DataConfig.from_cfg(cfg["data"])
        # Loading the checkpoint (its params only) comes last: it is the slow part of validation.
        init = cfg.get("init")  # an external (timm / DeiT) checkpoint, described by the model and stem groups
        if init is not None:
            if cfg.get("run") is not None:
                raise ConfigError(f"run={cfg.get('run')} and init={init} are both set: probe a run or a file "
                                  f"(drop one)")
            from sslvit.interop import load_init  # noqa: PLC0415

            self.trained = load_init(init, model_config(cfg) if "model" in cfg and "stem" in cfg else None)
        else:
            if "model" in cfg or "stem" in cfg:
                raise ConfigError("model/stem options describe an init=<file>; with run= the run's saved config "
                                  "rebuilds the encoder: drop them")
            self.trained = load_encoder(cfg.get("run"), cfg.get("step"))
        self.model_cfg = self.trained.model_cfg
        self.model = build_vit(self.model_cfg, num_classes=0)
        self.layers = resolve_layers(_plain(cfg.get("layers")), self.model.depth)

    @property
    def image_size(self) -> int:
        return self.model.grid_size[0] * self.model.patch_size

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

    def run(self) -> dict:
        info = data_lib.dataset_info(self.data_cfg)  # a missing dataset fails here, before any compile
        self.out_dir.mkdir(parents=True, exist_ok=True)
        mesh = make_mesh()
        variables = jax.device_put(self.variables(), replicated(mesh))
        feature_fn = make_feature_fn(self.model, self.layers, self.pool)
        local = self.batch_size // jax.process_count()
        progress = bool(self.cfg.get("progress", True))
        what = "random-init" if self.random_init else f"step {self.trained.step} of"
        log.info("linear probe of %s %s: layers %s, pool %s, data %s (%d train / %d test)", what,
                 self.trained.run_dir, self.layers, self.pool, info.name, info.num_train, info.num_test)

        t0 = time.perf_counter()
        splits = {}
        for name, split in (("train", self.data_cfg.train_split), ("test", self.data_cfg.test_split)):
            it = data_lib.make_eval_iterator(self.data_cfg, split, batch_size=local, image_size=self.image_size)
            splits[name] = extract_features(feature_fn, variables, it, mesh=mesh, desc=f"features {name}",
                                            progress=progress)
        t_extract = time.perf_counter() - t0
        (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
        xtr, xte = standardize(xtr, xte)

        t0 = time.perf_counter()
        params = train_linear_probes(xtr, ytr, info.num_classes, self.probe_cfg, seed=self.seed, progress=progress)
        train_top1 = probe_accuracy(params, xtr, ytr)
        top1 = probe_accuracy(params, xte, yte)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        knn = knn_accuracy(xtr, ytr, xte, yte, info.num_classes, k=self.probe_cfg.knn_k,
                           temperature=self.probe_cfg.knn_temperature)
        t_knn = time.perf_counter() - t0

        best = int(np.argmax(top1))
        results = {
            "stage": "linear_probe", "run": str(self.trained.run_dir), "checkpoint_step": self.trained.step,
            "random_init": self.random_init, "dataset": info.name, "num_classes": info.num_classes,
            "num_train": int(xtr.shape[1]), "num_test": int(xte.shape[1]), "chance_top1": 1.0 / info.num_classes,
            "pool": self.pool, "layers": self.layers, "feature_dim": int(xtr.shape[2]),
            "top1": {str(l): float(a) for l, a in zip(self.layers, top1)},
            "train_top1": {str(l): float(a) for l, a in zip(self.layers, train_top1)},
            "knn_top1": {str(l): float(a) for l, a in zip(self.layers, knn)},
            "best_layer": self.layers[best], "best_top1": float(top1[best]),
            "best_knn_top1": float(knn.max()), "best_knn_layer": self.layers[int(np.argmax(knn))],
            "knn_k": self.probe_cfg.knn_k, "epochs": self.probe_cfg.epochs,
            "seconds": {"features": round(t_extract, 2), "train": round(t_train, 2), "knn": round(t_knn, 2)},
            "model": self.model_cfg, "config": to_dict(self.cfg),
        }
        if jax.process_index() == 0:
            (self.out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        return results


def _plain(x):
    """OmegaConf ListConfig -> list (ints stay ints)."""
    try:
        from omegaconf import ListConfig, OmegaConf  # noqa: PLC0415

        if isinstance(x, ListConfig):
            return OmegaConf.to_container(x)
    except ImportError:  # pragma: no cover
        pass
    return x


def format_table(results: Mapping) -> str:
    """A small markdown table: top-1 and k-NN per layer, the best marked."""
    rows = ["| layer | linear top-1 | k-NN top-1 |", "|---:|---:|---:|"]
    for layer in results["layers"]:
        mark = " *" if layer == results["best_layer"] else ""
        rows.append(f"| {layer}{mark} | {100 * results['top1'][str(layer)]:.2f} | "
                    f"{100 * results['knn_top1'][str(layer)]:.2f} |")
    what = "random init" if results["random_init"] else f"step {results['checkpoint_step']}"
    rows.append(f"best: layer {results['best_layer']} {100 * results['best_top1']:.2f}% linear, "
                f"{100 * results['best_knn_top1']:.2f}% k-NN (k={results['knn_k']}); chance "
                f"{100 * results['chance_top1']:.1f}% ({what}, pool {results['pool']}, {results['dataset']})")
    return "\n".join(rows)


def linear_probe(cfg: Mapping, out_dir: str | os.PathLike) -> dict:
    return LinearProbe(cfg, out_dir).run()
