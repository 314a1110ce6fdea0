"""A thread that acts when the main thread overruns a deadline it cannot notice itself.

SIGALRM ends a test that hangs in Python. It cannot end one blocked in C (a collective
waiting for a peer that never sends, a wait on a partitioned link): Python runs signal
handlers between bytecodes, in the main thread. This thread runs regardless; at the armed
time it calls the armed action, which can cut the connections the main thread waits on
(connections.py) so that the blocked call raises. The action may ask to be called again
later (a wait on peers that are all still alive is extended, not cut).

One watch at a time: arming replaces the previous watch, disarming cancels it, and a watch
that fires late for an earlier arming (the main thread disarmed meanwhile) does nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# action() -> None (done) or seconds after which to call it again
Action = Callable[[], "float | None"]


class Watchdog:
    def __init__(self, name: str = "gpuconform-watchdog") -> None:
        self._lock = threading.Condition()
        self._due: float | None = None
        self._action: Action | None = None
        self._serial = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def arm(self, seconds: float, action: Action) -> None:
        with self._lock:
            self._serial += 1
            self._due = time.monotonic() + seconds
            self._action = action
            self._lock.notify()

    def disarm(self) -> None:
        with self._lock:
            self._serial += 1
            self._due = None
            self._action = None
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (self._due is None or time.monotonic() < self._due):
                    self._lock.wait(None if self._due is None else max(0.0, self._due - time.monotonic()))
                if self._closed:
                    return
                action, serial = self._action, self._serial
                self._due, self._action = None, None
            again = action() if action is not None else None
            if again is not None:
                with self._lock:
                    if self._serial == serial and self._due is None:  # not re-armed or disarmed meanwhile
                        self._due = time.monotonic() + again
                        self._action = action
