"""The controller's handle on one set of rank processes.

Ranks are spawned (never forked: the controller may have imported torch, and CUDA does not
survive fork) and rendezvous through a FileStore in a private directory, so no port is
ever raced for. Waiting uses the process sentinels together with the pipes, so a rank that
dies is noticed at once, not at the deadline.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from .rank.messages import RankReport, Ready, RunTest, StartupFailed
from .rank.process import RankSpec, main

log = logging.getLogger(__name__)

STACK_WAIT_SECONDS = 2.0  # how long a SIGUSR1 stack dump may take to appear


@dataclass
class RankState:
    rank: int
    process: Any  # a spawn-context Process
    conn: Any  # multiprocessing.connection.Connection
    log_path: str
    stack_path: str
    log_offset: int = 0
    report: RankReport | None = None
    exitcode: int | None = None
    stack: str = ""


@dataclass
class PoolResult:
    """What happened to one test in this pool, before it is judged (see verdict.py)."""

    reports: dict[int, RankReport] = field(default_factory=dict)
    exitcodes: dict[int, int | None] = field(default_factory=dict)  # ranks that died
    running: list[int] = field(default_factory=list)  # ranks still busy when we stopped waiting
    stacks: dict[int, str] = field(default_factory=dict)
    output: dict[int, str] = field(default_factory=dict)
    timed_out: bool = False


class RankStartError(RuntimeError):
    pass


class RankPool:
    def __init__(
        self,
        world_size: int,
        backend: str | None,
        device_kind: str,
        pg_timeout: float,
        cuda_visible_devices: str | None = None,
    ) -> None:
        self.world_size = world_size
        self.cuda_visible_devices = cuda_visible_devices  # set for the ranks only (leased GPUs)
        self.backend = backend
        self.device_kind = device_kind
        self.pg_timeout = pg_timeout
        self.workdir = tempfile.mkdtemp(prefix=f"gpuconform-ws{world_size}-")
        self.ranks: list[RankState] = []

    @property
    def alive(self) -> bool:
        return bool(self.ranks) and all(r.process.is_alive() for r in self.ranks)

    # -- start ----------------------------------------------------------------------------
    def start(self, deadline_seconds: float) -> float:
        """Spawn the ranks and wait until every one has joined the process group."""
        context = multiprocessing.get_context("spawn")
        started = time.perf_counter()
        store_path = os.path.join(self.workdir, "store")
        for rank in range(self.world_size):
            parent, child = context.Pipe(duplex=True)
            spec = RankSpec(
                rank=rank,
                world_size=self.world_size,
                backend=self.backend,
                device_kind=self.device_kind,
                store_path=store_path,
                log_path=os.path.join(self.workdir, f"rank{rank}.log"),
                stack_path=os.path.join(self.workdir, f"rank{rank}.stack"),
                pg_timeout=self.pg_timeout,
                sys_path=tuple(sys.path),
            )
            process = context.Process(target=main, args=(spec, child), name=f"gpuconform-rank{rank}", daemon=True)
            with _environ(CUDA_VISIBLE_DEVICES=self.cuda_visible_devices):  # spawn copies os.environ
                process.start()
            child.close()
            self.ranks.append(RankState(rank, process, parent, spec.log_path, spec.stack_path))
        waiting: dict[Any, RankState] = {r.conn: r for r in self.ranks}
        sentinels = {r.process.sentinel: r for r in self.ranks}
        while waiting:
            left = deadline_seconds - (time.perf_counter() - started)
            ready = wait(list(waiting) + list(sentinels), timeout=max(0.0, left))
            if not ready:
                self.kill()
                raise RankStartError(
                    f"ranks did not join the process group within {deadline_seconds:.0f} s "
                    f"(still waiting: {sorted(r.rank for r in waiting.values())})"
                )
            for item in ready:
                if item in sentinels and item not in waiting:
                    state = sentinels.pop(item)
                    if state.conn in waiting:
                        state.process.join(0.5)
                        self.kill()
                        raise RankStartError(
                            f"rank {state.rank} died during start-up "
                            f"({describe_exit(state.process.exitcode)}):\n{self._log(state)}"
                        )
                    continue
                state = waiting.pop(item)
                try:
                    message = state.conn.recv()
                except (EOFError, OSError):
                    state.process.join(1.0)
                    self.kill()
                    raise RankStartError(
                        f"rank {state.rank} died during start-up "
                        f"({describe_exit(state.process.exitcode)}):\n{self._log(state)}"
                    ) from None
                if isinstance(message, StartupFailed):
                    self.kill()
                    raise RankStartError(f"rank {message.rank} failed to start:\n{message.traceback}")
                assert isinstance(message, Ready)
        return time.perf_counter() - started

    # -- run ----------------------------------------------------------------------------
    def run(self, request: RunTest, timeout: float, grace: float = 3.0) -> PoolResult:
        """Send one test to every rank and wait for all of them, a death, or the deadline.

        After the first failure or death, the others get ``grace`` seconds to finish (a
        peer blocked in a collective never will); whoever is still running then is
        reported as such, with its stack.
        """
        result = PoolResult()
        for state in self.ranks:
            state.report, state.exitcode, state.stack = None, None, ""
            state.log_offset = _size(state.log_path)
            state.conn.send(request)
        started = time.perf_counter()
        deadline = started + timeout
        pending: dict[Any, RankState] = {s.conn: s for s in self.ranks}
        sentinels: dict[Any, RankState] = {s.process.sentinel: s for s in self.ranks}
        while pending:
            now = time.perf_counter()
            if now >= deadline:
                result.timed_out = not (result.exitcodes or _any_failed(result))
                break
            ready = wait(
                list(pending) + [s for s, st in sentinels.items() if st.conn in pending], timeout=deadline - now
            )
            for item in ready:
                found = sentinels.get(item) or pending.get(item)
                if found is None or found.conn not in pending:
                    continue
                state = found
                answered = item is state.conn  # else its process sentinel fired: it died
                if answered:
                    try:
                        state.report = state.conn.recv()
                    except (EOFError, OSError):
                        state.process.join(1.0)
                        state.exitcode = state.process.exitcode
                else:
                    state.process.join(1.0)
                    state.exitcode = state.process.exitcode
                pending.pop(state.conn)
                if state.report is not None:
                    result.reports[state.rank] = state.report
                else:
                    result.exitcodes[state.rank] = state.exitcode
                if (state.report is None or state.report.outcome != "passed") and pending:
                    # A failure, death or skip: peers waiting for this rank in a collective never return.
                    deadline = min(deadline, time.perf_counter() + grace)
        result.running = sorted(s.rank for s in pending.values())
        if result.running:
            result.stacks = self.dump_stacks(result.running)
        for state in self.ranks:
            result.output[state.rank] = self._log(state)
        return result

    def dump_stacks(self, ranks: list[int]) -> dict[int, str]:
        """Every listed rank's Python stack, via faulthandler on SIGUSR1 (works mid-collective).

        faulthandler writes the whole dump from its C signal handler; we wait until each
        rank's stack file has grown and then stopped growing.
        """
        offsets = {}
        for state in self.ranks:
            if state.rank in ranks and state.process.is_alive():
                offsets[state.rank] = _size(state.stack_path)
                os.kill(state.process.pid, signal.SIGUSR1)
        stacks: dict[int, str] = {}
        last_size = dict(offsets)
        stop = time.perf_counter() + STACK_WAIT_SECONDS
        while offsets and time.perf_counter() < stop:
            time.sleep(0.1)
            for rank, offset in list(offsets.items()):
                size = _size(self.ranks[rank].stack_path)
                if size > offset and size == last_size[rank]:
                    stacks[rank] = _read_from(self.ranks[rank].stack_path, offset)
                    offsets.pop(rank)
                last_size[rank] = size
        for rank, offset in offsets.items():
            stack = _read_from(self.ranks[rank].stack_path, offset)
            stacks[rank] = stack or "(no stack: the rank did not answer SIGUSR1)"
        return stacks

    def _log(self, state: RankState) -> str:
        return _read_from(state.log_path, state.log_offset)

    # -- stop ---------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Ask healthy ranks to leave the process group and exit; kill whoever does not."""
        for state in self.ranks:
            try:
                state.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        stop = time.perf_counter() + timeout
        for state in self.ranks:
            state.process.join(max(0.0, stop - time.perf_counter()))
        self.kill()

    def kill(self) -> None:
        """SIGKILL: a rank blocked in a collective ignores SIGTERM."""
        alive = [state.process.pid for state in self.ranks if state.process.is_alive()]
        if alive:
            log.debug("killing ranks of ws%d %s: pids %s", self.world_size, self.backend or "no process group", alive)
        for state in self.ranks:
            if state.process.is_alive():
                state.process.kill()
        for state in self.ranks:
            state.process.join(5.0)
            try:
                state.conn.close()
            except OSError:
                pass
        self.ranks = []
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextmanager
def _environ(**values):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: value for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name} (signal {-code})"
    return f"exited with code {code}"


def _any_failed(result: PoolResult) -> bool:
    return any(r.outcome == "failed" for r in result.reports.values())


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_from(path: str, offset: int, limit: int = 200_000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(limit)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")
