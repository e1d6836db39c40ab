"""Stop signals (a scheduler's SIGTERM, Ctrl-C) for the whole life of a run, so that the exit-status contract
(sslvit/cli.py: 75 = stopped, run the printed command to continue) holds wherever the signal lands:

- in the training loop (`deferred()`): the signal sets a flag; the loop finishes its step, saves a checkpoint of
  it and raises `train.Preempted`. A second Ctrl-C there stops at once (`Interrupted`, the latest complete
  checkpoint stands);
- anywhere else (start-up, the tokenizer fit, the final evaluation, ...): `Interrupted` is raised at once, so the
  run unwinds through its `finally` blocks (pending checkpoint saves complete, the lock is released). Files are
  written aside and renamed inside `deferred()`, so a signal never leaves half a file;
- submitit's SIGUSR2 (hydra/launcher=submitit_slurm: the time limit is near) is handed to submitit's own handler,
  after the loop saved its step.

`Interrupted` is a BaseException, like KeyboardInterrupt: code that catches `Exception` (e.g. a checkpoint reader
falling back past damaged steps) must not mistake a stop for a failure.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_phase = "start-up"  # what the run is doing, for the message of a stop (set by the stages)
_installed: Optional["StopSignals"] = None


def phase(name: str) -> None:
    """Say what the run does from now on ('tokenizer fit', 'final evaluation', ...), for the message of a stop."""
    global _phase
    _phase = name


def current_phase() -> str:
    return _phase


class Interrupted(BaseException):
    """A stop signal outside the training loop (or a second Ctrl-C inside it): the run stopped where it was."""

    def __init__(self, signum: int, where: str, *, at_once: bool = False):
        self.signum, self.where, self.at_once = signum, where, at_once
        super().__init__(f"{signal.Signals(signum).name} during the {where}")

    @property
    def name(self) -> str:
        return "a second Ctrl-C" if self.at_once else signal.Signals(self.signum).name


class StopSignals:
    """The process's handler of SIGTERM and SIGINT (and SIGUSR2 when submitit owns it); see the module docstring."""

    def __init__(self):
        self.received: Optional[int] = None
        self._depth = 0
        self._old: dict[int, object] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only: nothing to handle here
        sigs = list(SIGNALS)
        if callable(signal.getsignal(signal.SIGUSR2)):
            sigs.append(signal.SIGUSR2)
        for sig in sigs:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    @property
    def deferring(self) -> bool:
        return self._depth > 0

    def _handle(self, signum, frame):
        if signum == signal.SIGUSR2 and not self.deferring:
            self._forward(signum, frame)  # submitit: requeue now (nothing to save outside the loop)
            return
        if self.deferring:
            if self.received is not None and signum == signal.SIGINT:  # a second Ctrl-C: give up at once
                raise Interrupted(signum, _phase, at_once=True)
            self.received = signum
            return
        raise Interrupted(signum, _phase)

    def _forward(self, signum, frame) -> None:
        old = self._old.get(signum)
        if callable(old):
            old(signum, frame)

    def forward(self) -> None:
        """After the loop saved: hand a received SIGUSR2 to submitit's handler (which requeues the job)."""
        if self.received == signal.SIGUSR2:
            self._forward(signal.SIGUSR2, None)

    @contextlib.contextmanager
    def deferred(self) -> Iterator["StopSignals"]:
        """Signals only set `received` inside; on leaving the outermost block normally, a signal received inside
        raises `Interrupted` (a block that acts on `received` itself raises before leaving)."""
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
        if not self._depth and self.received is not None:
            signum, self.received = self.received, None
            if signum == signal.SIGUSR2:
                self._forward(signum, None)
            else:
                raise Interrupted(signum, _phase)


def install() -> StopSignals:
    """Handle stop signals for the rest of the process (the scripts call this first); idempotent."""
    global _installed
    if _installed is None:
        _installed = StopSignals().install()
    return _installed


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """The installed handler, or one installed for the block (library use without the scripts: `train.fit`)."""
    if _installed is not None:
        yield _installed
        return
    local = StopSignals().install()
    try:
        yield local
    finally:
        local.uninstall()


@contextlib.contextmanager
def deferred() -> Iterator[Optional[StopSignals]]:
    """A block that a stop signal does not cut in half (a file written and renamed): with the handler installed,
    a signal waits for the block's end. Without it (library use), signals keep their default effect."""
    if _installed is None:
        yield None
        return
    with _installed.deferred() as s:
        yield s


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


__all__ = ["Interrupted", "StopSignals", "current_phase", "deferred", "install", "phase", "signal_name", "stop_signals"]
