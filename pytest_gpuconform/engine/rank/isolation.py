"""One test's boundary in a reused process: what is put back, and what is only found.

Put back after every test (it was captured just before): ``os.environ``, the working
directory, ``sys.path``, warnings filters, the umask, soft resource limits, the recursion
limit, and torch's switches (torch_state.py). RNGs are seeded from the test id before the
test, the same on every rank.

Found, because it cannot be put back: threads the test left running, child processes it
left (killed, and named), resource limits it lowered for good, a working directory that no
longer exists. Threads and processes are compared with what was alive when the test's
setup had finished, so processes and threads owned by longer-lived fixtures are not the
test's doing. Each finding says whether the process is still fit for the next test.

Used by ranks of the engine and by cluster mode alike.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass

from . import processes
from .messages import Finding
from .torch_state import TorchState, after_test_on_cuda, seed_all

THREAD_GRACE_SECONDS = 0.2  # a thread finishing as the test ends is not a leak


try:
    import resource

    _RLIMITS = {getattr(resource, n): n for n in dir(resource) if n.startswith("RLIMIT_")}
except ImportError:  # not a POSIX system
    _RLIMITS = {}


def _rlimits() -> dict[int, tuple[int, int]]:
    found = {}
    for which in _RLIMITS:
        try:
            found[which] = resource.getrlimit(which)
        except (OSError, ValueError):
            continue
    return found


def _rlimit_name(which: int) -> str:
    return _RLIMITS.get(which, str(which))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class _PythonState:
    environ: dict[str, str]
    cwd: str
    sys_path: list[str]
    umask: int
    rlimits: dict[int, tuple[int, int]]
    recursion_limit: int

    @classmethod
    def capture(cls) -> _PythonState:
        return cls(dict(os.environ), os.getcwd(), list(sys.path), _umask(), _rlimits(), sys.getrecursionlimit())

    def restore(self) -> list[Finding]:
        findings: list[Finding] = []
        if os.environ != self.environ:
            for name in set(os.environ) - set(self.environ):
                del os.environ[name]
            for name, value in self.environ.items():
                if os.environ.get(name) != value:
                    os.environ[name] = value
        try:
            if os.getcwd() != self.cwd:
                os.chdir(self.cwd)
        except OSError as exc:
            findings.append(Finding("state", f"could not return to the working directory {self.cwd}: {exc}", False))
        if sys.path != self.sys_path:
            sys.path[:] = self.sys_path
        if _umask() != self.umask:
            os.umask(self.umask)
        if sys.getrecursionlimit() != self.recursion_limit:
            sys.setrecursionlimit(self.recursion_limit)
        findings += self._restore_rlimits()
        return findings

    def _restore_rlimits(self) -> list[Finding]:
        findings = []
        for which, now in _rlimits().items():
            saved = self.rlimits.get(which)
            if saved is None or now == saved:
                continue
            try:
                resource.setrlimit(which, saved)
            except (OSError, ValueError) as exc:
                findings.append(
                    Finding(
                        "state",
                        f"lowered {_rlimit_name(which)} from {saved} to {now} for good "
                        f"(a hard limit cannot be raised again: {exc})",
                        False,
                    )
                )
        return findings


class TestBoundary:
    """begin() before a test's setup, setup_done() after it, end() after its teardown."""

    __test__ = False

    def __init__(self, torch, device_kind: str) -> None:
        self.torch = torch
        self.device_kind = device_kind
        self._python: _PythonState | None = None
        self._torch: TorchState | None = None
        self._threads: set[int] = set()
        self._children: set[int] = set()
        self._warnings: contextlib.ExitStack | None = None

    def begin(self, seed: int) -> None:
        self._python = _PythonState.capture()
        self._torch = TorchState.capture(self.torch)
        self._warnings = contextlib.ExitStack()
        self._warnings.enter_context(warnings.catch_warnings())  # filters and showwarning come back
        if not self._threads:
            self.setup_done()  # a baseline before the first test's setup reports (the usual moment)
        seed_all(self.torch, seed, self.device_kind)

    def setup_done(self) -> None:
        self._threads = {t.ident for t in threading.enumerate() if t.ident is not None}
        self._children = set(processes.children(os.getpid()))

    def end(self) -> list[Finding]:
        findings = self._leftover_threads() + self._leftover_children()
        if self._warnings is not None:
            self._warnings.close()
        if self._python is not None:
            findings += self._python.restore()
        if self._torch is not None:
            self._torch.restore(self.torch)
        if self.device_kind == "cuda":
            after_test_on_cuda(self.torch)
        return findings

    def _leftover_threads(self) -> list[Finding]:
        new = [t for t in threading.enumerate() if t.ident not in self._threads and t.is_alive()]
        if not new:
            return []
        deadline = THREAD_GRACE_SECONDS
        for thread in new:
            thread.join(timeout=deadline / len(new))
        alive = [t for t in new if t.is_alive()]
        if not alive:
            return []
        names = ", ".join(f"{t.name!r}{' (daemon)' if t.daemon else ''}" for t in alive)
        return [
            Finding(
                "thread",
                f"left {len(alive)} thread(s) running: {names}; threads cannot be stopped from outside",
                False,
            )
        ]

    def _leftover_children(self) -> list[Finding]:
        me = os.getpid()
        findings = []
        for child in processes.children(me):
            if child in self._children:
                continue
            if processes.is_zombie(child):
                _reap(child)  # finished: only the exit status was left to collect
                continue
            name = processes.describe(child)
            below = [processes.describe(p) for p in processes.descendants(child)]
            processes.kill_tree(child)
            _reap(child)
            extra = f" and its {len(below)} descendant(s) {', '.join(below)}" if below else ""
            findings.append(Finding("child", f"left child process {name}{extra} running: killed", True))
        return findings


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except (ChildProcessError, OSError):
        pass
