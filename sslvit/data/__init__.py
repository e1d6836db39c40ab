"""Input pipelines shared by pretraining, linear probe and fine-tuning.

- `config.py`: the `data` config group (`DataConfig`) and `DatasetInfo`;
- `sources.py`: the source registry (`SOURCES`, selected by `data.source`) and `dataset_info`; sources in
  `tfds.py` (tensorflow-datasets by name) and `folder.py` (image folders);
- `transforms.py`: TensorFlow image transforms (random-resized crop, flip, centre crop, normalisation);
- `iterators.py`: deterministic, resumable, per-process training batches and padded evaluation passes.

Importing the package (or its config and sources) does not import TensorFlow: the tf.data modules load when
an iterator or a transform is first used (`make_train_iterator`, `make_eval_iterator`, ...), and then keep
TensorFlow quiet and off every GPU (sslvit/data/_tf.py).
"""

from __future__ import annotations

import importlib
from typing import Any

from sslvit.data import folder as _folder  # noqa: F401  (registers the folder source)
from sslvit.data import tfds as _tfds  # noqa: F401  (registers the tfds source)
from sslvit.data.config import (ASPECT_RATIO_RANGE, IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, ON_CORRUPT,
                                DataConfig, DatasetInfo, check_crop_scale)
from sslvit.data.folder import FolderSource
from sslvit.data.sources import SOURCES, Source, create_source, dataset_info
from sslvit.data.tfds import TfdsSource, network_problem

# TensorFlow-backed names, loaded on first use (PEP 562): `sslvit.data.make_train_iterator` imports tf.data then.
_LAZY = {
    "make_train_iterator": "iterators", "make_eval_iterator": "iterators", "TrainIterator": "iterators",
    "EvalIterator": "iterators", "augment_batch": "transforms", "augment_example": "transforms",
    "center_crop_resize": "transforms", "rrc_windows": "transforms",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"sslvit.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sslvit.data' has no attribute {name!r}")


__all__ = [
    "ASPECT_RATIO_RANGE", "DataConfig", "DatasetInfo", "EvalIterator", "FolderSource", "IMAGENET_MEAN", "IMAGENET_STD",
    "IMAGE_EXTENSIONS", "ON_CORRUPT", "SOURCES", "Source", "TfdsSource", "TrainIterator", "augment_batch",
    "augment_example", "center_crop_resize", "check_crop_scale", "create_source", "dataset_info",
    "make_eval_iterator", "make_train_iterator", "network_problem", "rrc_windows",
]
