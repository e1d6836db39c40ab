"""`pretrain.py` with NaN images at some steps: a data fault injected below the whole CLI and training loop under
test. Runs as `python tests/workers/poisoned_pretrain.py <pretrain.py overrides...>` from the repository root."""

from __future__ import annotations

import runpy
import sys

import numpy as np

from sslvit.pretraining import Pretraining


def poisoned_step(step: int) -> bool:  # 0-based step index -> NaN images
    return step == 3 or step >= 6


clean = Pretraining.train_batches


def poisoned(self, start_step):
    for step, batch in enumerate(clean(self, start_step), start_step):
        yield dict(batch, image=np.full_like(batch["image"], np.nan)) if poisoned_step(step) else batch


Pretraining.train_batches = poisoned
sys.argv = ["pretrain.py", *sys.argv[1:]]
runpy.run_path("pretrain.py", run_name="__main__")
