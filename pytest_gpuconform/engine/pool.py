"""The controller's handle on one set of rank processes: start, send, receive, stop.

Ranks are never forked from the controller (it may have imported torch, and CUDA does not
survive fork). They are forked from multiprocessing's fork server, a clean process started
at the beginning of the session that imports torch and pytest once and never touches CUDA:
a new rank then costs a fork, not an interpreter start and a torch import, so replacing
ranks after a failure is cheap, and the server's imports overlap the controller's
collection. Where there is no fork server, ranks are spawned. A rank takes the controller's
environment, ``sys.path`` and working directory as they are when the pool starts (its
spec), not the server's. Ranks rendezvous through a FileStore in a private directory, so
no port is ever raced for. Receiving waits on the pipes together with the process sentinels, so a rank
that dies is noticed at once, not at a deadline. Stopping a rank kills everything below it
too: its process group and every descendant /proc shows (a test's ``sleep 1000`` included).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import multiprocessing.forkserver as forkserver
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import wait
from typing import Any

from ..node import nccl
from . import logs
from .rank import processes
from .rank.environment import RankIdentity
from .rank.messages import CLOSE, Ready, RunTest, StartupFailed
from .rank.process import main
from .rank.session import TEARDOWN_FAILED, read_phase
from .rank.spec import RankSpec

log = logging.getLogger(__name__)

STACK_WAIT_SECONDS = 2.0  # how long a SIGUSR1 stack dump may take to appear
_SERIAL = itertools.count(1)
# What the fork server imports once for every rank it will fork (no CUDA initialisation).
PRELOAD = [
    "pytest_gpuconform.engine.rank.server_guard",  # first: the server dies with the controller
    "torch",
    "torch.distributed",
    "pytest",
    "pytest_gpuconform.engine.rank.session",
]


def _context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


def prestart() -> None:
    """Start the fork server now, so that its imports overlap the controller's collection."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        _context()
        forkserver.ensure_running()


class RankStartError(RuntimeError):
    pass


@dataclass
class RankHandle:
    rank: int
    process: Any  # a forkserver-context Process (spawn where there is no fork server)
    conn: Any  # multiprocessing.connection.Connection
    log_path: str
    stack_path: str
    ready: Ready | None = None
    nccl_log: str | None = None  # the file NCCL_DEBUG writes for this rank (NCCL pools)

    @property
    def pid(self) -> int:
        return self.process.pid


DIED = object()  # what poll() yields for a rank whose process ended


class RankPool:
    def __init__(
        self,
        key: tuple[int, str | None, str],
        template: RankSpec,
        tmp_base: str,
        cuda_visible_devices: str | None = None,
        log_dir: str | None = None,
    ) -> None:
        self.key = key
        self.world_size, self.backend, self.device_kind = key
        self.pg_timeout = template.pg_timeout
        self.cuda_visible_devices = cuda_visible_devices  # set for the ranks only (leased GPUs)
        # Unique on the node: xdist workers (and runs) sharing --gpuconform-rank-logs DIR
        # each number their pools from 1, so the pid keeps their log files apart.
        serial = f"{os.getpid()}-{next(_SERIAL)}"
        self.name = f"ws{self.world_size}-{self.backend or 'worker'}-{self.device_kind}-{serial}"
        self.workdir = tempfile.mkdtemp(prefix=f"gpuconform-ws{self.world_size}-")
        self.log_dir = log_dir or self.workdir
        self.tmp_dir = os.path.join(tmp_base, self.name)  # tmp_path bases, kept like pytest's own
        self.template = template
        self.ranks: list[RankHandle] = []
        self.start_seconds = 0.0
        self._spawned_at = 0.0
        self._leave_offsets: dict[int, int] | None = None  # log sizes when asked to leave
        self.leave_problems: list[str] = []  # ranks that failed their session's teardown

    @property
    def alive(self) -> bool:
        return bool(self.ranks) and all(r.process.is_alive() for r in self.ranks)

    # -- start ---------------------------------------------------------------------------------
    # Every file a rank writes in log_dir carries the pool's name, unique on the node (this
    # process's pid and its pool counter): pools of other processes sharing
    # --gpuconform-rank-logs DIR never write to the same file.
    def log_path(self, rank: int) -> str:
        return os.path.join(self.log_dir, f"{self.name}-rank{rank}.log")

    def stack_path(self, rank: int) -> str:
        return os.path.join(self.log_dir, f"{self.name}-rank{rank}.stack")

    def nccl_environment(self, rank: int, environ: dict) -> dict:
        return nccl.rank_environment(rank, self.log_dir, environ, pool=self.name)

    def spawn(self) -> None:
        """Start the rank processes; ``wait_ready`` waits for them to join."""
        context = _context()
        self._spawned_at = time.perf_counter()
        shared = os.path.join(self.tmp_dir, "shared")
        os.makedirs(shared, exist_ok=True)
        cache = os.path.join(self.workdir, "rank-cache")
        environ = dict(os.environ)
        if self.cuda_visible_devices is not None:
            environ["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
        for rank in range(self.world_size):
            parent, child = context.Pipe(duplex=True)
            rank_environ = dict(environ)
            if self.device_kind == "cuda":
                # NCCL's async error handling, its own log per rank, deterministic cuBLAS:
                # read by NCCL and cuBLAS at initialisation, so set before the rank starts.
                rank_environ.update(self.nccl_environment(rank, environ))
            spec = replace(
                self.template,
                identity=RankIdentity(rank, self.world_size, self.backend, self.device_kind),
                store_path=os.path.join(self.workdir, "store"),
                log_path=self.log_path(rank),
                stack_path=self.stack_path(rank),
                phase_path=os.path.join(self.workdir, f"rank{rank}.phase"),
                shared_dir=shared,
                cpu_threads=max(1, (os.cpu_count() or 1) // self.world_size),  # the ranks share the cores
                environ=rank_environ,
                sys_path=tuple(sys.path),
                pytest_args=(
                    *self.template.pytest_args,
                    f"--basetemp={os.path.join(self.tmp_dir, f'rank{rank}')}",
                    "-o",
                    f"cache_dir={cache}",  # a rank never writes the controller's cache
                ),
            )
            # Not a daemon: a daemonic process may not start children (DataLoader workers).
            process = context.Process(target=main, args=(spec, child), name=f"gpuconform-rank{rank}")
            process.start()
            child.close()
            handle = RankHandle(rank, process, parent, spec.log_path, spec.stack_path)
            if self.backend == "nccl" and rank_environ.get("NCCL_DEBUG"):
                handle.nccl_log = nccl.debug_file(rank_environ, process.pid)
            self.ranks.append(handle)

    def wait_ready(self, deadline_seconds: float) -> float:
        """Wait until every rank has joined the process group and started its pytest session."""
        waiting: dict[Any, RankHandle] = {r.conn: r for r in self.ranks}
        sentinels: dict[Any, RankHandle] = {r.process.sentinel: r for r in self.ranks}
        while waiting:
            left = deadline_seconds - (time.perf_counter() - self._spawned_at)
            ready: list[Any] = wait(list(waiting) + list(sentinels), timeout=max(0.0, left))
            if not ready:
                raise RankStartError(
                    f"ranks did not start within {deadline_seconds:.0f} s "
                    f"(still waiting: {sorted(r.rank for r in waiting.values())})"
                )
            for handle in ready:
                state = sentinels.get(handle) or waiting.get(handle)
                if state is None:
                    continue
                if handle in sentinels and state.conn not in waiting:
                    sentinels.pop(handle)
                    continue
                message = None
                if handle is state.conn:
                    try:
                        message = state.conn.recv()
                    except (EOFError, OSError):
                        message = None
                if message is None:
                    state.process.join(1.0)
                    raise RankStartError(
                        f"rank {state.rank} died during start-up ({describe_exit(state.process.exitcode)}):\n"
                        f"{logs.last_lines(logs.read_span(state.log_path, 0), 40)}"
                    )
                if isinstance(message, StartupFailed):
                    raise RankStartError(
                        f"rank {message.rank} failed to start:\n{message.text}\n"
                        f"{logs.last_lines(logs.read_span(state.log_path, 0), 40)}"
                    )
                assert isinstance(message, Ready), message
                state.ready = message
                waiting.pop(state.conn)
        self.start_seconds = time.perf_counter() - self._spawned_at
        return self.start_seconds

    # -- one test ------------------------------------------------------------------------------
    def nccl_logs(self) -> dict[int, str]:
        """rank -> the NCCL log file it writes (empty for gloo pools and NCCL_DEBUG unset)."""
        return {r.rank: r.nccl_log for r in self.ranks if r.nccl_log}

    def send(self, request: RunTest) -> dict[int, int]:
        """Send the test to every rank; returns each rank's log size before it (for crashes)."""
        offsets = {r.rank: logs.size(r.log_path) for r in self.ranks}
        for handle in self.ranks:
            handle.conn.send(request)
        return offsets

    def poll(self, ranks: set[int], timeout: float) -> list[tuple[int, Any]]:
        """Messages (or DIED) from the listed ranks, waiting at most ``timeout`` seconds."""
        conns = {r.conn: r for r in self.ranks if r.rank in ranks}
        sentinels = {r.process.sentinel: r for r in self.ranks if r.rank in ranks}
        found: list[tuple[int, Any]] = []
        ready: list[Any] = wait(list(conns) + list(sentinels), timeout=max(0.0, timeout))
        for handle in ready:
            state = conns.get(handle)
            if state is not None:
                try:
                    while True:
                        found.append((state.rank, state.conn.recv()))
                        if not state.conn.poll():
                            break
                except (EOFError, OSError):
                    found.append((state.rank, DIED))
            else:
                state = sentinels[handle]
                if not state.conn.poll():  # its last words, if any, come first
                    found.append((state.rank, DIED))
        return found

    def exitcode(self, rank: int) -> int | None:
        process = self.ranks[rank].process
        process.join(1.0)
        return process.exitcode

    def dump_stacks(self, ranks: list[int]) -> dict[int, str]:
        """Every listed rank's Python stack, via faulthandler on SIGUSR1 (works mid-collective).

        faulthandler writes the whole dump from its C signal handler; we wait until each
        rank's stack file has grown and then stopped growing.
        """
        offsets = {}
        for handle in self.ranks:
            if handle.rank in ranks and handle.process.is_alive():
                offsets[handle.rank] = logs.size(handle.stack_path)
                os.kill(handle.pid, signal.SIGUSR1)
        stacks: dict[int, str] = {}
        last = dict(offsets)
        stop = time.perf_counter() + STACK_WAIT_SECONDS
        while offsets and time.perf_counter() < stop:
            time.sleep(0.05)
            for rank, offset in list(offsets.items()):
                now = logs.size(self.ranks[rank].stack_path)
                if now > offset and now == last[rank]:
                    stacks[rank] = logs.read_span(self.ranks[rank].stack_path, offset)
                    offsets.pop(rank)
                last[rank] = now
        for rank, offset in offsets.items():
            stack = logs.read_span(self.ranks[rank].stack_path, offset)
            stacks[rank] = stack or "(no stack: the rank did not answer SIGUSR1)"
        return stacks

    def phase(self, rank: int) -> str:
        """Where the rank says it is: begin (before setup), setup, call, teardown or done (empty: no test yet)."""
        return read_phase(os.path.join(self.workdir, f"rank{rank}.phase"))

    def output(self, rank: int, start: int, end: int | None = None) -> str:
        return logs.read_span(self.ranks[rank].log_path, start, end)

    # -- stop ----------------------------------------------------------------------------------
    def retire(self) -> None:
        """Ask the ranks to leave without waiting for them: they tear down their session
        (session-scoped fixtures, coverage data) while the run goes on; ``close`` or
        ``kill`` finishes the job."""
        self._asked_to_leave()
        for handle in self.ranks:
            try:
                handle.conn.send(CLOSE)
            except (BrokenPipeError, OSError):
                pass

    @property
    def exited(self) -> bool:
        return all(not handle.process.is_alive() for handle in self.ranks)

    def close(self, timeout: float = 10.0) -> None:
        """Ask the ranks to tear down their session and leave; kill whoever does not."""
        self._asked_to_leave()
        for handle in self.ranks:
            try:
                handle.conn.send(CLOSE)
            except (BrokenPipeError, OSError):
                pass
        stop = time.perf_counter() + timeout
        for handle in self.ranks:
            handle.process.join(max(0.0, stop - time.perf_counter()))
        for handle in self.ranks:
            if handle.process.is_alive():
                self._leave_problem(
                    handle,
                    f"did not leave within {timeout:g} s of being asked to (its session's fixtures' teardown); killed",
                )
        self.kill()

    def _asked_to_leave(self) -> None:
        if self._leave_offsets is None:
            self._leave_offsets = {r.rank: logs.size(r.log_path) for r in self.ranks}

    def _leave_problem(self, handle: RankHandle, what: str) -> None:
        offset = (self._leave_offsets or {}).get(handle.rank, 0)
        tail = logs.last_lines(logs.read_span(handle.log_path, offset), 40) or "(no output)"
        self.leave_problems.append(f"{self.name}: rank {handle.rank} {what}\n{tail}")

    def _check_exits(self) -> None:
        """Ranks asked to leave must leave cleanly: an exit status other than 0 means their
        last fixture teardown failed (rank/session.py) or the rank crashed in it."""
        if self._leave_offsets is None:
            return
        for handle in self.ranks:
            code = handle.process.exitcode
            if code == TEARDOWN_FAILED:
                self._leave_problem(handle, f"{describe_exit(code)}: its session's last fixture teardown failed")
            elif code:
                self._leave_problem(handle, f"{describe_exit(code)} while leaving (after its last test)")

    def kill(self) -> None:
        """SIGKILL every rank and everything below it (a rank blocked in a collective
        ignores SIGTERM), then remove the pool's directory. Ranks that had been asked to leave
        and exited badly are noted in ``leave_problems`` first."""
        self._check_exits()
        alive = [h.pid for h in self.ranks if h.process.is_alive()]
        if alive:
            log.debug("killing ranks of %s: pids %s", self.name, alive)
        for handle in self.ranks:
            if handle.pid is None:
                continue
            below = processes.descendants(handle.pid)
            try:
                os.killpg(handle.pid, signal.SIGKILL)  # the rank's own process group
            except OSError:
                pass
            for pid in [handle.pid, *below]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for handle in self.ranks:
            handle.process.join(5.0)
            try:
                handle.conn.close()
            except OSError:
                pass
        self.ranks = []
        shutil.rmtree(self.workdir, ignore_errors=True)


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
