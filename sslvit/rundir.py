"""A run dir: its layout, in one place, and the writes a stage makes into it.

    <run dir>/
      .hydra/             the resolved config (written by Hydra)
      <stage>.log         the run's log (Hydra's job log)
      checkpoints/<step>/ orbax checkpoints: the train state and its meta (sslvit/checkpoint.py)
      metrics.jsonl       one JSON object per logged step (sslvit/metrics.py)
      tb/                 TensorBoard event files
      tokenizer.npz       the pretraining target's fitted state (k-means codebook)
      results.json        the stage's final results, written once it has finished

Only the main process (`is_main`) writes files of its own; checkpoints are written collectively by orbax.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from sslvit.distributed import is_main_process

RESULTS_FILE = "results.json"
CHECKPOINT_SUBDIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
TOKENIZER_FILE = "tokenizer.npz"
HYDRA_SUBDIR = ".hydra"


class RunDir:
    """The directory of one run of one stage (`pretrain`, `finetune`, `linear_probe`)."""

    def __init__(self, path: str | os.PathLike, stage: str):
        self.path = Path(path).absolute()
        self.stage = stage

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_SUBDIR

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def write_results(self, results: Mapping[str, Any]) -> Path:
        """`results.json`, written aside and renamed (a reader never sees half a file); main process only."""
        path = self.results_file
        if is_main_process():
            atomic_write_text(path, json.dumps(results, indent=2))
        return path

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, stage={self.stage!r})"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_dir_of_checkpoints(ckpt_dir: Path) -> Path:
    """The run dir holding a checkpoint dir (`<run>/checkpoints` -> `<run>`; a bare checkpoint dir is its own)."""
    return ckpt_dir.parent if ckpt_dir.name == CHECKPOINT_SUBDIR else ckpt_dir
