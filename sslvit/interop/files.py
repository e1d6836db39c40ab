"""Checkpoint files: `.safetensors` (read and written without torch) and torch `.pth`/`.pt`/`.bin` state dicts (read
with torch, `weights_only`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from sslvit.errors import ConfigError

TORCH_EXTRA = 'pip install "sslvit[timm]"'  # torch + timm: reading .pth files, running exported encoders
SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict as numpy arrays: `.safetensors` (numpy only) or a torch `.pth` / `.pt` / `.bin` (needs torch).

    Checkpoints that wrap the state dict ({'model': ...} as DeiT's, {'state_dict': ...}) are unwrapped, and a
    'module.' prefix (DistributedDataParallel) is dropped. Floating-point tensors come back as float32."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.is_file():
        raise ConfigError(f"init={os.fspath(path)!r} is not a file: pass a .safetensors or .pth state dict")
    suffix = p.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.numpy import load_file  # noqa: PLC0415

        try:
            sd = dict(load_file(str(p)))
        except Exception as e:
            raise ConfigError(
                f"cannot read {p} as safetensors ({_first_line(e)}): write it with float32 tensors"
            ) from None
    elif suffix in TORCH_SUFFIXES:
        sd = _load_torch(p)
    else:
        raise ConfigError(
            f"init={os.fspath(path)!r}: unknown file type {suffix!r}; pass a .safetensors file or a "
            f"torch state dict ({', '.join(TORCH_SUFFIXES)})"
        )
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v) for k, v in sd.items()}


def _load_torch(p: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise ConfigError(
            f"reading {p.name} needs torch: {TORCH_EXTRA} (or save the state dict as .safetensors "
            f"with safetensors.torch.save_file)"
        ) from None
    # weights_only: no arbitrary code from the pickle. Training checkpoints (DeiT's, MAE's) also hold the run's
    # argparse.Namespace, a plain attribute bag: allowed.
    import argparse  # noqa: PLC0415
    import contextlib  # noqa: PLC0415

    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        with safe([argparse.Namespace]) if safe else contextlib.nullcontext():
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"cannot read {p} with torch.load ({_first_line(e)})") from None
    for key in ("model", "state_dict", "model_state", "module"):  # training checkpoints wrap the weights
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{p} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            out[str(k)] = (v.float() if v.is_floating_point() else v).numpy()
    return out


def save_safetensors(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Optional[Mapping[str, str]] = None
) -> Path:
    """Write `tensors` to a `.safetensors` file (atomically: a temporary file renamed when complete)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    p = Path(os.path.expanduser(os.fspath(path))).absolute()
    if p.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ConfigError(f"out={os.fspath(path)!r} must end in {SAFETENSORS_SUFFIX}")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        str(tmp),
        metadata={str(k): str(v) for k, v in (metadata or {}).items()},
    )
    os.replace(tmp, p)
    return p


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
