"""Which parameters train: a registry of fine-tune modes, each a predicate on a parameter's path.

The paper's finding 2: fine-tuning only the attention weights (q/k/v and output projection of every branch of
every layer) plus the head and the position embedding adapts a model to a new resolution or task. The official
code picked parameters whose *name* contains `.attn.`, which missed the second branch (`attn1`) of parallel
blocks; here a layer's branches are stacked in one array per weight, so every branch trains by construction, and
`trainable_paths` lists exactly what trains.
"""

from __future__ import annotations

from typing import Callable

from flax import traverse_util

from sslvit.errors import ConfigError

Path = tuple[str, ...]
ATTN_WEIGHTS = ("qkv_kernel", "qkv_bias", "out_kernel", "out_bias")
MLP_WEIGHTS = ("fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias")


def _is_head(path: Path) -> bool:
    return path[0] == "head"


def _in_layers(path: Path, sublayer: str, names: tuple[str, ...]) -> bool:
    return len(path) >= 3 and path[0] == "layers" and path[1] == sublayer and path[-1] in names


FINETUNE_MODES: dict[str, Callable[[Path], bool]] = {
    "full": lambda path: True,
    "attn_only": lambda path: _is_head(path) or path == ("pos_embedding",) or _in_layers(path, "attn", ATTN_WEIGHTS),
    "mlp_only": lambda path: _is_head(path) or path == ("pos_embedding",) or _in_layers(path, "mlp", MLP_WEIGHTS),
    "head_only": _is_head,
}


def get_mode(name: str) -> Callable[[Path], bool]:
    if name not in FINETUNE_MODES:
        raise ConfigError(f"unknown finetune.mode={name!r}: choose one of {sorted(FINETUNE_MODES)}")
    return FINETUNE_MODES[name]


def partition(params, is_trainable: Callable[[Path], bool]):
    """Split a parameter tree into (trainable, frozen) trees of the same nesting."""
    flat = traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if is_trainable(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable, frozen):
    """Inverse of `partition`."""
    flat = traverse_util.flatten_dict(trainable)
    flat.update(traverse_util.flatten_dict(frozen))
    return traverse_util.unflatten_dict(flat)


def trainable_paths(params, mode: str) -> list[str]:
    pred = get_mode(mode)
    return sorted("/".join(k) for k in traverse_util.flatten_dict(params) if pred(k))
