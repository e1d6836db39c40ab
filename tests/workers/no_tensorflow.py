"""Pretraining, linear probe and fine-tuning with TensorFlow and tensorflow-datasets blocked from import, as on a host
that has only the JAX stack. Runs as `python tests/workers/no_tensorflow.py '<data overrides as a JSON list>' <out
dir>` (the arrays source, or an image folder with its default Pillow pipeline) with tests/ and the repository on
PYTHONPATH; reports the stages' results and the TensorFlow modules that were loaded (none may be)."""

from __future__ import annotations

import sys

import einops
import jax.numpy as jnp
import numpy as np

# einops picks a tensor's backend among the frameworks whose name is in sys.modules, importing each: a None entry
# (the block below) would make it import TensorFlow, which on a host without it never happens (the name is absent).
# Its numpy and JAX backends, the ones this project uses, are registered first, as the first call on a real host does.
einops.rearrange(np.zeros(1), "a -> a"), einops.rearrange(jnp.zeros(1), "a -> a")

for name in ("tensorflow", "tensorflow_datasets"):
    sys.modules[name] = None  # `import tensorflow` now raises ImportError, wherever it is tried

import json
from pathlib import Path

from conftest import compose_config

from sslvit.finetune import finetune
from sslvit.pretraining import pretrain
from sslvit.probe import linear_probe

data, out = [*json.loads(sys.argv[1]), "progress=false"], Path(sys.argv[2])
micro = [
    "model.dim=32",
    "model.depth=1",
    "model.heads=2",
    "model.mlp_dim=64",
    "batch_size=32",
    "log_every=2",
    "ckpt_every=4",
    "optim.warmup_steps=1",
]
results = {
    "pretrain": pretrain(
        compose_config(
            "pretrain",
            data
            + micro
            + ["steps=4", "target.vocab_size=16", "target.num_samples=2000", "target.iters=3", "eval_batches=2"],
        ),
        out / "pretrain",
    )
}
results["probe"] = linear_probe(
    compose_config("linear_probe", data + [f"run={out / 'pretrain'}", "batch_size=64", "probe.epochs=2"]), out / "probe"
)
ft = finetune(
    compose_config(
        "finetune",
        data
        + micro[4:]
        + [
            f"run={out / 'pretrain'}",
            "steps=4",
            "eval_batches=2",
            "finetune.mixup_alpha=0.8",
            "finetune.cutmix_alpha=1.0",
        ],
    ),
    out / "finetune",
)
results["finetune"] = {k: v for k, v in ft.items() if k != "encoder"}
loaded = sorted(
    m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("tensorflow", "tensorflow_datasets")
)
print("RESULT " + json.dumps({"results": results, "tensorflow_modules": loaded}, default=str), flush=True)
