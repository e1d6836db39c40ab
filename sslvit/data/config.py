"""What the loops need to know about a dataset, and helpers of the sources. No TensorFlow, no JAX.

The `data` config group itself, `DataConfig`, is declared with the other groups in sslvit/config/groups.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from sslvit.config.checks import Integer
from sslvit.config.groups import IMAGENET_MEAN, IMAGENET_STD, ON_CORRUPT, DataConfig, check_crop_scale
from sslvit.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)  # random-resized-crop aspect ratios, as in torchvision/BEiT


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


class TrainArgs(NamedTuple):
    """The checked arguments of a pipeline's `make_train_iterator` (every pipeline checks them the same way)."""

    dc: DataConfig
    batch_size: int
    image_size: int
    seed: int
    start_step: int
    crop_scale: tuple[float, float]
    process_index: int
    process_count: int


def train_args(
    cfg: Any,
    *,
    batch_size: Any,
    image_size: Any,
    seed: Any,
    start_step: Any,
    crop_scale: Sequence[float] | None,
    process_index: int | None,
    process_count: int | None,
) -> TrainArgs:
    """`make_train_iterator`'s arguments checked (one-line ConfigErrors); crop_scale None -> data.crop_scale."""
    dc = DataConfig.from_cfg(cfg)
    scale = dc.crop_scale if crop_scale is None else check_crop_scale(crop_scale, "crop_scale")
    return TrainArgs(
        dc,
        Integer(min=1)(batch_size, "batch_size"),
        Integer(min=1)(image_size, "image_size"),
        Integer(min=0)(seed, "seed"),
        Integer(min=0)(start_step, "start_step"),
        scale,
        *processes(process_index, process_count),
    )


def check_batch_fits(n: int, a: TrainArgs) -> None:
    """A process's training shard of `n` examples must hold one batch at least."""
    if n // a.batch_size == 0:
        raise ConfigError(
            f"batch_size={a.batch_size} (per process) exceeds the {n} training examples of process "
            f"{a.process_index}'s shard of data.train_split={a.dc.train_split!r}; lower the batch size or use a larger "
            "split"
        )


def eval_args(
    cfg: Any, split: Any, *, batch_size: Any, image_size: Any, process_index: int | None, process_count: int | None
) -> tuple[DataConfig, str, int, int, int, int]:
    """`make_eval_iterator`'s arguments checked: (DataConfig, split (default data.test_split), batch_size,
    image_size, process index, process count)."""
    dc = DataConfig.from_cfg(cfg)
    split = dc.test_split if split is None else split
    if not isinstance(split, str) or not split:
        raise ConfigError(f"split={split!r} must be a split name such as 'test' or 'validation'")
    batch_size = Integer(min=1)(batch_size, "batch_size")
    image_size = Integer(min=1)(image_size, "image_size")
    return (dc, split, batch_size, image_size, *processes(process_index, process_count))


def eval_shard_sizes(source: Any, split: str, process_count: int, dc: DataConfig) -> list[int]:
    """The examples of every process's shard of `split` (an evaluation pass pads all to the largest); one line if
    the split is empty."""
    sizes = [source.split_size(split, i, process_count, False) for i in range(process_count)]
    if max(sizes) == 0:
        raise ConfigError(f"split {split!r} of {dc.name} holds no examples; set data.test_split to another split")
    return sizes


def epoch_seeds(seed: int, epoch: int, process_index: int) -> tuple[int, int, int]:
    """(shuffle buffer, file order, augmentation) seeds of one training epoch on one process: independent streams,
    the same in every pipeline that reads files."""
    a, b, c = np.random.SeedSequence([seed, epoch, process_index]).generate_state(3, dtype=np.uint32)
    return int(a), int(b), int(c)


def undecodable_message(path: str, why: str, dc: DataConfig) -> str:
    """The one line naming an image file that fails to decode while training or evaluating."""
    if dc.verify_images:  # it changed after the check, or the decoder rejects what the check accepted
        return (
            f"image '{path}' cannot be decoded ({why}) though it passed the start-up check; fix "
            "or delete it (a new start checks a changed file again)"
        )
    return (
        f"image '{path}' cannot be decoded ({why}); fix or delete it, or set "
        "data.verify_images=true data.on_corrupt=skip to leave such files out"
    )


def check_num_classes(dc: DataConfig, actual: int) -> None:
    if dc.num_classes is not None and dc.num_classes != actual:
        raise ConfigError(
            f"data.num_classes={dc.num_classes} but {dc.name} has {actual} classes; "
            f"set data.num_classes={actual} or null"
        )


def check_classes(info: "DatasetInfo", what: str) -> None:
    """A classifier is measured on two classes at least: with one, every prediction is right (top-1 = 100%)."""
    if info.num_classes < 2:
        names = f" ({', '.join(info.class_names)})" if info.class_names else ""
        raise ConfigError(
            f"{info.name} has {info.num_classes} class{names}: {what} needs at least 2 (top-1 over one "
            f"class is always 100%); use a dataset with more classes (a folder dataset: one sub-directory "
            f"per class under its train split)"
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


__all__ = [
    "ASPECT_RATIO_RANGE",
    "DataConfig",
    "DatasetInfo",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ON_CORRUPT",
    "check_classes",
    "check_crop_scale",
    "check_batch_fits",
    "check_num_classes",
    "epoch_seeds",
    "eval_args",
    "eval_shard_sizes",
    "one_line",
    "processes",
    "train_args",
    "TrainArgs",
    "undecodable_message",
]
