"""Input pipelines shared by pretraining, linear probe and fine-tuning.

- `config.py`: the `data` config group (`DataConfig`) and `DatasetInfo`;
- `sources.py`: the source registry (`SOURCES`, selected by `data.source`) and `dataset_info`; sources in
  `tfds.py` (tensorflow-datasets by name), `folder.py` (image folders) and `arrays.py` (`.npz` arrays in memory);
- `transforms.py`: TensorFlow image transforms (random-resized crop, flip, centre crop, normalisation);
- `iterators.py`: deterministic, resumable, per-process training batches and padded evaluation passes (tf.data);
- `pil_iterators.py`: the same for image files, decoded with Pillow in a thread pool (the folder source's default);
- `ondevice.py`: the same transforms in JAX, and `DeviceData`, a training split kept on the accelerator and
  augmented inside the train step (the arrays source's training path);
- `materialize.py`: `python -m sslvit.data.materialize <tfds name> <dir>` writes a dataset as arrays.

Importing the package (or its config and sources) does not import TensorFlow: the tf.data modules load when
an iterator or a transform is first used (`make_train_iterator`, `make_eval_iterator`, ...), and then keep
TensorFlow quiet and off every GPU (sslvit/data/_tf.py). The arrays source never imports it (its iterators are
numpy and JAX), nor does the folder source with its default Pillow pipeline: pretraining, probe and fine-tuning on
arrays or image folders run where only the JAX stack is installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from sslvit.data import arrays as _arrays
from sslvit.data import folder as _folder
from sslvit.data import tfds as _tfds
from sslvit.data.arrays import ArraysSource
from sslvit.data.config import (
    ASPECT_RATIO_RANGE,
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ON_CORRUPT,
    DataConfig,
    DatasetInfo,
    check_crop_scale,
)
from sslvit.data.folder import FolderSource
from sslvit.data.sources import SOURCES, Source, create_source, dataset_info
from sslvit.data.tfds import TfdsSource, network_problem

# TensorFlow-backed names, loaded on first use (PEP 562): `sslvit.data.TrainIterator` imports tf.data then.
_LAZY = {
    "TrainIterator": "iterators",
    "EvalIterator": "iterators",
    "augment_batch": "transforms",
    "augment_example": "transforms",
    "center_crop_resize": "transforms",
    "rrc_windows": "transforms",
}


def _iterators(cfg: Any):
    """The module that makes batches for the config's source (tf.data unless the source brings its own)."""
    dc = DataConfig.from_cfg(cfg)
    return importlib.import_module(SOURCES.get(dc.source_name).iterators_for(dc))


def make_train_iterator(cfg: Any, **kwargs: Any):
    """Endless, deterministic, resumable training batches of this process's shard of `data.train_split`
    (sslvit/data/iterators.py; for the arrays source sslvit/data/arrays.py, without TensorFlow)."""
    return _iterators(cfg).make_train_iterator(cfg, **kwargs)


def make_eval_iterator(cfg: Any, split: str | None = None, **kwargs: Any):
    """One padded pass over this process's shard of `split` (default data.test_split), no augmentation
    (sslvit/data/iterators.py; for the arrays source sslvit/data/arrays.py, without TensorFlow)."""
    return _iterators(cfg).make_eval_iterator(cfg, split, **kwargs)


def close_iterator(batches: Any) -> None:
    """Stop an input iterator's work (the Pillow pipeline's decoding threads, a generator's pipeline); nothing for
    an iterator without `close`."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"sslvit.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sslvit.data' has no attribute {name!r}")


__all__ = [
    "ASPECT_RATIO_RANGE",
    "ArraysSource",
    "DataConfig",
    "DatasetInfo",
    "EvalIterator",
    "FolderSource",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ON_CORRUPT",
    "SOURCES",
    "Source",
    "TfdsSource",
    "TrainIterator",
    "augment_batch",
    "augment_example",
    "center_crop_resize",
    "check_crop_scale",
    "close_iterator",
    "create_source",
    "dataset_info",
    "make_eval_iterator",
    "make_train_iterator",
    "network_problem",
    "rrc_windows",
]
