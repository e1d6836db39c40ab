"""The config groups shared by the stages: each key's type and range, declared once (sslvit/config/checks.py).

Groups that select a registered implementation (`stem`, `mask`, `target`, `finetune.mode`) are checked by their
registry: the name, and the option names against the implementation's parameters; the implementation checks the
values when the stage builds it, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sslvit.config.checks import (
    AnyValue,
    Boolean,
    Choice,
    Group,
    ImageSize,
    Integer,
    Number,
    Numbers,
    Optional,
    Path,
    String,
    key,
)
from sslvit.errors import ConfigError

DTYPES = ("float32", "bfloat16")
POOLS = ("cls", "mean")
POS_EMBEDDINGS = ("learned", "sincos")
ATTENTION = ("auto", "explicit", "xla", "cudnn")  # the attention kernel: sslvit/models/vit.py
# What the backward pass keeps under remat (jax.checkpoint_policies names): nothing, the matmul outputs without batch
# dims (the projections), or all matmul outputs (also the attention logits).
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")
DROP_PATH_SCHEDULES = ("constant", "linear")  # per-layer drop-path rates (sslvit/models/vit.py: drop_path_rates)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ON_CORRUPT = ("error", "skip")
PIPELINES = ("pil", "tf")  # how image files are decoded and augmented (data.pipeline)
_UNIT = "per-channel values in [0, 1] pixel units (divide 0-255 statistics by 255)"


# ------------------------------------------------------------------------------------------------ model
@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(Group):
    """The encoder's architecture and how it runs (`model` group). `sslvit.models.ViT` validates its arguments with
    this schema too, so a model built in Python and one built from a config are checked the same way."""

    PREFIX = "model"

    image_size: Any = key(ImageSize())
    patch_size: int = key(Integer(min=1))
    dim: int = key(Integer(min=1))
    depth: int = key(Integer(min=1))
    heads: int = key(Integer(min=1))
    mlp_dim: int = key(Integer(min=1))
    num_parallel_branches: int = key(Integer(min=1), 1, hint="(1 = sequential ViT, 2 = the paper's parallel ViT)")
    dim_head: int | None = key(Optional(Integer(min=1), "null (dim // heads)"), None)
    pool: str = key(Choice(POOLS), "cls")
    pos_embedding: str = key(Choice(POS_EMBEDDINGS), "learned")
    channels: int = key(Integer(min=1), 3)
    dropout: float = key(Number(ge=0, lt=1), 0.0)
    emb_dropout: float = key(Number(ge=0, lt=1), 0.0)
    drop_path: float = key(Number(ge=0, lt=1), 0.0)
    drop_path_schedule: str = key(
        Choice(DROP_PATH_SCHEDULES), "constant", hint="(linear: layer i of L drops i/(L-1)·drop_path, as BEiT)"
    )
    layer_scale_init: float | None = key(Optional(Number(gt=0), "null (no LayerScale)"), None)
    dtype: str = key(Choice(DTYPES), "float32", hint="(the activations; parameters stay float32)")
    remat: bool = key(Boolean(), False)
    unroll_layers: bool = key(Boolean(), False)
    remat_policy: str = key(Choice(REMAT_POLICIES), "nothing_saveable", hint="(with remat=true)")
    attention: str = key(Choice(ATTENTION), "auto", hint="(auto: cuDNN fused attention on a CUDA GPU in bfloat16)")

    def validate(self) -> None:
        k = self.dotted
        if self.remat_policy != REMAT_POLICIES[0] and not self.remat:
            raise ConfigError(
                f"{k('remat_policy')}={self.remat_policy} has no effect without {k('remat')}=true: set "
                f"both, or leave {k('remat_policy')}={REMAT_POLICIES[0]}"
            )
        if any(s % self.patch_size for s in self.image_hw):
            raise ConfigError(
                f"{k('image_size')}={self.image_size} is not divisible by {k('patch_size')}="
                f"{self.patch_size}: choose an image size that is a multiple of the patch size"
            )
        if self.dim_head is None and self.dim % self.heads:
            raise ConfigError(
                f"{k('dim')}={self.dim} is not divisible by {k('heads')}={self.heads}: choose heads "
                f"dividing dim, or set {k('dim_head')}"
            )
        if self.pos_embedding == "sincos" and self.dim % 4:
            raise ConfigError(f"{k('dim')}={self.dim} must be divisible by 4 for {k('pos_embedding')}=sincos")

    @property
    def image_hw(self) -> tuple[int, int]:
        size = self.image_size
        return (size[0], size[1]) if isinstance(size, (list, tuple)) else (size, size)

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size


# ------------------------------------------------------------------------------------------------ data
@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(Group):
    """The `data` group (sslvit/data). `source` picks the data source; the keys of other sources are ignored."""

    PREFIX = "data"

    name: str = key(String(), hint="a tfds name (e.g. cifar10, imagenet2012), or a name for your own data")
    source: str | None = key(Optional(String(), "null (folder when data.name is folder, else tfds)"), None)
    data_dir: str | None = key(Optional(Path()), None)  # tfds data dir; None -> $TFDS_DATA_DIR -> ~/tensorflow_datasets
    path: str | None = key(Optional(Path()), None, hint="the folder holding train/<class>/ and test/<class>/")
    train_split: str = key(String(), "train")  # tfds split spec (slices such as 'train[:256]'), or folder sub-dir
    test_split: str = key(String(), "test")
    num_classes: int | None = key(Optional(Integer(min=1), "null (from the dataset)"), None)
    mean: tuple[float, float, float] = key(
        Numbers(3, Number(ge=0, le=1)), IMAGENET_MEAN, hint=f"{_UNIT}, e.g. {list(IMAGENET_MEAN)}"
    )
    std: tuple[float, float, float] = key(
        Numbers(3, Number(gt=0, le=1)), IMAGENET_STD, hint=f"{_UNIT}, e.g. {list(IMAGENET_STD)}"
    )
    shuffle_buffer: int = key(Integer(min=1), 10_000)
    crop_scale: tuple[float, float] = key(
        Numbers(2, Number(gt=0, le=1)), (0.2, 1.0), hint="[min, max] area fractions, e.g. [0.2, 1.0] or [0.08, 1.0]"
    )
    # Evaluation resizes the shorter side to image_size / eval_crop_pct before the central crop: the floor keeps that
    # resize within 4x the image size (a tiny value asked TensorFlow for a gigapixel image at the final evaluation).
    eval_crop_pct: float = key(Number(ge=0.25, le=1), 1.0, hint="e.g. 1.0 (CIFAR) or 0.875 (ImageNet)")
    flip: bool = key(Boolean(), True)  # random horizontal flip when augmenting
    cache: bool = key(Boolean(), False)  # keep the decoded split in memory (small datasets)
    # How image files are decoded and augmented: pil (Pillow in a thread pool, no TensorFlow;
    # sslvit/data/pil_iterators.py) or tf (tf.data; sslvit/data/iterators.py); null: the source's own (folder: pil;
    # tfds records: tf)
    pipeline: str | None = key(Optional(Choice(PIPELINES), "null (the source's own)"), None)
    # Decoding threads of this process's pipelines (tf.data: a private pool of that many; e.g. the cores per GPU when
    # several processes share a host); null: all cores
    threads: int | None = key(Optional(Integer(min=1), "null (all cores)"), None)
    download: bool = key(Boolean(), True)  # try tfds download_and_prepare when the dataset is not prepared
    on_corrupt: str = key(
        Choice(ON_CORRUPT),
        "error",
        hint="(error stops and names the file; skip leaves corrupt images out and counts them)",
    )
    verify_images: bool = key(Boolean(), True)  # folder datasets: check images up front (needed for on_corrupt)
    # folder datasets: where the verification manifest lives (sslvit/data/manifest.py); null: <data.path>/.sslvit if
    # writable, else the user's cache directory
    manifest_dir: str | None = key(Optional(Path(), "null (beside the data if writable, else ~/.cache/sslvit)"), None)
    image_key: str = key(String(), "image")  # tfds feature names
    label_key: str = key(String(), "label")

    @classmethod
    def from_cfg(cls, cfg: Any) -> "DataConfig":
        return cls.parse(cfg)

    def validate(self) -> None:
        check_crop_scale(self.crop_scale, self.dotted("crop_scale"))
        from sslvit.data.sources import SOURCES  # noqa: PLC0415  (the sources import this module)

        SOURCES.get(self.source_name)
        if self.pipeline == "pil" and self.source_name == "tfds":
            raise ConfigError(
                f"{self.dotted('pipeline')}=pil decodes image files, but data.source=tfds reads TFRecords; set "
                f"{self.dotted('pipeline')}=tf or null, or use data=folder for image files"
            )

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


# ------------------------------------------------------------------------------------------------ optimiser
@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig(Group):
    """AdamW with warmup + cosine decay, clipping, layer-wise lr decay, gradient accumulation (`optim` group)."""

    PREFIX = "optim"

    name: str = key(Choice(("adamw",)), "adamw", hint="(conf/optim/adamw.yaml)")
    lr: float = key(Number(gt=0, lt=10), 1.5e-3, hint="e.g. 1.5e-3")
    min_lr: float = key(Number(ge=0), 0.0, hint="(the end of the cosine decay)")
    warmup_steps: int = key(Integer(min=0), 0)
    b1: float = key(Number(ge=0, lt=1), 0.9)
    b2: float = key(Number(ge=0, lt=1), 0.999)
    eps: float = key(Number(gt=0, lt=1), 1e-8, hint="e.g. 1e-8")
    weight_decay: float = key(Number(ge=0, lt=10), 0.05)
    clip_grad_norm: float | None = key(Optional(Number(gt=0), "null for no clipping"), None)
    layer_decay: float | None = key(Optional(Number(gt=0, le=1), "null for none"), None, hint="(BEiT: 0.65)")
    accum_steps: int = key(Integer(min=1), 1)

    def validate(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(
                f"{self.dotted('min_lr')}={self.min_lr:g} must be a number in [0, optim.lr={self.lr:g}] (the end "
                f"of the cosine decay)"
            )


# ------------------------------------------------------------------------------------------------ processes
@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig(Group):
    """Multi-process JAX (`distributed` group; sslvit/distributed.py)."""

    PREFIX = "distributed"

    enabled: Any = key(Choice(("auto", True, False)), "auto")
    coordinator_address: str | None = key(Optional(String()), None, hint="host:port of process 0")
    num_processes: int | None = key(Optional(Integer(min=1)), None)
    process_id: int | None = key(Optional(Integer(min=0)), None)
    initialization_timeout: int | None = key(Optional(Integer(min=1)), None, hint="seconds")


# ------------------------------------------------------------------------------------------------ training loop
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig(Group):
    """The top-level keys of every training stage (pretraining, fine-tuning)."""

    PREFIX = ""

    seed: int = key(Integer(min=0), 0)
    batch_size: int = key(Integer(min=1), hint="(global: over all devices and processes)")
    steps: int = key(Integer(min=1))
    log_every: int = key(Integer(min=1), 10)
    ckpt_every: int = key(Integer(min=1), 500)
    keep_checkpoints: int = key(Integer(min=1), 3)
    eval_batches: int | None = key(Optional(Integer(min=0), "null for the whole test split"), None)
    resume: bool = key(Boolean(), False, hint="(resume=true continues the run in hydra.run.dir)")
    resume_changes: bool = key(Boolean(), False, hint="(true: a resumed run may change keys such as seed; recorded)")
    max_nonfinite_streak: int = key(Integer(min=1), 20)
    progress: bool = key(Boolean(), True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneOptions(Group):
    """The `finetune` block of conf/finetune.yaml."""

    PREFIX = "finetune"

    mode: Any = key(AnyValue())  # a registered fine-tune mode: checked by its registry (sslvit/config/stages.py)
    image_size: int | None = key(
        Optional(Integer(min=1), "null for the pretraining resolution"), None, hint="(a multiple of the patch size)"
    )
    drop_path: float = key(Number(ge=0, lt=1), 0.1)  # replaces the model's drop_path
    label_smoothing: float = key(Number(ge=0, lt=1), 0.1)
    mixup_alpha: float = key(Number(ge=0), 0.0, hint="(0 = off; BEiT uses 0.8)")
    cutmix_alpha: float = key(Number(ge=0), 0.0, hint="(0 = off; BEiT uses 1.0)")
    mix_prob: float = key(Number(ge=0, le=1), 1.0)  # probability that a batch is mixed at all
    switch_prob: float = key(Number(ge=0, le=1), 0.5)  # with both on: probability of CutMix rather than Mixup
    crop_scale: tuple[float, float] = key(
        Numbers(2, Number(gt=0, le=1)), (0.08, 1.0), hint="[min, max] area fractions, e.g. [0.08, 1.0]"
    )

    def validate(self) -> None:
        check_crop_scale(self.crop_scale, self.dotted("crop_scale"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeOptions(Group):
    """The `probe` block of conf/linear_probe.yaml: one linear classifier per layer on standardised features."""

    PREFIX = "probe"

    epochs: int = key(Integer(min=1), 50)
    batch_size: int = key(Integer(min=1), 256)
    lr: float = key(Number(gt=0, lt=10), 1e-3, hint="e.g. 1e-3")
    weight_decay: float = key(Number(ge=0, lt=10), 1e-4, hint="e.g. 1e-4")
    warmup_epochs: int = key(Integer(min=0), 2)
    # Host memory for features while the classifiers train and the k-NN runs; the features wait on disk.
    memory_mb: float = key(Number(gt=0), 2048, hint="(MiB of features held at once; the rest stay on disk)")
    augment: bool = key(Boolean(), False)  # features of new random-resized crops every epoch (BEiT's linear eval)
    crop_scale: tuple[float, float] = key(
        Numbers(2, Number(gt=0, le=1)),
        (0.08, 1.0),
        hint="[min, max] area fractions of probe.augment's crops, e.g. [0.08, 1.0]",
    )

    def validate(self) -> None:
        check_crop_scale(self.crop_scale, self.dotted("crop_scale"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class KnnOptions(Group):
    """Weighted k-NN on the same features (cosine similarity, votes exp(sim / T) as in DINO)."""

    PREFIX = "knn"

    k: int = key(Integer(min=1), 20)
    temperature: float = key(Number(gt=0, lt=1000), 0.07, hint="e.g. 0.07")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MonitorOptions(Group):
    """The `monitor` group of conf/pretrain.yaml: while pretraining runs, a weighted k-NN (cosine, votes exp(sim / T))
    of the encoder's features, a fixed labelled subset of the test split against one of the train split
    (sslvit/evaluators.py: KnnMonitor)."""

    PREFIX = "monitor"

    every: int = key(Integer(min=0), 0, hint="(steps between evaluations, and the last step; 0 = off)")
    num_train: int = key(Integer(min=1), 2000, hint="(the memory bank: the first images of data.train_split)")
    num_test: int = key(Integer(min=1), 500, hint="(the queries: the first images of data.test_split)")
    layer: int = key(Integer(), -1, hint="(1-based; -1 = the last)")  # checked against the depth by the stage
    pool: str = key(AnyValue(), "cls+mean")  # a probe pooling: checked by its registry (sslvit/config/stages.py)
    k: int = key(Integer(min=1), 20)
    temperature: float = key(Number(gt=0, lt=1000), 0.07, hint="e.g. 0.07")


__all__ = [
    "DROP_PATH_SCHEDULES",
    "DTYPES",
    "DataConfig",
    "DistributedConfig",
    "FinetuneOptions",
    "KnnOptions",
    "LoopConfig",
    "ModelConfig",
    "MonitorOptions",
    "OptimConfig",
    "POOLS",
    "POS_EMBEDDINGS",
    "ProbeOptions",
    "check_crop_scale",
]
