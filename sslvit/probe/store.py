"""Where the probe's features live: on disk, read back in chunks, so host memory does not grow with the dataset.

Features of a split are (n, L, F) float32: n examples in the split's order, L probed layers, F features. The linear
classifiers, the accuracy and the k-NN read them as sources of rows, `read(start, stop) -> (L, stop - start, F)`:

- `DiskFeatures`: one raw file per process (`part-<p>.f32`: the rows of that process's shard of the split, in order;
  the shards are contiguous ranges of the split, in process order), written while the features are extracted (a
  process writes only its own rows, so a shared run dir holds one copy) and read with `pread`-style offsets (no
  memory map: pages read are the kernel's page cache, not the process's memory);
- `ArrayFeatures`: the same interface over an array in memory, (L, n, F): the in-memory path, small splits, tests;
- `Standardized`: a source standardised on the fly with per-layer, per-feature train statistics (`feature_stats`),
  computed in float64 as the whole-array `standardize` does, chunk by chunk.

ImageNet-1k with ViT-B, 6 layers of cls+mean features: 1.28 M x 6 x 1536 x 4 bytes = 47 GB on disk; the probe holds
`probe.memory_mb` of it at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

STATS_ROWS = 1024  # rows per chunk of the statistics pass: fixed, so the statistics never depend on memory settings
READ_BYTES = 32 << 20  # float64 bytes of one read while standardising or evaluating: bounds the temporaries


class FeatureSource(Protocol):
    num_rows: int
    num_layers: int
    dim: int

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 (L, stop - start, F)."""


class ArrayFeatures:
    """Features held in memory, (L, n, F)."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.num_layers, self.num_rows, self.dim = x.shape

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.x[:, start:stop], np.float32)


class FeatureWriter:
    """Writes this process's rows of a split's features: `write(position, rows (k, L, F))` at its position in the
    process's shard, in any order."""

    def __init__(self, directory: Path, process: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"part-{process}.f32"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.rows = 0

    def write(self, position: int, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, np.float32)
        if not len(rows):
            return
        row_bytes = rows[0].nbytes
        data = memoryview(rows.reshape(-1)).cast("B")
        offset = position * row_bytes
        while data:  # pwrite may write less than asked
            done = os.pwrite(self._fd, data, offset)
            data, offset = data[done:], offset + done
        self.rows = max(self.rows, position + len(rows))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class DiskFeatures:
    """A split's features in `directory/part-<p>.f32`, p = 0 .. len(part_rows) - 1, rows (L, F) each."""

    def __init__(self, directory: Path, part_rows: Sequence[int], num_layers: int, dim: int):
        self.directory = Path(directory)
        self.part_rows = [int(r) for r in part_rows]
        self.num_layers, self.dim = num_layers, dim
        self.num_rows = sum(self.part_rows)
        self.row_floats = num_layers * dim
        self._starts = np.cumsum([0, *self.part_rows])
        for p, rows in enumerate(self.part_rows):
            size = self.part_path(p).stat().st_size if self.part_path(p).exists() else -1
            if size != rows * self.row_floats * 4:
                raise RuntimeError(
                    f"feature file {self.part_path(p)} holds {size} bytes, expected {rows} rows of "
                    f"{num_layers} x {dim} float32: it was written incompletely, or the processes of "
                    "this run do not share the run dir's file system"
                )

    def part_path(self, p: int) -> Path:
        return self.directory / f"part-{p}.f32"

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.row_floats * 4

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.num_layers, self.dim), np.float32)
        p = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = start
        while done < stop:
            local = done - self._starts[p]
            take = min(stop, self._starts[p + 1]) - done
            with open(self.part_path(p), "rb") as f:
                f.seek(int(local) * self.row_floats * 4)
                f.readinto(memoryview(out[done - start : done - start + take].reshape(-1)).cast("B"))
            done += take
            p += 1
        return out.transpose(1, 0, 2)  # (L, k, F): a view; consumers copy it into their own buffers


class Standardized:
    """A source standardised per layer and feature: (x - mean) / std computed in float64, stored float32."""

    def __init__(self, source: FeatureSource, mean: np.ndarray, std: np.ndarray):
        self.source, self.mean, self.std = source, mean, std
        self.num_rows, self.num_layers, self.dim = source.num_rows, source.num_layers, source.dim

    def read(self, start: int, stop: int) -> np.ndarray:
        return ((self.source.read(start, stop) - self.mean) / self.std).astype(np.float32)


def as_source(x) -> FeatureSource:
    """A feature source as it is; an array (L, n, F) as an in-memory source."""
    return x if hasattr(x, "read") else ArrayFeatures(np.asarray(x))


def chunks(n: int, size: int):
    """[start, stop) ranges of `size` rows covering 0..n."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def rows_per_read(source: FeatureSource, max_bytes: int = READ_BYTES) -> int:
    """Rows to read at a time so that a float64 copy of them stays within `max_bytes`."""
    return max(1, max_bytes // (8 * source.num_layers * source.dim))


def fill(buffer: np.ndarray, source: FeatureSource, ranges) -> int:
    """Copy the rows of `ranges` ((start, stop) pairs) from `source` into `buffer` (L, >= rows, F), in order, a few
    MiB at a time; returns the number of rows."""
    step, rows = rows_per_read(source), 0
    for a, b in ranges:
        for c, d in chunks(b - a, step):
            buffer[:, rows : rows + d - c] = source.read(a + c, a + d)
            rows += d - c
    return rows


def feature_stats(source: FeatureSource, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per layer and feature mean and std (float64, (L, 1, F)) over all rows, one pass of fixed-size chunks merged
    with Chan's parallel formulas: the same numbers whether the rows come from memory or from disk."""
    count = 0
    mean = np.zeros((source.num_layers, 1, source.dim), np.float64)
    m2 = np.zeros_like(mean)
    for start, stop in chunks(source.num_rows, STATS_ROWS):
        x = source.read(start, stop).astype(np.float64)
        k = stop - start
        c_mean = x.mean(axis=1, keepdims=True)
        c_m2 = ((x - c_mean) ** 2).sum(axis=1, keepdims=True)
        delta = c_mean - mean
        total = count + k
        mean = mean + delta * (k / total)
        m2 = m2 + c_m2 + delta**2 * (count * k / total)
        count = total
    var = m2 / max(count, 1)
    return mean, np.sqrt(var + eps)


__all__ = [
    "ArrayFeatures",
    "DiskFeatures",
    "FeatureSource",
    "FeatureWriter",
    "READ_BYTES",
    "STATS_ROWS",
    "Standardized",
    "as_source",
    "chunks",
    "feature_stats",
    "fill",
    "rows_per_read",
]
