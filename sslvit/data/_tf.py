"""TensorFlow for the input pipeline only, imported on first use: quiet, and kept off every GPU (JAX owns them).

Modules of this package that build tf.data pipelines import `tf` from here; the package itself, its config and the
in-memory source never import TensorFlow.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's INFO/WARNING start-up notices are not ours
import tensorflow as tf  # noqa: E402

try:  # TF must never grab GPU memory that JAX needs; fails harmlessly if TF already initialised its devices
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
    pass

AUTOTUNE = tf.data.AUTOTUNE

__all__ = ["AUTOTUNE", "tf"]
