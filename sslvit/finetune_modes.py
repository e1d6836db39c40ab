"""Which parameters train: fine-tune modes, registered in `FINETUNE_MODES` and chosen with `finetune/mode=<name>`.

The paper's finding 2: fine-tuning only the attention weights (q/k/v and output projection of every branch of
every layer), with the head and the position embedding, adapts a model to a new resolution or task. The official
code picked parameters whose *name* contains `.attn.`, which missed the second branch (`attn1`) of parallel
blocks; here a layer's branches are stacked in one array per weight, so every branch trains by construction, and
`trainable_paths` lists exactly what trains.

A mode is a class whose `trains(path)` says whether the parameter at `path` (a tuple of names, e.g.
`('layers', 'attn', 'qkv_kernel')`) trains; its options come from `conf/finetune/mode/<name>.yaml`. A new mode is
one class registered with `@FINETUNE_MODES.register(name)` and one YAML file there.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flax import traverse_util

from sslvit.config.checks import Boolean
from sslvit.registry import Registry

Path = tuple[str, ...]
ATTN_WEIGHTS = ("qkv_kernel", "qkv_bias", "out_kernel", "out_bias")
MLP_WEIGHTS = ("fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias")

FINETUNE_MODES: Registry = Registry("fine-tune mode", "finetune.mode.name", "finetune.mode")


class FinetuneMode:
    """Base of the modes: a predicate over parameter paths (`mode(path)` is `mode.trains(path)`)."""

    name = ""

    def trains(self, path: Path) -> bool:
        raise NotImplementedError

    def __call__(self, path: Path) -> bool:
        return self.trains(path)

    def options(self) -> dict:
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}({opts})"


def _in_layers(path: Path, sublayer: str, names: tuple[str, ...]) -> bool:
    return len(path) >= 3 and path[0] == "layers" and path[1] == sublayer and path[-1] in names


@FINETUNE_MODES.register("full")
class Full(FinetuneMode):
    """Every parameter trains."""

    name = "full"

    def trains(self, path: Path) -> bool:
        return True


class _SublayerOnly(FinetuneMode):
    """One sublayer's weights in every layer and branch, plus (options) the head and the position embedding."""

    sublayer = ""
    weights: tuple[str, ...] = ()

    def __init__(self, *, head: bool = True, pos_embedding: bool = True):
        self.head = Boolean()(head, "finetune.mode.head")
        self.pos_embedding = Boolean()(pos_embedding, "finetune.mode.pos_embedding")

    def trains(self, path: Path) -> bool:
        return (
            (self.head and path[0] == "head")
            or (self.pos_embedding and path == ("pos_embedding",))
            or _in_layers(path, self.sublayer, self.weights)
        )

    def options(self) -> dict:
        return {"head": self.head, "pos_embedding": self.pos_embedding}


@FINETUNE_MODES.register("attn_only")
class AttnOnly(_SublayerOnly):
    """q/k/v and output projections (weights and biases) of every attention branch: the paper's finding 2."""

    name, sublayer, weights = "attn_only", "attn", ATTN_WEIGHTS


@FINETUNE_MODES.register("mlp_only")
class MlpOnly(_SublayerOnly):
    """fc1 and fc2 (weights and biases) of every MLP branch: the paper's comparison to attention-only."""

    name, sublayer, weights = "mlp_only", "mlp", MLP_WEIGHTS


@FINETUNE_MODES.register("head_only")
class HeadOnly(FinetuneMode):
    """The classification head alone (a linear probe trained with the fine-tune recipe's augmentation)."""

    name = "head_only"

    def trains(self, path: Path) -> bool:
        return path[0] == "head"


def make_mode(cfg: Any) -> FinetuneMode:
    """The mode of a `finetune.mode` config group ({'name': ..., options}), or of a bare name."""
    if isinstance(cfg, str):
        return FINETUNE_MODES.build(cfg)
    cfg = dict(cfg or {})
    return FINETUNE_MODES.build(cfg.get("name"), config=cfg, ignore=("name",))


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


def trainable_paths(params, mode: str | Mapping | FinetuneMode) -> list[str]:
    pred = mode if isinstance(mode, FinetuneMode) else make_mode(mode)
    return sorted("/".join(k) for k in traverse_util.flatten_dict(params) if pred(k))
