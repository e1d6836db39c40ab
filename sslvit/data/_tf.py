"""TensorFlow for the input pipeline only, imported on first use: quiet, and kept off every GPU (JAX owns them).

Modules of this package that build tf.data pipelines import `tf` from here; the package itself, its config and the
in-memory source never import TensorFlow.

Importing TensorFlow prints start-up notices from its C++ runtime straight to the process's stderr (oneDNN, CPU
features), before any logging setting applies; they are not this project's output. The import runs with the
native stderr captured, and anything else it printed is passed on. `SSLVIT_VERBOSE=1` (set by the scripts under
`hydra.verbose=true`) shows everything.

`import tensorflow` also imports Keras's optimizers eagerly (to register them for SavedModel loading): ~2 of its
~4.5 s on a 2-core CPU, for nothing tf.data uses. Unless Keras is already loaded, that one import is made to fail
during `import tensorflow` (TensorFlow passes over it) and is allowed again right after: Keras, imported later by
anyone, loads and registers its optimizers as usual.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

_EAGER_KERAS = "keras.src.optimizers"  # what tensorflow/__init__.py imports "so that registrations happen"

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


@contextlib.contextmanager
def without_eager_keras():
    """`import tensorflow` without its eager import of Keras's optimizers (module docstring)."""
    if _EAGER_KERAS in sys.modules or "tensorflow" in sys.modules:
        yield
        return
    sys.modules[_EAGER_KERAS] = None  # an import of it raises ImportError, which tensorflow/__init__.py passes over
    try:
        yield
    finally:
        if sys.modules.get(_EAGER_KERAS, 0) is None:
            del sys.modules[_EAGER_KERAS]


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's INFO/WARNING log lines are not ours either
with quiet_native_stderr(), without_eager_keras():
    import tensorflow as tf

try:  # TF must never grab GPU memory that JAX needs; fails harmlessly if TF already initialised its devices
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
    pass

AUTOTUNE = tf.data.AUTOTUNE


def no_autograph(fn):
    """`fn` traced as written when a `Dataset.map` builds its graph. tf.data passes map functions through AutoGraph
    by default, which parses and rewrites their source: ~1.2 s of a folder pipeline's first batch on a 2-core CPU,
    and a generated file in the temp dir per function. This package's transforms branch on data only with
    `tf.cond` (their Python `if`s test static dtypes, shapes and flags), so they need no rewriting; a Python `if`
    on a tensor would fail at tracing, not pass unnoticed."""
    return tf.autograph.experimental.do_not_convert(fn)


__all__ = ["AUTOTUNE", "no_autograph", "quiet_native_stderr", "tf"]
