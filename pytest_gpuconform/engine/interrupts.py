"""SIGTERM and SIGINT turned into an orderly end of the run.

Python's default SIGTERM ends the process at once: no JUnit file, ranks left to die by
themselves, their directories left behind. A cancelled CI job or Slurm's time limit sends
exactly that. So, in an enabled run, both signals raise in the controller's main thread:

* during a test's phase: ``Interrupted`` (a BaseException, so ``except Exception`` in a
  test cannot swallow it, and not a KeyboardInterrupt, so pytest reports the phase instead
  of abandoning it). The engine kills the ranks, the test is reported as interrupted
  (how long it had run), and the session stops after that test: exit code 2;
* between tests: a KeyboardInterrupt, pytest's own way to stop a session.

Either way pytest finishes the session: the JUnit file holds every finished test. A second
SIGTERM while that happens is ignored; a second Ctrl-C raises KeyboardInterrupt as usual.
Handlers are installed only where the default ones are in place.
"""

from __future__ import annotations

import signal
import threading
import time


class Interrupted(BaseException):
    def __init__(self, signal_name: str) -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name


class InterruptGuard:
    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.phase_depth = 0
        self.received: str = ""
        self.received_at = 0.0

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
            if signal.getsignal(signum) is default:
                self.previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, handler)  # type: ignore[arg-type]
        self.previous.clear()

    def enter_phase(self) -> None:
        self.phase_depth += 1

    def leave_phase(self) -> None:
        self.phase_depth = max(0, self.phase_depth - 1)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # the run is already stopping
        self.received, self.received_at = name, time.monotonic()
        if self.phase_depth:
            raise Interrupted(name)
        raise KeyboardInterrupt(f"interrupted by {name}")
