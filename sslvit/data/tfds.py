"""The `tfds` source: a tensorflow-datasets dataset by name, process shards via `tfds.even_splits`.

TensorFlow and tensorflow-datasets are imported when such a source is built, not when this module is imported.
"""

from __future__ import annotations

import difflib
import os
import socket
from typing import Any

from sslvit.data.config import DataConfig, DatasetInfo, check_num_classes, one_line
from sslvit.data.sources import SOURCES, Source
from sslvit.errors import ConfigError


def resolve_data_dir(dc: DataConfig) -> str:
    # Resolved at call time, not tfds import time, so a changed TFDS_DATA_DIR is honoured.
    return dc.data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def network_problem(timeout: float = 3.0) -> str | None:
    """Why downloading is hopeless (no route to the internet), or None if it may work.

    tfds has no fast offline check of its own and can stall in retries; one short TCP connect tells. Behind a
    proxy the direct connect says nothing, so then tfds is left to try."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=timeout).close()
    except OSError as e:
        return f"no network: {one_line(e, 80)}"
    return None


def _tfds():
    from sslvit.data._tf import quiet_native_stderr  # noqa: PLC0415  (quiet TF, off the GPU, before tfds imports it)

    with quiet_native_stderr():
        import tensorflow_datasets as tfds  # noqa: PLC0415

    return tfds


def tfds_builder(dc: DataConfig) -> Any:
    """A tfds builder whose data is prepared in the data dir (downloading it if allowed and possible)."""
    tfds = _tfds()
    data_dir = resolve_data_dir(dc)
    try:
        builder = tfds.builder(dc.name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(dc.name.split("/")[0].split(":")[0], known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"data.name={dc.name!r} is not a tfds dataset{hint}; use a name from tfds.list_builders(), "
            "or data=folder data.path=<dir> for your own images"
        ) from None
    except Exception as e:  # e.g. a dataset whose builder code needs a missing package
        raise ConfigError(f"data.name={dc.name!r}: tfds cannot build this dataset ({one_line(e)})") from None
    if builder.is_prepared():
        return builder
    if not dc.download:
        why = "data.download=false"
    else:
        why = network_problem()
        if why is None:
            try:
                builder.download_and_prepare()
            except Exception as e:  # manual-download datasets (imagenet2012), server errors, missing packages
                why = f"{type(e).__name__}: {one_line(e)}"
            else:
                if builder.is_prepared():
                    return builder
                why = "download_and_prepare left no prepared data"
    raise ConfigError(
        f"dataset {dc.name!r} not found in data_dir {data_dir!r} and could not be downloaded ({why}); "
        "set data.data_dir or TFDS_DATA_DIR to a directory holding prepared tfds data"
    )


@SOURCES.register("tfds")
class TfdsSource(Source):
    """A tensorflow-datasets dataset; process shards via `tfds.even_splits`."""

    def __init__(self, dc: DataConfig):
        super().__init__(dc)
        tfds = _tfds()
        self.builder = tfds_builder(dc)
        info = self.builder.info
        features = info.features
        for key, role in ((dc.image_key, "image"), (dc.label_key, "label")):
            if key not in features:
                raise ConfigError(
                    f"data.{role}_key={key!r} is not a feature of {dc.name}; its features: {', '.join(features)}"
                )
        label = features[dc.label_key]
        if not isinstance(label, tfds.features.ClassLabel):
            raise ConfigError(f"data.label_key={dc.label_key!r} of {dc.name} is not a class label feature")
        sizes = {}
        for key in ("train_split", "test_split"):
            spec = getattr(dc, key)
            try:
                sizes[key] = info.splits[spec].num_examples
            except (KeyError, ValueError, AssertionError) as e:
                raise ConfigError(
                    f"data.{key}={spec!r} is not a valid split of {dc.name} ({one_line(e, 100)}); "
                    f"its splits: {', '.join(info.splits)} (slices such as 'train[:10%]' work)"
                ) from None
        check_num_classes(dc, label.num_classes)
        shape = tuple(features[dc.image_key].shape)
        self.fixed_shape = (shape[0], shape[1], 3) if None not in shape[:2] else None
        self.info = DatasetInfo(
            name=dc.name,
            num_classes=label.num_classes,
            num_train=sizes["train_split"],
            num_test=sizes["test_split"],
            class_names=tuple(label.names),
            image_shape=(shape[0], shape[1], 3),
            train_split=dc.train_split,
            test_split=dc.test_split,
        )

    def _shard(self, split: str, index: int, count: int, drop_remainder: bool) -> Any:
        if count == 1:
            return split
        return _tfds().even_splits(split, n=count, drop_remainder=drop_remainder)[index]

    def split_size(self, split: str, index: int, count: int, drop_remainder: bool) -> int:
        try:
            return self.builder.info.splits[self._shard(split, index, count, drop_remainder)].num_examples
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(
                f"split {split!r} is not valid for {self.dc.name} ({one_line(e, 100)}); "
                f"its splits: {', '.join(self.builder.info.splits)}"
            ) from None

    def examples(self, split, index, count, drop_remainder, order_seed):
        from sslvit.data._tf import AUTOTUNE, no_autograph, tf  # noqa: PLC0415
        from sslvit.data.transforms import decode  # noqa: PLC0415

        tfds = _tfds()
        read_config = tfds.ReadConfig(
            shuffle_seed=order_seed, try_autocache=False, interleave_cycle_length=16, skip_prefetch=True
        )
        ds = self.builder.as_dataset(
            split=self._shard(split, index, count, drop_remainder),
            shuffle_files=order_seed is not None,
            decoders={self.dc.image_key: tfds.decode.SkipDecoding()},  # decoded by us: fused crop for JPEG
            read_config=read_config,
        )
        fixed = self.fixed_shape

        def parse(ex):
            image = ex[self.dc.image_key]
            if fixed is not None:  # small fixed-size images: decode once here (cacheable, batch-augmentable)
                image = tf.ensure_shape(decode(image), fixed)
            return {"image": image, "label": tf.cast(ex[self.dc.label_key], tf.int32)}

        # The file order is shuffled per epoch (order_seed), examples still need the shuffle buffer.
        return ds.map(no_autograph(parse), num_parallel_calls=AUTOTUNE), False
