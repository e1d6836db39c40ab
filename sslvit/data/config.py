"""The `data` config group and what the loops need to know about a dataset. No TensorFlow, no JAX."""

from __future__ import annotations

import dataclasses
from typing import Any

from sslvit.config.checks import (Boolean, Choice, Group, Integer, Number, Numbers, Optional, Path, String,
                                  is_int, key)
from sslvit.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ON_CORRUPT = ("error", "skip")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)  # random-resized-crop aspect ratios, as in torchvision/BEiT

_UNIT = "per-channel values in [0, 1] pixel units (divide 0-255 statistics by 255)"


@dataclasses.dataclass(frozen=True)
class DataConfig(Group):
    """The `data` config group, validated (`DataConfig.parse(cfg)`; `from_cfg` is the same)."""

    PREFIX = "data"

    name: str = key(String(), hint="a tfds name (e.g. cifar10, imagenet2012), or a name for your own data")
    source: str | None = key(Optional(String(), "null (folder when data.name is folder, else tfds)"), None)
    data_dir: str | None = key(Optional(Path()), None)  # tfds data dir; None -> $TFDS_DATA_DIR -> ~/tensorflow_datasets
    path: str | None = key(Optional(Path()), None, hint="the folder holding train/<class>/ and test/<class>/")
    train_split: str = key(String(), "train")  # tfds split spec (slices such as 'train[:256]'), or folder sub-dir
    test_split: str = key(String(), "test")
    num_classes: int | None = key(Optional(Integer(min=1), "null (from the dataset)"), None)
    mean: tuple[float, float, float] = key(Numbers(3, Number(ge=0, le=1)), IMAGENET_MEAN,
                                           hint=f"{_UNIT}, e.g. {list(IMAGENET_MEAN)}")
    std: tuple[float, float, float] = key(Numbers(3, Number(gt=0, le=1)), IMAGENET_STD,
                                          hint=f"{_UNIT}, e.g. {list(IMAGENET_STD)}")
    shuffle_buffer: int = key(Integer(min=1), 10_000)
    crop_scale: tuple[float, float] = key(Numbers(2, Number(gt=0, le=1)), (0.2, 1.0),
                                          hint="[min, max] area fractions, e.g. [0.2, 1.0] or [0.08, 1.0]")
    eval_crop_pct: float = key(Number(gt=0, le=1), 1.0, hint="e.g. 1.0 (CIFAR) or 0.875 (ImageNet)")
    flip: bool = key(Boolean(), True)  # random horizontal flip when augmenting
    cache: bool = key(Boolean(), False)  # keep the decoded split in memory (small datasets)
    download: bool = key(Boolean(), True)  # try tfds download_and_prepare when the dataset is not prepared
    on_corrupt: str = key(Choice(ON_CORRUPT), "error",
                          hint="(error stops and names the file; skip leaves corrupt images out and counts them)")
    verify_images: bool = key(Boolean(), True)  # folder datasets: check images up front (needed for on_corrupt)
    image_key: str = key(String(), "image")  # tfds feature names
    label_key: str = key(String(), "label")

    @classmethod
    def from_cfg(cls, cfg: Any) -> DataConfig:
        return cls.parse(cfg)

    def validate(self) -> None:
        check_crop_scale(self.crop_scale, "data.crop_scale")
        from sslvit.data.sources import SOURCES  # noqa: PLC0415  (the sources import this module)

        SOURCES.get(self.source_name)

    @property
    def source_name(self) -> str:
        """The data source: `data.source`, or for configs that leave it out, folder for data.name=folder, else tfds."""
        if self.source is not None:
            return self.source
        return "folder" if self.name == "folder" else "tfds"


def check_crop_scale(value: Any, key_name: str = "crop_scale") -> tuple[float, float]:
    """A random-resized-crop area range [min, max] with 0 < min <= max <= 1."""
    lo, hi = Numbers(2, Number(gt=0, le=1))(value, key_name, "e.g. [0.2, 1.0]")
    if lo > hi:
        raise ConfigError(f"{key_name}={[lo, hi]} must satisfy 0 < min <= max <= 1, e.g. [0.2, 1.0] or [0.08, 1.0]")
    return lo, hi


def one_line(exc: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(index, count) of this process; defaults to JAX's (imported lazily: only multi-host callers need it)."""
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_count = Integer(min=1)(process_count, "process_count")
    process_index = Integer(min=0)(process_index, "process_index")
    if process_index >= process_count:
        raise ConfigError(f"process_index={process_index} must be < process_count={process_count}")
    return process_index, process_count


def check_num_classes(dc: DataConfig, actual: int) -> None:
    if dc.num_classes is not None and dc.num_classes != actual:
        raise ConfigError(
            f"data.num_classes={dc.num_classes} but {dc.name} has {actual} classes; "
            f"set data.num_classes={actual} or null"
        )


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the loops need to know about a dataset, read from metadata (no pass over the data)."""

    name: str
    num_classes: int
    num_train: int  # examples in data.train_split (all processes together; slices applied)
    num_test: int  # examples in data.test_split (0 for a folder dataset without that sub-directory)
    class_names: tuple[str, ...]
    image_shape: tuple[int | None, int | None, int]  # (H, W, 3); None where sizes vary
    train_split: str
    test_split: str
    skipped_files: tuple[str, ...] = ()  # folder datasets with on_corrupt=skip: corrupt images left out

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)

    def steps_per_epoch(self, batch_size: int, process_count: int = 1) -> int:
        """Training steps per epoch at a per-process `batch_size` (each process reads num_train // count)."""
        return (self.num_train // process_count) // batch_size


__all__ = ["ASPECT_RATIO_RANGE", "DataConfig", "DatasetInfo", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS",
           "ON_CORRUPT", "check_crop_scale", "check_num_classes", "is_int", "one_line", "processes"]
