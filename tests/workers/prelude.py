"""What every multi-process test worker does first: read `pid n port args...` from the command line, start
process `pid` of `n` (n=1: a plain single-process run) with CPU collectives over gloo, and log like the scripts.
Workers run as `python tests/workers/<name>.py pid n port args...` with tests/ and the repository on PYTHONPATH."""

from __future__ import annotations

import json
import logging
import sys


def start() -> tuple[int, int, list[str]]:
    pid, n, port, args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from sslvit.distributed import maybe_initialize

    multi = maybe_initialize({"coordinator_address": f"127.0.0.1:{port}", "num_processes": n, "process_id": pid})
    assert multi == (n > 1)
    return pid, n, args


def report(out: dict) -> None:
    """The worker's result, as the one line the test reads."""
    print("RESULT " + json.dumps(out, default=str), flush=True)
