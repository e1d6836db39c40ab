"""Shared plumbing of the top-level scripts: logging, TensorFlow off the GPU, one-line errors, the run dir."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from sslvit.errors import ConfigError

log = logging.getLogger("sslvit")


def hydra_run_dir() -> Path:
    """The job's output dir (Hydra 1.3 no longer changes the working directory)."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    return Path(HydraConfig.get().runtime.output_dir).absolute()


def run_main(fn, cfg):
    """Call `fn(cfg, run_dir)`; turn a ConfigError into one line on stderr and exit status 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        return fn(cfg, hydra_run_dir())
    except ConfigError as e:
        log.error("config error: %s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
