"""TensorFlow for the input pipeline only, imported on first use: quiet, and kept off every GPU (JAX owns them).

Modules of this package that build tf.data pipelines import `tf` from here; the package itself, its config and the
in-memory source never import TensorFlow.

Importing TensorFlow prints start-up notices from its C++ runtime straight to the process's stderr (oneDNN, CPU
features), before any logging setting applies; they are not this project's output. The import runs with the
native stderr captured, and anything else it printed is passed on. `SSLVIT_VERBOSE=1` (set by the scripts under
`hydra.verbose=true`) shows everything.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
    r"cpu_feature_guard|To enable the following instructions|This TensorFlow binary is optimized"
)


@contextlib.contextmanager
def quiet_native_stderr():
    """Capture what native code writes to file descriptor 2 inside the block; pass on all but known notices."""
    if os.environ.get("SSLVIT_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode(errors="replace").splitlines()
                if line.strip() and not _NOTICES.search(line)
            ]
            if kept:
                print("\n".join(kept), file=sys.stderr)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's INFO/WARNING log lines are not ours either
with quiet_native_stderr():
    import tensorflow as tf

try:  # TF must never grab GPU memory that JAX needs; fails harmlessly if TF already initialised its devices
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
    pass

AUTOTUNE = tf.data.AUTOTUNE

__all__ = ["AUTOTUNE", "quiet_native_stderr", "tf"]
