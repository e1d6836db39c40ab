"""Data sources: where a dataset's examples come from. A registry, `SOURCES`, selected by `data.source`:

- `tfds`: tensorflow-datasets by `data.name` (`cifar10`, `imagenet2012`, ...), read from `data.data_dir`, else
  `$TFDS_DATA_DIR`, else `~/tensorflow_datasets` (sslvit/data/tfds.py);
- `folder`: the user's own images, `data.path/train/<class>/**/*.{jpg,jpeg,png}` and `.../test/<class>/...`,
  labels from the sorted class directory names of the train split (sslvit/data/folder.py);
- `arrays`: a small dataset in memory, `data.path/<split>.npz` (uint8 images, integer labels), read without
  TensorFlow; the training stages keep it on the accelerator and augment it there (sslvit/data/arrays.py).

A new source is one `Source` subclass registered with `@SOURCES.register("<name>")` and one `conf/data/*.yaml`.
A source describes a dataset (`info`, read from metadata without a pass over the data) and yields the examples of a
process's shard of a split as a tf.data pipeline of `{'image': encoded bytes or uint8 (H, W, 3), 'label': int32}`;
sslvit/data/iterators.py turns that into training and evaluation batches. A source may bring its own iterators
instead (`iterators`: the module whose `make_train_iterator` / `make_eval_iterator` serve it; the arrays source's
are numpy and JAX; the folder source's are Pillow's unless `data.pipeline=tf`).
"""

from __future__ import annotations

from typing import Any

from sslvit.data.config import DataConfig, DatasetInfo
from sslvit.registry import Registry

SOURCES: Registry = Registry("data source", "data.source")


class Source:
    """A dataset's splits, sharded over processes, in a deterministic order."""

    info: DatasetInfo
    fixed_shape: tuple[int, int, int] | None  # every image has this decoded shape: enables batched augmentation
    iterators: str = "sslvit.data.iterators"  # the module making this source's batches (tf.data by default)

    def __init__(self, dc: DataConfig):
        self.dc = dc

    @classmethod
    def iterators_for(cls, dc: DataConfig) -> str:
        """The module making batches for this source under `dc` (`data.pipeline` may choose among several)."""
        return cls.iterators

    def split_size(self, split: str, index: int, count: int, drop_remainder: bool) -> int:
        raise NotImplementedError

    def examples(self, split: str, index: int, count: int, drop_remainder: bool, order_seed: int | None) -> Any:
        """Process `index`'s shard of `split` as a tf.data.Dataset, and whether it is already fully shuffled (by
        `order_seed`)."""
        raise NotImplementedError

    def files(
        self, split: str, index: int, count: int, drop_remainder: bool, order_seed: int | None
    ) -> list[str] | None:
        """The file behind each example of `examples(...)` with the same arguments, in its order: how an image that
        fails to decode is named. None where examples are not files of their own (tfds records)."""
        return None


def create_source(cfg: Any) -> Source:
    """The source of a `data` config (validated first)."""
    dc = DataConfig.parse(cfg)
    return SOURCES.get(dc.source_name)(dc)


def dataset_info(cfg: Any) -> DatasetInfo:
    """A dataset's metadata (tfds: its prepared dataset_info.json; folder: a directory scan), validated."""
    return create_source(cfg).info
