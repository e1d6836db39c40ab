"""A folder dataset read by each process of a run: `root` holds the images (some corrupt), `on_corrupt=skip`. Reports
what this process checked (its 'checking N of M images' log lines), the dataset it sees, and what a second start
checks (none: the manifest written by process 0 serves every process)."""

from __future__ import annotations

import logging
import re

from prelude import report, start

pid, n, (root,) = start()

import jax
from conftest import CONF_DIR
from omegaconf import OmegaConf

from sslvit import data
from sslvit.data import folder


class Checked(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.counts = []

    def emit(self, record):
        m = re.search(r"checking (\d+) of (\d+) images", record.getMessage())
        if m:
            self.counts.append([int(m.group(1)), int(m.group(2))])


handler = Checked()
logging.getLogger("sslvit.data.folder").addHandler(handler)
logging.getLogger("sslvit.data.folder").setLevel(logging.INFO)
cfg = OmegaConf.load(CONF_DIR / "data" / "folder.yaml")
cfg.path, cfg.on_corrupt = root, "skip"
info = data.dataset_info(cfg)
first = handler.counts
handler.counts = []
folder._SCANS.clear()  # a second start of this process: the on-disk manifest, not this process's memory
jax.experimental.multihost_utils.sync_global_devices("manifest written")
again = data.dataset_info(cfg)
report(
    {
        "process": jax.process_index(),
        "checked": first,
        "checked_again": handler.counts,
        "num_train": info.num_train,
        "num_test": info.num_test,
        "skipped": list(info.skipped_files),
        "same_again": again == info,
    }
)
