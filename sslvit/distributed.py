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
import sys
import threading
from typing import Any, Mapping, Optional

from sslvit.config.checks import Integer
from sslvit.config.groups import DistributedConfig
from sslvit.errors import ConfigError

log = logging.getLogger(__name__)

KEYS = ("enabled", "coordinator_address", "num_processes", "process_id", "initialization_timeout")
ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def _env_int(value: str, key: str, minimum: int) -> int:
    """An integer environment variable (text), checked like a config value."""
    try:
        number = int(str(value).strip())
    except ValueError:
        number = value  # not an integer: reported as given
    return Integer(min=minimum)(number, key)


def slurm_num_tasks(environ: Mapping[str, str] = os.environ) -> int:
    """Tasks of the current SLURM step (1 outside SLURM or outside an `srun` step)."""
    if "SLURM_PROCID" not in environ or "SLURM_STEP_NODELIST" not in environ:
        return 1
    return int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1")))


def resolve(cfg: Any = None, environ: Mapping[str, str] = os.environ) -> Optional[dict]:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single-process run. Pure: no JAX."""
    c = DistributedConfig.parse(cfg if cfg is not None else {})
    if c.enabled is False:
        return None
    kw: dict = {}
    if c.initialization_timeout is not None:
        kw["initialization_timeout"] = c.initialization_timeout

    explicit = {k: getattr(c, k) for k in ENV if getattr(c, k) is not None}
    source = "distributed"
    if not explicit:
        explicit = {k: environ[v] for k, v in ENV.items() if environ.get(v)}
        source = "env"
    if explicit:
        missing = [k for k in ENV if k not in explicit]
        if missing:
            names = [f"distributed.{k}" if source == "distributed" else ENV[k] for k in missing]
            raise ConfigError(
                f"multi-process setup is incomplete: {', '.join(names)} not set; set all of "
                f"coordinator_address (host:port of process 0), num_processes and process_id"
            )
        n = _env_int(explicit["num_processes"], f"{source}.num_processes", 1)
        pid = _env_int(explicit["process_id"], f"{source}.process_id", 0)
        if pid >= n:
            raise ConfigError(f"{source}.process_id={pid} must be < num_processes={n}")
        addr = str(explicit["coordinator_address"])
        if ":" not in addr:
            raise ConfigError(
                f"{source}.coordinator_address={addr!r} must be host:port of process 0, e.g. 10.0.0.1:12345"
            )
        if n == 1:
            return None
        return dict(kw, coordinator_address=addr, num_processes=n, process_id=pid)

    if slurm_num_tasks(environ) > 1:
        return kw  # JAX's SLURM detection fills in the rest
    if c.enabled is True:
        raise ConfigError(
            "distributed.enabled=true but no cluster found: set distributed.coordinator_address, "
            "num_processes and process_id, or launch with srun (SLURM_NTASKS > 1)"
        )
    return None


def expected_process_index(cfg: Any = None, environ: Mapping[str, str] = os.environ) -> int:
    """This process's index as `maybe_initialize` will make it, known before JAX starts (0 in a single-process run):
    the run dir is claimed by process 0 before anything else happens (sslvit/rundir.py)."""
    kw = resolve(cfg, environ)
    if kw is None:
        return 0
    if "process_id" in kw:
        return int(kw["process_id"])
    return int(environ.get("SLURM_PROCID", "0") or 0)  # JAX's SLURM detection uses the task id


DEFAULT_INIT_TIMEOUT = 300  # seconds: jax.distributed.initialize's own default


def maybe_initialize(cfg: Any = None) -> bool:
    """Call `jax.distributed.initialize` when the config or environment asks for several processes.

    Call it before any other JAX call (device queries included). Returns True when this is a multi-process run.
    Safe to call twice (the second call does nothing).

    When a process does not join within `initialization_timeout` seconds, JAX ends every process with an abort and
    a C++ stack (status 134). A watchdog ends this process a moment before that instead, with one `error:` line
    naming the coordinator and the timeout (status 2): JAX's own deadline is set a little later.
    """
    import jax  # noqa: PLC0415

    kw = resolve(cfg)
    if kw is None:
        return jax.distributed.is_initialized()
    if jax.distributed.is_initialized():
        return True
    timeout = int(kw.pop("initialization_timeout", DEFAULT_INIT_TIMEOUT))
    address = kw.get("coordinator_address") or os.environ.get("SLURM_STEP_NODELIST", "the SLURM step's first node")
    joined = threading.Event()

    def watchdog():
        if not joined.wait(timeout):
            print(
                f"error: distributed start-up: not all processes joined the coordinator at {address} within "
                f"{timeout} s (distributed.initialization_timeout): start every process (num_processes), check "
                f"that they reach that address, or raise the timeout",
                file=sys.stderr,
                flush=True,
            )
            os._exit(2)  # the main thread is inside JAX's C++ connect; this is the only way out before its abort

    threading.Thread(target=watchdog, name="distributed-start-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(initialization_timeout=timeout + 30, **kw)
    finally:
        joined.set()
    if jax.process_index() != 0:
        quiet_non_main_process()
    log.info(
        "distributed: %d processes, %d devices (%d local)",
        jax.process_count(),
        jax.device_count(),
        jax.local_device_count(),
    )
    return True


def quiet_non_main_process() -> None:
    """Warnings and errors only on processes other than 0 (INFO lines and progress come from process 0)."""
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("sslvit", "absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)


def is_main_process() -> bool:
    """Process 0 of a multi-process run (the one that logs and writes results); True in a single-process run."""
    import jax  # noqa: PLC0415

    return jax.process_index() == 0
