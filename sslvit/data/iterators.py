"""Training and evaluation batches from a source's tf.data examples: deterministic, resumable, sharded.

Training batches are a pure function of `(seed, step)`: epoch `e` is shuffled with seeds derived from
`(seed, e, process_index)` and augmented with stateless random ops keyed by those seeds and the position in
the epoch, so an iterator created with `start_step=k` yields exactly the batches a fresh iterator yields from
its k-th step on (bit-exact resume). Evaluation is one pass, padded to whole batches with a `valid` mask, and
every process runs the same number of batches (collectives stay in lockstep).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sslvit.data._tf import AUTOTUNE, no_autograph, tf
from sslvit.data.config import (
    DataConfig,
    check_batch_fits,
    epoch_seeds,
    eval_args,
    eval_shard_sizes,
    one_line,
    train_args,
    undecodable_message,
)
from sslvit.data.sources import create_source
from sslvit.data.transforms import augment_batch, augment_example, center_crop_resize, normalize, options
from sslvit.errors import ConfigError

# An image that fails to decode is searched for among the files of the failing batch and of the next few (the
# pipeline decodes ahead of what it yields).
LOOKAHEAD_BATCHES = 8


def undecodable(candidates: Sequence[str] | None, error: Exception, dc: DataConfig) -> Exception:
    """The error to raise when the pipeline failed with `error`: one line naming the first of `candidates` (the files
    the failing batch may hold) that TensorFlow cannot decode, else `error` itself."""
    for path in candidates or ():
        try:
            tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        except (tf.errors.OpError, ValueError) as e:
            return ConfigError(undecodable_message(path, one_line(getattr(e, "message", e), 120), dc))
    return error


class TrainIterator(Iterator[dict]):
    """Endless training batches {'image': float32 (B, S, S, 3), 'label': int32 (B,)}, step after step.

    `step` is the index of the next batch; batch k is the same whether reached by k calls of `next` or by
    `make_train_iterator(..., start_step=k)`."""

    def __init__(
        self,
        epoch_dataset: Callable[[int, int], tf.data.Dataset],
        steps_per_epoch: int,
        start_step: int,
        num_examples: int,
        explain: Callable[[int, int, Exception], Exception] | None = None,
    ):
        self._epoch_dataset = epoch_dataset
        self._explain = explain  # (epoch, step in epoch, pipeline error) -> the error to raise (naming a bad file)
        self.steps_per_epoch = steps_per_epoch
        self.num_examples = num_examples  # this process's shard of the training split
        self.step = start_step
        self._it: Iterator[dict] | None = None

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            # Each epoch is its own pipeline, seeded by the epoch number: that is what makes
            # (epoch, offset) resumable; the refill of the shuffle buffer at the boundary is short.
            self._it = self._epoch_dataset(self.epoch, self.step % self.steps_per_epoch).as_numpy_iterator()
        try:
            batch = next(self._it)
        except StopIteration:
            raise RuntimeError(
                f"the training split ended before step {self.step} of epoch {self.epoch} "
                f"({self.steps_per_epoch} steps expected): its metadata does not match its data"
            ) from None
        except tf.errors.OpError as e:  # an image that cannot be read or decoded: name it
            self._it = None
            raise (self._explain(self.epoch, self.step % self.steps_per_epoch, e) if self._explain else e) from None
        self.step += 1
        if self.step % self.steps_per_epoch == 0:
            self._it = None  # epoch done (the rest, < one batch, is dropped)
        return batch


class EvalIterator(Iterator[dict]):
    """One pass: {'image', 'label', 'valid': bool (B,)}; the last batches are padded (valid False).

    `len()` is the number of batches, the same on every process."""

    def __init__(
        self,
        ds: tf.data.Dataset,
        num_batches: int,
        num_examples: int,
        explain: Callable[[int, Exception], Exception] | None = None,
    ):
        self._it = ds.as_numpy_iterator()
        self.num_batches = num_batches
        self.num_examples = num_examples  # real examples on this process
        self._explain = explain  # (batch index, pipeline error) -> the error to raise (naming a bad file)
        self._done = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> EvalIterator:
        return self

    def __next__(self) -> dict:
        try:
            batch = next(self._it)
        except tf.errors.OpError as e:  # an image that cannot be read or decoded: name it
            raise (self._explain(self._done, e) if self._explain else e) from None
        self._done += 1
        return batch


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
) -> TrainIterator:
    """Endless, deterministic, resumable training batches of this process's shard of `data.train_split`.

    batch_size: per process. Each epoch is a fresh permutation seeded by (seed, epoch, process); the last
    partial batch of an epoch is dropped. augment: random-resized-crop (area `crop_scale`, default
    data.crop_scale) + horizontal flip (data.flip); else the evaluation transform. start_step: resume point.
    """
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
    n = source.split_size(dc.train_split, pi, pc, True)
    check_batch_fits(n, a)
    steps_per_epoch = n // batch_size
    base = source.examples(dc.train_split, pi, pc, True, None)[0].cache() if dc.cache else None
    buffer = min(dc.shuffle_buffer, n)
    fixed = source.fixed_shape

    def epoch_dataset(epoch: int, offset: int) -> tf.data.Dataset:
        shuffle_seed, order_seed, aug_seed = epoch_seeds(seed, epoch, pi)
        if base is not None:
            ds, shuffled = base, False
        else:
            ds, shuffled = source.examples(dc.train_split, pi, pc, True, order_seed)
        if not shuffled:
            ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        skip = offset * batch_size  # resume inside the epoch: skip before the costly decode/augment
        if fixed is not None:
            # Equal-sized images: batch first, then augment the whole batch, keyed by (epoch, step in epoch).
            ds = ds.skip(skip).batch(batch_size, drop_remainder=True).enumerate(start=offset)

            def transform(i, b):
                key = tf.stack([tf.constant(aug_seed, tf.int64), i])
                if augment:
                    image = augment_batch(b["image"], key, image_size, scale, dc.flip)
                else:
                    image = center_crop_resize(b["image"], image_size, dc.eval_crop_pct)
                return {"image": normalize(image, dc.mean, dc.std), "label": b["label"]}

            ds = ds.map(no_autograph(transform), num_parallel_calls=AUTOTUNE)
        else:
            # Images of any size: crop each (JPEG: decode only the window), keyed by (epoch, position).
            ds = ds.enumerate().skip(skip)

            def transform_one(i, ex):
                key = tf.stack([tf.constant(aug_seed, tf.int64), i])
                if augment:
                    image = augment_example(ex["image"], key, image_size, scale, dc.flip)
                else:
                    image = center_crop_resize(ex["image"], image_size, dc.eval_crop_pct)
                return {"image": image, "label": ex["label"]}

            ds = ds.map(no_autograph(transform_one), num_parallel_calls=AUTOTUNE)
            ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE)
            ds = ds.map(no_autograph(lambda b: {"image": normalize(b["image"], dc.mean, dc.std), "label": b["label"]}))
        return ds.prefetch(AUTOTUNE).with_options(options(dc.threads))

    def explain(epoch: int, offset: int, error: Exception) -> Exception:
        if base is not None:  # cached, then shuffled: any file read so far, in the order they were read
            files = source.files(dc.train_split, pi, pc, True, None)
            return undecodable(files and files[: (offset + 1) * batch_size + buffer], error, dc)
        files = source.files(dc.train_split, pi, pc, True, epoch_seeds(seed, epoch, pi)[1])
        return undecodable(files and files[offset * batch_size : (offset + LOOKAHEAD_BATCHES) * batch_size], error, dc)

    return TrainIterator(epoch_dataset, steps_per_epoch, start_step, n, explain)


def make_eval_iterator(
    cfg: Any,
    split: str | None = None,
    *,
    batch_size: int,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalIterator:
    """One pass over this process's shard of `split` (default data.test_split), no augmentation.

    Every example is seen exactly once over all processes. Batches have static shape: the tail is padded
    with zero images, label 0 and valid=False, and every process yields the same number of batches."""
    dc, split, batch_size, image_size, pi, pc = eval_args(
        cfg,
        split,
        batch_size=batch_size,
        image_size=image_size,
        process_index=process_index,
        process_count=process_count,
    )
    source = create_source(dc)
    sizes = eval_shard_sizes(source, split, pc, dc)
    n = sizes[pi]
    num_batches = -(-max(sizes) // batch_size)
    ds, _ = source.examples(split, pi, pc, False, None)
    ds = ds.map(
        no_autograph(
            lambda ex: {
                "image": center_crop_resize(ex["image"], image_size, dc.eval_crop_pct),
                "label": ex["label"],
                "valid": tf.constant(True),
            }
        ),
        num_parallel_calls=AUTOTUNE,
    )
    pad = num_batches * batch_size - n
    if pad:
        filler = {
            "image": tf.zeros([image_size, image_size, 3], tf.float32),
            "label": tf.constant(0, tf.int32),
            "valid": tf.constant(False),
        }
        ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(pad))
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(
        no_autograph(lambda b: {**b, "image": normalize(b["image"], dc.mean, dc.std)}), num_parallel_calls=AUTOTUNE
    )
    ds = ds.prefetch(AUTOTUNE).with_options(options(dc.threads))

    def explain(index: int, error: Exception) -> Exception:
        files = source.files(split, pi, pc, False, None)
        return undecodable(files and files[index * batch_size : (index + LOOKAHEAD_BATCHES) * batch_size], error, dc)

    return EvalIterator(ds, num_batches, n, explain)
