"""The `arrays` source: a small dataset held in memory, read from `.npz` files, without TensorFlow.

    data.path/<split>.npz    image: uint8 (N, H, W, 3), label: integer (N,)[, class_names: str (C,)]

`data.train_split` / `data.test_split` name the files (`train` -> `train.npz`); slices work as for the other
sources (`train[:5000]`, `test[50%:]`). `python -m sslvit.data.materialize cifar10 <dir>` writes a tfds dataset in
this form; a GPU host without TensorFlow reads it with numpy alone.

Nothing on this path imports TensorFlow or tensorflow-datasets: the iterators below are numpy (evaluation batches,
the tokenizer's plain images) and JAX (augmented training batches, the same transforms the device path runs:
sslvit/data/ondevice.py). The training stages keep the split on the accelerator and augment inside the step
(`DeviceData`); `make_train_iterator` here yields the same batches on the host, step for step.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sslvit.data.config import (
    DataConfig,
    DatasetInfo,
    check_batch_fits,
    check_num_classes,
    eval_args,
    one_line,
    train_args,
)
from sslvit.data.sources import SOURCES, Source, create_source
from sslvit.errors import ConfigError

SUFFIX = ".npz"
_SPLIT_RE = re.compile(r"^([^\[\]/]+?)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")
_LOADED: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}  # (file, size, mtime) -> arrays: read once
_LOCK = threading.Lock()


def parse_split(spec: str, key: str) -> tuple[str, slice]:
    """'train[:5000]' -> ('train', the slice as a function of the file's length is applied by `_bounds`)."""
    m = _SPLIT_RE.match(str(spec).strip())
    if not m:
        raise ConfigError(
            f"{key}={spec!r} must be a file name under data.path without {SUFFIX}, optionally sliced: "
            f"'train', 'train[:5000]', 'test[50%:]'"
        )
    return m.group(1), (m.group(2), m.group(3))


def _bound(b: str | None, n: int) -> int | None:
    if b is None:
        return None
    return int(round(n * int(b[:-1]) / 100)) if b.endswith("%") else int(b)


def load_npz(path: Path, image_key: str = "image", label_key: str = "label") -> dict[str, np.ndarray]:
    """{'image': uint8 (N, H, W, C), 'label': int32 (N,), 'class_names': str (C,) or absent} of one file, checked
    (one-line ConfigErrors) and kept in memory for the process (a second stage reads no file again)."""
    st = path.stat()
    cache_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if cache_key in _LOADED:
            return _LOADED[cache_key]
        try:
            with np.load(path, allow_pickle=False) as f:
                files = set(f.files)
                for k, role in ((image_key, "image"), (label_key, "label")):
                    if k not in files:
                        raise ConfigError(
                            f"{path} has no array {k!r} (data.{role}_key); its arrays: {', '.join(sorted(files))}"
                        )
                images, labels = f[image_key], f[label_key]
                names = f["class_names"] if "class_names" in files else None
        except ConfigError:
            raise
        except Exception as e:  # a truncated or foreign file
            raise ConfigError(f"{path} is not a readable .npz file ({one_line(e, 120)})") from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ConfigError(f"{path}: {image_key!r} must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if images.shape[-1] == 1:  # greyscale: as RGB, as the other sources decode it
            images = np.repeat(images, 3, axis=-1)
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise ConfigError(
                f"{path}: {label_key!r} must be integers (N,) with N = {len(images)} images, got "
                f"{labels.dtype} {labels.shape}"
            )
        if len(labels) and labels.min() < 0:
            raise ConfigError(f"{path}: {label_key!r} holds negative labels; classes are 0..C-1")
        out = {"image": np.ascontiguousarray(images), "label": labels.astype(np.int32)}
        if names is not None:
            out["class_names"] = np.asarray(names).astype(str)
        _LOADED[cache_key] = out
        return out


@SOURCES.register("arrays")
class ArraysSource(Source):
    """Splits as `.npz` arrays under `data.path`; fixed image shape; labels 0..C-1 (C from the train file)."""

    iterators = "sslvit.data.arrays"  # this module's numpy/JAX iterators, not tf.data (sslvit/data/__init__.py)

    def __init__(self, dc: DataConfig):
        super().__init__(dc)
        if dc.path is None:
            raise ConfigError(
                "data.path is not set; set data.path to a folder holding train.npz and test.npz "
                "(python -m sslvit.data.materialize <tfds name> <folder> writes them)"
            )
        self.root = Path(os.path.expanduser(dc.path))
        if not self.root.is_dir():
            raise ConfigError(
                f"data.path={dc.path!r} does not exist or is not a directory; set it to a folder holding "
                f"train{SUFFIX} and test{SUFFIX}"
            )
        train = self._file(dc.train_split, "data.train_split", required=True)
        self._files = {"train": train}
        names = train.get("class_names")
        num_classes = len(names) if names is not None else int(train["label"].max()) + 1
        check_num_classes(dc, num_classes)
        self.class_names = (
            tuple(str(c) for c in names) if names is not None else tuple(str(i) for i in range(num_classes))
        )
        n_train = len(self._slice(dc.train_split, "data.train_split")["label"])
        test = self._file(dc.test_split, "data.test_split", required=False)
        n_test = len(self._slice(dc.test_split, "data.test_split")["label"]) if test is not None else 0
        shape = tuple(train["image"].shape[1:])
        if test is not None and tuple(test["image"].shape[1:]) != shape:
            raise ConfigError(
                f"data.test_split={dc.test_split!r}: images of shape {test['image'].shape[1:]} but the "
                f"train split's are {shape}; write both splits at one size"
            )
        if test is not None and len(test["label"]) and test["label"].max() >= num_classes:
            raise ConfigError(
                f"data.test_split={dc.test_split!r} holds label {test['label'].max()} but the train "
                f"split has {num_classes} classes"
            )
        self.fixed_shape = shape
        self.info = DatasetInfo(
            name=dc.name,
            num_classes=num_classes,
            num_train=n_train,
            num_test=n_test,
            class_names=self.class_names,
            image_shape=shape,
            train_split=dc.train_split,
            test_split=dc.test_split,
        )

    def _file(self, spec: str, key: str, required: bool = True) -> dict[str, np.ndarray] | None:
        name, _ = parse_split(spec, key)
        path = self.root / f"{name}{SUFFIX}"
        if not path.is_file():
            if not required:
                return None
            have = sorted(p.stem for p in self.root.glob(f"*{SUFFIX}"))
            raise ConfigError(
                f"{key}={spec!r}: no file {path}"
                + (f" (splits here: {', '.join(have)})" if have else "")
                + "; python -m sslvit.data.materialize <tfds name> <folder> writes them"
            )
        return load_npz(path, self.dc.image_key, self.dc.label_key)

    def _slice(self, spec: str, key: str = "split") -> dict[str, np.ndarray]:
        """The (sliced) arrays of a split: views, no copy."""
        name, (start, stop) = parse_split(spec, key)
        data = self._file(spec, key)
        n = len(data["label"])
        sl = slice(_bound(start, n), _bound(stop, n))
        out = {"image": data["image"][sl], "label": data["label"][sl]}
        if len(out["label"]) == 0:
            raise ConfigError(f"{key}={spec!r} selects no examples out of {n} in {self.root / (name + SUFFIX)}")
        return out

    def arrays(self, split: str, index: int = 0, count: int = 1, drop_remainder: bool = False) -> dict:
        """Process `index`'s contiguous shard of `split`: {'image': uint8 (n, H, W, 3), 'label': int32 (n,)}."""
        data = self._slice(split)
        sl = _shard_range(len(data["label"]), index, count, drop_remainder)
        return {k: v[sl] for k, v in data.items()}

    def split_size(self, split, index, count, drop_remainder):
        sl = _shard_range(len(self._slice(split)["label"]), index, count, drop_remainder)
        return sl.stop - sl.start

    def examples(self, split, index, count, drop_remainder, order_seed):
        """The tf.data form of the shard (for tools that want it; the stages use this module's iterators)."""
        from sslvit.data._tf import tf  # noqa: PLC0415

        data = self.arrays(split, index, count, drop_remainder)
        if order_seed is not None:
            perm = np.random.default_rng(order_seed).permutation(len(data["label"]))
            data = {k: v[perm] for k, v in data.items()}
        return tf.data.Dataset.from_tensor_slices(data), order_seed is not None


def _shard_range(n: int, index: int, count: int, drop_remainder: bool) -> slice:
    if drop_remainder:  # equal shards: every process runs the same number of training steps
        per = n // count
        return slice(index * per, (index + 1) * per)
    return slice(index * n // count, (index + 1) * n // count)


# ------------------------------------------------------------------------------------------------ host iterators
class ArraysTrainIterator(Iterator[dict]):
    """Endless training batches {'image': float32 (B, S, S, 3) normalised, 'label': int32 (B,)}, step after step;
    batch k is a function of (seed, k) (sslvit/data/ondevice.py): the same whether reached by k calls of `next` or
    made with start_step=k, and the same images the device path makes at step k of a 1-process run."""

    def __init__(
        self,
        data: dict,
        *,
        batch_size: int,
        image_size: int,
        seed: int,
        start_step: int,
        augment: bool,
        crop_scale: Sequence[float],
        dc: DataConfig,
        process_index: int,
    ):
        import jax  # noqa: PLC0415

        from sslvit.data import ondevice  # noqa: PLC0415

        self.data, self.batch_size, self.seed, self.pi = data, batch_size, seed, process_index
        self.num_examples = len(data["label"])
        self.steps_per_epoch = self.num_examples // batch_size
        self.step = start_step
        self._epoch, self._order = None, None
        self._key = ondevice.step_key
        if augment:
            fn = lambda x, key: ondevice.normalize(  # noqa: E731
                ondevice.augment(x, key, image_size, crop_scale, dc.flip), dc.mean, dc.std
            )
        else:
            fn = lambda x, key: ondevice.normalize(  # noqa: E731
                ondevice.center_crop_resize(x, image_size, dc.eval_crop_pct), dc.mean, dc.std
            )
        self._fn = jax.jit(fn)
        self._cpu = jax.local_devices(backend="cpu")[0]  # host batches are made on the host: the accelerator stays free

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def __iter__(self) -> ArraysTrainIterator:
        return self

    def __next__(self) -> dict:
        import jax  # noqa: PLC0415

        from sslvit.data.ondevice import epoch_order  # noqa: PLC0415

        if self.epoch != self._epoch:
            self._epoch = self.epoch
            self._order = epoch_order(self.seed, self._epoch, self.num_examples, self.pi)
        i = (self.step % self.steps_per_epoch) * self.batch_size
        index = self._order[i : i + self.batch_size]
        images = self.data["image"][index]
        key = jax.device_put(self._key(self.seed, self.step), self._cpu)
        batch = {
            "image": np.asarray(self._fn(jax.device_put(images, self._cpu), key)),
            "label": self.data["label"][index],
        }
        self.step += 1
        return batch


class ArraysEvalIterator(Iterator[dict]):
    """One pass: {'image', 'label', 'valid': bool (B,)}; the last batches padded (valid False), the same number of
    batches on every process (as the tf.data path's EvalIterator)."""

    def __init__(self, data: dict, *, batch_size: int, image_size: int, num_batches: int, dc: DataConfig):
        self.data, self.batch_size, self.image_size, self.dc = data, batch_size, image_size, dc
        self.num_batches = num_batches
        self.num_examples = len(data["label"])
        self._i = 0
        self._resize = None
        if tuple(data["image"].shape[1:3]) != (image_size, image_size):
            import jax  # noqa: PLC0415

            from sslvit.data.ondevice import center_crop_resize  # noqa: PLC0415

            cpu = jax.local_devices(backend="cpu")[0]  # on the host: the accelerator stays free
            fn = jax.jit(lambda x: center_crop_resize(x, image_size, dc.eval_crop_pct))
            self._resize = lambda x: np.asarray(fn(jax.device_put(x, cpu)))
        std = np.asarray(dc.std, np.float32)
        self._scale, self._shift = 1.0 / (255.0 * std), -np.asarray(dc.mean, np.float32) / std

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> ArraysEvalIterator:
        return self

    def __next__(self) -> dict:
        if self._i >= self.num_batches:
            raise StopIteration
        lo = self._i * self.batch_size
        self._i += 1
        images = self.data["image"][lo : lo + self.batch_size]
        labels = self.data["label"][lo : lo + self.batch_size]
        n = len(labels)
        images = self._resize(images) if self._resize is not None else images.astype(np.float32)
        images = images * self._scale + self._shift
        pad = self.batch_size - n
        if pad:
            images = np.concatenate([images, np.broadcast_to(self._shift, (pad, *images.shape[1:]))])
            labels = np.concatenate([labels, np.zeros(pad, np.int32)])
        valid = np.arange(self.batch_size) < n
        return {"image": images.astype(np.float32), "label": labels.astype(np.int32), "valid": valid}


def make_train_iterator(
    cfg: Any,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    start_step: int = 0,
    augment: bool = True,
    crop_scale: Sequence[float] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> ArraysTrainIterator:
    """The arrays source's training batches: as `sslvit.data.iterators.make_train_iterator`, without TensorFlow."""
    a = train_args(
        cfg,
        batch_size=batch_size,
        image_size=image_size,
        seed=seed,
        start_step=start_step,
        crop_scale=crop_scale,
        process_index=process_index,
        process_count=process_count,
    )
    dc, batch_size, image_size, seed, start_step, scale, pi, pc = a
    source = create_source(dc)
    data = source.arrays(dc.train_split, pi, pc, True)
    check_batch_fits(len(data["label"]), a)
    return ArraysTrainIterator(
        data,
        batch_size=batch_size,
        image_size=image_size,
        seed=seed,
        start_step=start_step,
        augment=augment,
        crop_scale=scale,
        dc=dc,
        process_index=pi,
    )


def make_eval_iterator(
    cfg: Any,
    split: str | None = None,
    *,
    batch_size: int,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> ArraysEvalIterator:
    """One pass over this process's shard of `split` (default data.test_split): as
    `sslvit.data.iterators.make_eval_iterator`, without TensorFlow."""
    dc, split, batch_size, image_size, pi, pc = eval_args(
        cfg,
        split,
        batch_size=batch_size,
        image_size=image_size,
        process_index=process_index,
        process_count=process_count,
    )
    source = create_source(dc)
    sizes = [source.split_size(split, i, pc, False) for i in range(pc)]
    data = source.arrays(split, pi, pc, False)
    return ArraysEvalIterator(
        data, batch_size=batch_size, image_size=image_size, num_batches=-(-max(sizes) // batch_size), dc=dc
    )


def device_data(
    dc: DataConfig, *, batch_size: int, image_size: int, crop_scale: Sequence[float], seed: int, with_labels: bool
):
    """The training split for the device path (sslvit/data/ondevice.py): every process holds all of it."""
    from sslvit.data.ondevice import DeviceData  # noqa: PLC0415

    data = create_source(dc).arrays(dc.train_split)
    if len(data["label"]) < batch_size:
        raise ConfigError(
            f"batch_size={batch_size} exceeds the {len(data['label'])} examples of "
            f"data.train_split={dc.train_split!r}; lower the batch size or use a larger split"
        )
    return DeviceData(
        data["image"],
        data["label"],
        batch_size=batch_size,
        image_size=image_size,
        crop_scale=crop_scale,
        flip=dc.flip,
        mean=dc.mean,
        std=dc.std,
        seed=seed,
        with_labels=with_labels,
    )


__all__ = [
    "ArraysEvalIterator",
    "ArraysSource",
    "ArraysTrainIterator",
    "device_data",
    "load_npz",
    "make_eval_iterator",
    "make_train_iterator",
    "parse_split",
]
