"""Multi-process (multi-host) JAX: start it from the cluster environment or the config, before any other JAX call.

Every entry script calls `maybe_initialize(cfg.get("distributed"))` first thing (before building models or
asking for devices). Where the settings come from, first match wins:

1. the config: `distributed.coordinator_address`, `distributed.num_processes`, `distributed.process_id`
   (all three, the same address on every process, `process_id` distinct);
2. the environment: `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID`;
3. SLURM: inside an `srun` step with more than one task (`SLURM_NTASKS > 1`, `SLURM_PROCID` set), JAX's own
   SLURM detection picks the coordinator (first node of the step), the process count and id, and one local
   device per task (`SLURM_LOCALID`): launch one task per GPU.

Otherwise nothing happens and the run is single-process (all local devices are still used, data parallel).
`distributed.enabled: false` turns all of it off (e.g. one `python` inside an `salloc` of several tasks);
`true` insists (an error names what is missing).

After initialisation only process 0 logs INFO; the others log warnings and errors only. What else multi-host
training needs is elsewhere: each process reads its own shard of the data (`sslvit.data`, from
`jax.process_index()/process_count()`), orbax writes checkpoints collectively (`sslvit.checkpoint`), and only
process 0 writes metrics, results and progress bars (`sslvit.train.fit`, `sslvit.pretraining`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

from sslvit.errors import ConfigError

log = logging.getLogger(__name__)

KEYS = ("enabled", "coordinator_address", "num_processes", "process_id", "initialization_timeout")
ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def _cfg_dict(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "items"):
        out = {str(k): v for k, v in cfg.items()}
    else:
        raise ConfigError(f"distributed={cfg!r} must be a mapping with keys {list(KEYS)}")
    unknown = sorted(set(out) - set(KEYS))
    if unknown:
        raise ConfigError(f"distributed.{unknown[0]} is not a distributed key; known keys: {', '.join(KEYS)}")
    return out


def _int(value: Any, key: str, minimum: int) -> int:
    try:
        v = int(value)
        if isinstance(value, bool) or str(v) != str(value).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}") from None
    if v < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")
    return v


def slurm_num_tasks(environ: Mapping[str, str] = os.environ) -> int:
    """Tasks of the current SLURM step (1 outside SLURM or outside an `srun` step)."""
    if "SLURM_PROCID" not in environ or "SLURM_STEP_NODELIST" not in environ:
        return 1
    return int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1")))


def resolve(cfg: Any = None, environ: Mapping[str, str] = os.environ) -> Optional[dict]:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single-process run. Pure: no JAX."""
    c = _cfg_dict(cfg)
    enabled = c.get("enabled", "auto")
    if enabled is None:
        enabled = "auto"
    if enabled not in (True, False, "auto"):
        raise ConfigError(f"distributed.enabled={enabled!r} must be auto, true or false")
    if enabled is False:
        return None
    kw: dict = {}
    timeout = c.get("initialization_timeout")
    if timeout is not None:
        kw["initialization_timeout"] = _int(timeout, "distributed.initialization_timeout", 1)

    explicit = {k: c.get(k) for k in ENV if c.get(k) is not None}
    source = "distributed"
    if not explicit:
        explicit = {k: environ[v] for k, v in ENV.items() if environ.get(v)}
        source = "env"
    if explicit:
        missing = [k for k in ENV if k not in explicit]
        if missing:
            names = [f"distributed.{k}" if source == "distributed" else ENV[k] for k in missing]
            raise ConfigError(f"multi-process setup is incomplete: {', '.join(names)} not set; set all of "
                              f"coordinator_address (host:port of process 0), num_processes and process_id")
        n = _int(explicit["num_processes"], f"{source}.num_processes", 1)
        pid = _int(explicit["process_id"], f"{source}.process_id", 0)
        if pid >= n:
            raise ConfigError(f"{source}.process_id={pid} must be < num_processes={n}")
        addr = str(explicit["coordinator_address"])
        if ":" not in addr:
            raise ConfigError(f"{source}.coordinator_address={addr!r} must be host:port of process 0, "
                              f"e.g. 10.0.0.1:12345")
        if n == 1:
            return None
        return dict(kw, coordinator_address=addr, num_processes=n, process_id=pid)

    if slurm_num_tasks(environ) > 1:
        return kw  # JAX's SLURM detection fills in the rest
    if enabled is True:
        raise ConfigError("distributed.enabled=true but no cluster found: set distributed.coordinator_address, "
                          "num_processes and process_id, or launch with srun (SLURM_NTASKS > 1)")
    return None


def maybe_initialize(cfg: Any = None) -> bool:
    """Call `jax.distributed.initialize` when the config or environment asks for several processes.

    Call it before any other JAX call (device queries included). Returns True when this is a multi-process run.
    Safe to call twice (the second call does nothing).
    """
    import jax  # noqa: PLC0415

    kw = resolve(cfg)
    if kw is None:
        return jax.distributed.is_initialized()
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(**kw)
    if jax.process_index() != 0:
        quiet_non_main_process()
    log.info("distributed: %d processes, %d devices (%d local)", jax.process_count(), jax.device_count(),
             jax.local_device_count())
    return True


def quiet_non_main_process() -> None:
    """Warnings and errors only on processes other than 0 (INFO lines and progress come from process 0)."""
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("sslvit", "absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)


def is_main_process() -> bool:
    import jax  # noqa: PLC0415

    return jax.process_index() == 0
