"""Shared plumbing of the top-level scripts: logging, TensorFlow off the GPU, one-line errors, the run dir, sweeps.

Exit status of `pretrain.py`, `finetune.py`, `linear_probe.py` (one run):

- 0: finished.
- 1: an unexpected error, with its traceback (a bug or a broken environment).
- 2: bad input (`ConfigError`): one `error: ...` line on stderr; raised before any compile, nothing was trained.
- 3: the numerics guard stopped the run (`NonFiniteError`): one `error: ...` line naming the last good checkpoint.
- 75: preempted (SIGTERM, or Ctrl-C): one `preempted: ...` line on stderr ends with the command that continues the
  run. In the training loop a checkpoint of the current step is saved first; anywhere else (start-up, tokenizer
  fit, final evaluation) the run stops at once and its latest checkpoint stands (sslvit/signals.py). 75 is
  EX_TEMPFAIL ("try again later"): not 0, so that `pretrain.py && finetune.py ...` or a scheduler's after-success
  dependency never uses a half-trained run.

Before Hydra runs, `script_main` composes the config the command line asks for: a mistake Hydra itself would
reject in a multi-line report (an unknown key, an unknown group option, a bad override) is one `error:` line naming
the key and the allowed names (status 2). `RunDirGuard` (a Hydra callback) then checks and claims the run dir
before Hydra creates anything in it (sslvit/rundir.py); Hydra's own files (`.hydra/`, the job log) reach an existing
run dir only once the run commits.

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

from sslvit import rundir, runtime, signals
from sslvit.errors import ConfigError
from sslvit.paths import check_dir

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


def script_main(hydra_main, script: str, config_name: str) -> None:
    """What a script's `__main__` runs: stop signals handled from the first moment, the command line checked before
    Hydra (`check_command_line`), then `hydra_main()` (the function decorated with `@hydra.main`)."""
    signals.install()
    try:
        check_command_line(Path(script).resolve().parent / "conf", config_name)
        hydra_main()
    except signals.Interrupted as e:  # during Hydra's own start (the run's are handled by run_main)
        print(describe_failure(e, _run_dir_seen, resumable=_resumable_seen)[1], file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)


def run_main(fn, cfg):
    """Call `fn(cfg, run_dir)`; known failures become one line on stderr and an exit status (module docstring).
    Under a Hydra multirun, failures are recorded per job and the sweep goes on."""
    quiet_start_up_notices()
    signals.install()
    runtime.enable_compile_cache()
    run_dir = hydra_run_dir()
    _hold_hydra_records(cfg, run_dir)
    resumable = "resume" in cfg
    if in_multirun():
        return _run_sweep_job(fn, cfg, run_dir, resumable)
    try:
        return fn(cfg, run_dir)
    except (Exception, signals.Interrupted) as e:
        code, line = describe_failure(e, run_dir, resumable=resumable)
        if code == EXIT_ERROR:
            raise  # unexpected: the traceback is the useful part
        log.log(logging.WARNING if code == EXIT_PREEMPTED else logging.ERROR, "%s", line)  # into the run's log
        print(line, file=sys.stderr)
        sys.exit(code)


def _hold_hydra_records(cfg, run_dir: Path) -> None:
    """The files Hydra writes into `<run dir>/.hydra/` before a job starts (the configs set `hydra.output_subdir:
    null`), held until the run commits (sslvit/rundir.py): a refused or failed start leaves an existing dir as it
    was. The same content as Hydra's: the job config and Hydra's config unresolved, the overrides."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415
    from omegaconf import OmegaConf  # noqa: PLC0415

    hydra_cfg = HydraConfig.instance().cfg
    if hydra_cfg is None or hydra_cfg.hydra.output_subdir is not None:
        return  # Hydra writes them itself
    sub = rundir.HYDRA_SUBDIR
    rundir.hold_records(
        run_dir,
        {
            f"{sub}/config.yaml": OmegaConf.to_yaml(cfg),
            f"{sub}/hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
            f"{sub}/overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task),
        },
    )


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


def describe_failure(
    e: BaseException, run_dir: Path | None, *, multirun: bool = False, resumable: bool = True
) -> tuple[int, str]:
    """(exit status, the one line to print) for an exception out of a stage. `resumable`: the script has `resume`
    (the probe and visualize are rerun instead); `run_dir` None: the failure came before there was one."""
    if isinstance(e, ConfigError):
        return EXIT_CONFIG, f"error: {e}"
    where = _sweep_dir() if multirun else run_dir
    if isinstance(e, signals.Interrupted):
        steps = rundir.RunDir(run_dir, "").checkpoint_steps() if run_dir is not None else []
        how = (
            "it stopped at once, without saving the step it was in"
            if e.at_once
            else "it stopped with nothing half-written"
        )
        saved = (
            f"; its latest checkpoint is step {steps[-1]} in {run_dir / rundir.CHECKPOINT_SUBDIR}"
            if steps
            else "; no checkpoint was saved yet"
            if resumable and run_dir is not None
            else ""
        )
        return EXIT_PREEMPTED, (
            f"preempted: {e.name} during the {e.where}; {how}{saved}; continue with: "
            f"{resume_command(where, multirun=multirun, resumable=resumable)}"
        )
    from sslvit.train import NonFiniteError, Preempted  # noqa: PLC0415  (imports jax: only once it is needed)

    if isinstance(e, NonFiniteError):
        return EXIT_NONFINITE, f"error: {e}"
    if isinstance(e, Preempted):
        return EXIT_PREEMPTED, (
            f"preempted: stopped at step {e.step} and saved a checkpoint in {run_dir}; continue "
            f"with: {resume_command(where, multirun=multirun)}"
        )
    first = (str(e).strip().splitlines() or [""])[0]
    return EXIT_ERROR, f"{type(e).__name__}: {first}"


def resume_command(run_dir: Path | None, *, multirun: bool = False, resumable: bool = True) -> str:
    """This process's command line with `resume=true` (where the script has it) and the run (or sweep) dir pinned:
    a default run dir has a timestamp, so 'the same command' alone would start a new run."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    drop = (("resume=",) if resumable else ()) + ((f"{key}=",) if run_dir is not None else ())
    args = [a for a in sys.argv[1:] if not (drop and a.lstrip("+~").startswith(drop))]
    pinned = (["resume=true"] if resumable else []) + ([f"{key}={run_dir}"] if run_dir is not None else [])
    return shlex.join(["python", sys.argv[0], *args, *pinned])


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


def _run_sweep_job(fn, cfg, run_dir: Path, resumable: bool = True):
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    hc = HydraConfig.get()
    row = {
        "job": int(hc.job.num),
        "overrides": [str(o) for o in hc.overrides.task],
        "status": "ok",
        "error": None,
        "dir": str(run_dir),
        "results": None,
    }
    t0 = time.time()
    try:
        result = fn(cfg, run_dir)
    except (Exception, signals.Interrupted) as e:
        code, line = describe_failure(e, run_dir, multirun=True, resumable=resumable)
        row.update(status="preempted" if code == EXIT_PREEMPTED else "failed", error=line.removeprefix("error: "))
        if code == EXIT_PREEMPTED:
            log.warning("job %d %s", row["job"], line)
        else:  # into the job's own log; the traceback only for unexpected errors (error.txt always has it)
            log.error("job %d failed: %s", row["job"], row["error"], exc_info=code == EXIT_ERROR)
            if rundir.may_write(run_dir):  # not into a dir the job was refused (another run's)
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
        log.info(
            "sweep %s: %d jobs, %d ok, %d failed; summary in %s",
            sweep_dir,
            len(rows),
            len(rows) - len(failed),
            len(failed),
            sweep_dir / SUMMARY_FILE,
        )
        for r in failed:
            log.error("job %d (%s) failed: %s", r["job"], " ".join(r["overrides"]), r["error"])
        if failed:
            first = failed[0]
            print(
                f"error: {len(failed)} of {len(rows)} sweep jobs failed, e.g. job {first['job']}: {first['error']}; "
                f"see {sweep_dir / SUMMARY_FILE} and each job's {ERROR_FILE}",
                file=sys.stderr,
            )
            sys.exit(EXIT_ERROR)


# ------------------------------------------------------------------------------------------------ the run dir
# The single run's dir and whether its config can resume, once RunDirGuard has seen them (for a stop between then and
# run_main; before, the same command starts afresh).
_run_dir_seen: Path | None = None
_resumable_seen = False


def _refuse(e: ConfigError) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


class RunDirGuard(Callback):
    """Hydra callback (`hydra.callbacks.run_dir` in the training and probe configs): before Hydra creates the run dir
    of a single run, check its path and claim it for `stage` (sslvit/rundir.py: its stage, the lock, resume=true
    for a dir that holds a run); before a sweep, check the sweep dir's path. A refusal is one line and status 2,
    with nothing written. Sweep jobs are claimed by their stage, in their own dirs."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_run_start(self, config, **kwargs) -> None:
        from sslvit.config.checks import Boolean  # noqa: PLC0415
        from sslvit.distributed import expected_process_index  # noqa: PLC0415

        global _run_dir_seen, _resumable_seen
        try:
            path = Path(str(config.hydra.run.dir)).absolute()
            _run_dir_seen, _resumable_seen = path, "resume" in config
            resume = config.get("resume")
            resume = None if resume is None else Boolean()(resume, "resume")
            if expected_process_index(config.get("distributed")) == 0:  # process 0 owns the dir; the others check
                rundir.RunDir(path, self.stage).claim(resume=resume)  # it once JAX knows them (RunDir.open)
            else:
                check_dir(path, "hydra.run.dir")
        except ConfigError as e:
            _refuse(e)

    def on_multirun_start(self, config, **kwargs) -> None:
        try:
            check_dir(_sweep_dir(config.hydra), "hydra.sweep.dir")
        except ConfigError as e:
            _refuse(e)


# ------------------------------------------------------------------------------------------------ the command line
# Hydra's flags after which no job runs: the command line is for Hydra alone.
_NO_JOB_FLAGS = ("help", "hydra_help", "info", "cfg", "shell_completion", "experimental_rerun")


def check_command_line(conf_dir: Path, config_name: str, argv: list[str] | None = None) -> None:
    """Compose the config that `argv` (default: sys.argv[1:]) asks for, as Hydra is about to, and turn a mistake
    Hydra would reject (unknown key, unknown group option, bad override syntax) into one `error:` line naming the key
    and the allowed names, status 2. Under `-m`, every value of every swept key is composed once. Keys added with
    `+` compose here and are checked by the stage's schema (sslvit/config/stages.py)."""
    from hydra._internal.utils import get_args_parser  # noqa: PLC0415

    parser = get_args_parser()
    parser.error = lambda message: _refuse(
        ConfigError(  # argparse's usage text would be a screenful
            f"{message}: options such as -m and --cfg go before the key=value overrides (see --help)"
        )
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if any(getattr(args, flag, None) for flag in _NO_JOB_FLAGS) or args.config_path or args.config_dir:
        return  # --help, --cfg job, ...: Hydra's alone; another config dir: Hydra composes it
    config_name = args.config_name or config_name
    for overrides in _variants(list(args.overrides), args.multirun):
        problem = compose_problem(conf_dir, config_name, overrides)
        if problem:
            _refuse(ConfigError(problem))


def _variants(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists to compose: the command line itself, or under -m one list per value of each swept key
    (the other swept keys at their first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415

    if not multirun:
        return [overrides]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return [overrides]
    values: list[list[str]] = []
    for o in parsed:
        try:
            values.append(
                [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
                if o.is_sweep_override()
                else [o.input_line]
            )
        except Exception:
            values.append([])
    base = [v[0] for v in values if v]
    out = [base]
    for i, vs in enumerate(values):
        for v in vs[1:]:
            out.append([v if j == i else w[0] for j, w in enumerate(values) if w])
    return out


def compose_problem(conf_dir: Path, config_name: str, overrides: list[str]) -> str | None:
    """None if the overrides compose; else the one line saying which override is wrong and what is allowed."""
    from hydra import compose, initialize_config_dir  # noqa: PLC0415
    from hydra.errors import MissingConfigException, OverrideParseException  # noqa: PLC0415

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name=config_name):
            compose(config_name, overrides=overrides)
        return None
    except MissingConfigException as e:  # an unknown option of a config group: stem=mlp
        missing = str(e.missing_cfg_file or "")
        group, _, option = missing.rpartition("/")
        if group and e.options:
            return f"{group}={option} is not an option of {group}: choose one of {', '.join(e.options)}"
        return _first_line(e)
    except OverrideParseException as e:
        bad = next((o for o in overrides if _unparsable(o)), None)
        return (
            f"{bad} is not a valid override ({_first_line(e)}): write key=value"
            if bad
            else f"bad override: {_first_line(e)}"
        )
    except Exception as e:
        text = str(e)
        if text.startswith("Could not override '"):
            return _unknown_key(conf_dir, config_name, overrides, text.split("'")[1])
        return _first_line(e)


def _unknown_key(conf_dir: Path, config_name: str, overrides: list[str], dotted: str) -> str:
    """`model.dimm is not a key of model: the keys are ...` (the keys of the deepest existing parent)."""
    from hydra import compose, initialize_config_dir  # noqa: PLC0415
    from omegaconf import DictConfig, OmegaConf  # noqa: PLC0415

    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != dotted]
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name=config_name):
            cfg = compose(config_name, overrides=rest, return_hydra_config=dotted.startswith("hydra."))
    except Exception:
        return f"{dotted} is not a key of this config"
    parts = dotted.split(".")
    for i in range(len(parts) - 1, -1, -1):
        parent = ".".join(parts[:i])
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig):
            keys = ", ".join(sorted(str(k) for k in node.keys()))
            return f"{dotted} is not a key of {parent or 'this config'}: the keys are {keys}"
    return f"{dotted} is not a key of this config"


def _unparsable(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415

    try:
        OverridesParser.create().parse_overrides([override])
        return False
    except Exception:
        return True


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
