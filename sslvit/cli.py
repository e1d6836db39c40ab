"""Shared plumbing of the top-level scripts: logging, TensorFlow off the GPU, one-line errors, the run dir, sweeps.

Exit status of `pretrain.py`, `finetune.py`, `linear_probe.py` (one run):

- 0: finished.
- 1: an unexpected error, with its traceback (a bug or a broken environment).
- 2: bad input (`ConfigError`): one `error: ...` line on stderr; raised before any compile, nothing was trained.
- 3: the numerics guard stopped the run (`NonFiniteError`): one `error: ...` line naming the last good checkpoint.
- 75: preempted (SIGTERM, or Ctrl-C): a checkpoint of the current step was saved and one `preempted: ...` line on
  stderr is the command that continues the run. 75 is EX_TEMPFAIL ("try again later"): not 0, so that
  `pretrain.py && finetune.py ...` or a scheduler's after-success dependency never uses a half-trained run.

Sweeps (`-m`): Hydra's basic launcher would let one job's error (or its `sys.exit`) end the whole sweep without
a word in that job's log. Under multirun, `run_main` records each job instead: a failing job logs its error and
traceback to its own log and `<job dir>/error.txt` and returns, so the sweep goes on; every job appends one line
to `<sweep dir>/summary.jsonl` (job, overrides, status ok|failed|preempted, error, dir, results). `SweepSummary`
(a Hydra callback, under `hydra.callbacks` in the configs) logs the tally at the end and exits 1 if any job
failed. A preempted job stops the sweep at once (75): the machine is going away; the same sweep command with
`resume=true hydra.sweep.dir=<sweep dir>` continues every job from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from sslvit import runtime
from sslvit.errors import ConfigError

# The scripts import this module before JAX: the host allocator setting must precede JAX's threads.
runtime.keep_host_memory()

log = logging.getLogger("sslvit")

EXIT_ERROR, EXIT_CONFIG, EXIT_NONFINITE, EXIT_PREEMPTED = 1, 2, 3, 75
SUMMARY_FILE = "summary.jsonl"  # in the sweep dir: one line per job
ERROR_FILE = "error.txt"  # in a failed sweep job's dir: the error line and its traceback


def hydra_run_dir() -> Path:
    """The job's output dir (Hydra 1.3 no longer changes the working directory)."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    return Path(HydraConfig.get().runtime.output_dir).absolute()


def run_main(fn, cfg):
    """Call `fn(cfg, run_dir)`; known failures become one line on stderr and an exit status (module docstring).
    Under a Hydra multirun, failures are recorded per job and the sweep goes on."""
    quiet_start_up_notices()
    run_dir = hydra_run_dir()
    if in_multirun():
        return _run_sweep_job(fn, cfg, run_dir)
    try:
        return fn(cfg, run_dir)
    except Exception as e:
        code, line = describe_failure(e, run_dir)
        if code == EXIT_ERROR:
            raise  # unexpected: the traceback is the useful part
        log.log(logging.WARNING if code == EXIT_PREEMPTED else logging.ERROR, "%s", line)  # into the run's log
        print(line, file=sys.stderr)
        sys.exit(code)


# Libraries' start-up notices that are not this project's output (JAX looking for a TPU on a CPU machine, absl).
QUIET_LOGGERS = ("absl", "jax._src.xla_bridge")


def quiet_start_up_notices() -> None:
    """Keep the libraries' start-up notices out of a run's output, unless `hydra.verbose` asks for more (it also
    lets TensorFlow's native notices through: sslvit/data/_tf.py)."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    verbose = HydraConfig.initialized() and bool(HydraConfig.get().verbose)
    if verbose:
        os.environ["SSLVIT_VERBOSE"] = "1"
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def describe_failure(e: BaseException, run_dir: Path, *, multirun: bool = False) -> tuple[int, str]:
    """(exit status, the one line to print) for an exception out of a stage."""
    if isinstance(e, ConfigError):
        return EXIT_CONFIG, f"error: {e}"
    from sslvit.train import NonFiniteError, Preempted  # noqa: PLC0415  (imports jax: only once it is needed)

    if isinstance(e, NonFiniteError):
        return EXIT_NONFINITE, f"error: {e}"
    if isinstance(e, Preempted):
        where = _sweep_dir() if multirun else run_dir
        return EXIT_PREEMPTED, (f"preempted: stopped at step {e.step} and saved a checkpoint in {run_dir}; continue "
                                f"with: {resume_command(where, multirun=multirun)}")
    first = (str(e).strip().splitlines() or [""])[0]
    return EXIT_ERROR, f"{type(e).__name__}: {first}"


def resume_command(run_dir: Path, *, multirun: bool = False) -> str:
    """This process's command line with `resume=true` and the run (or sweep) dir pinned: a default run dir has a
    timestamp, so 'the same command' alone would start a new run."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    args = [a for a in sys.argv[1:] if not a.lstrip("+~").startswith(("resume=", f"{key}="))]
    return shlex.join(["python", sys.argv[0], *args, "resume=true", f"{key}={run_dir}"])


# ------------------------------------------------------------------------------------------------ sweeps
def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415
    from hydra.types import RunMode  # noqa: PLC0415

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweep_dir(hydra_cfg: Any = None) -> Path:
    """The sweep dir, absolute (relative ones are relative to where the command was started)."""
    if hydra_cfg is None:
        from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

        hydra_cfg = HydraConfig.get()
    d = Path(str(hydra_cfg.sweep.dir))
    return d if d.is_absolute() else Path(str(hydra_cfg.runtime.cwd)) / d


def _run_sweep_job(fn, cfg, run_dir: Path):
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    hc = HydraConfig.get()
    row = {"job": int(hc.job.num), "overrides": [str(o) for o in hc.overrides.task], "status": "ok", "error": None,
           "dir": str(run_dir), "results": None}
    t0 = time.time()
    try:
        result = fn(cfg, run_dir)
    except Exception as e:  # noqa: BLE001 - a sweep records every job's failure and goes on
        code, line = describe_failure(e, run_dir, multirun=True)
        row.update(status="preempted" if code == EXIT_PREEMPTED else "failed", error=line.removeprefix("error: "))
        if code == EXIT_PREEMPTED:
            log.warning("job %d %s", row["job"], line)
        else:  # into the job's own log; the traceback only for unexpected errors (error.txt always has it)
            log.error("job %d failed: %s", row["job"], row["error"], exc_info=code == EXIT_ERROR)
            (run_dir / ERROR_FILE).write_text(f"{line}\n\n{traceback.format_exc()}")
        _append_summary(row, t0)
        if code == EXIT_PREEMPTED:
            print(line, file=sys.stderr)
            sys.exit(code)
        return None
    results = sorted(run_dir.glob("results*.json"))
    row["results"] = str(results[0]) if results else None
    _append_summary(row, t0)
    return result


def _append_summary(row: dict, t0: float) -> None:
    row["seconds"] = round(time.time() - t0, 1)
    path = _sweep_dir() / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:  # one short write in append mode: parallel launchers are safe
        f.write(json.dumps(row) + "\n")


def read_summary(sweep_dir: str | os.PathLike) -> list[dict]:
    """The rows of `<sweep_dir>/summary.jsonl` (one per job that ended)."""
    path = Path(sweep_dir) / SUMMARY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class SweepSummary(Callback):
    """Hydra callback: a fresh summary file per sweep; at the end, the tally, and exit status 1 if a job failed."""

    def on_multirun_start(self, config, **kwargs) -> None:
        path = _sweep_dir(config.hydra) / SUMMARY_FILE
        if path.is_file():  # the same sweep dir again (e.g. resume=true): keep the previous summary aside
            n = 1
            while path.with_name(f"summary.{n}.jsonl").exists():
                n += 1
            path.rename(path.with_name(f"summary.{n}.jsonl"))

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = _sweep_dir(config.hydra)
        rows = read_summary(sweep_dir)
        failed = [r for r in rows if r["status"] != "ok"]
        log.info("sweep %s: %d jobs, %d ok, %d failed; summary in %s", sweep_dir, len(rows), len(rows) - len(failed),
                 len(failed), sweep_dir / SUMMARY_FILE)
        for r in failed:
            log.error("job %d (%s) failed: %s", r["job"], " ".join(r["overrides"]), r["error"])
        if failed:
            first = failed[0]
            print(f"error: {len(failed)} of {len(rows)} sweep jobs failed, e.g. job {first['job']}: {first['error']}; "
                  f"see {sweep_dir / SUMMARY_FILE} and each job's {ERROR_FILE}", file=sys.stderr)
            sys.exit(EXIT_ERROR)
