"""One run of one test in a pool: send it, then follow every rank to the end of the test.

The controller waits for all of a test's phases at once: each rank runs setup, call and
teardown on its own and reports them, then says what the test left behind. A rank is done
when it has finished (and, if the test destroyed the default group, rebuilt it), died, or
failed in its own machinery. The first bad news (a failing phase, a death, a rank's own
error) gives the others ``grace`` seconds: a peer waiting for that rank in a collective
would never return. A skip or xfail does not: slower peers must be let reach theirs.
Whoever is still running at the deadline, or after the grace, is stuck;
its stack is taken before the pool is killed.

Messages carrying another test's sequence number are dropped and counted: a pool that
sends one is replaced, and nothing it said is attributed to this test.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..node import nccl
from .pool import DIED, RankPool
from .rank.messages import Finished, RankError, Rejoined, Reports, RunTest

GRACE_SECONDS = 3.0
# Bad news after which a peer's collective cannot complete. A skip or xfail is not: every
# rank may take its own time to reach the same skip or xfail, so the others are waited for,
# to the deadline, unless their stacks show them waiting in a collective (below).
GRACE_STARTERS = ("failed", "died", "error")
# A frame of a torch.distributed call in a rank's Python stack (faulthandler's format).
DIST_FRAME = re.compile(r'File "[^"]*torch/distributed/[^"]*", line \d+ in (\w+)')
# One thread's part of a faulthandler dump, and a frame line in it (innermost first).
THREAD_START = re.compile(r"^(?:Current thread|Thread) 0x", re.M)
FRAME = re.compile(r'File "[^"]*", line \d+ in \w+')


def waiting_in_collective(stack: str) -> bool:
    """Whether the main thread's innermost frame is a torch.distributed call: a rank that sits
    there, unchanged, is waiting for its peers. A rank merely working through DTensor or
    FSDP code has torch.distributed frames too, but not the same stack twice. faulthandler
    lists threads newest first, so the main thread's block is the last one."""
    starts = [m.start() for m in THREAD_START.finditer(stack)] or [0]
    innermost = FRAME.search(stack, starts[-1])
    return innermost is not None and DIST_FRAME.match(innermost.group(0)) is not None


@dataclass
class RankRun:
    rank: int
    log_start: int = 0
    reports: dict[str, Any] = field(default_factory=dict)  # when -> the rank's TestReport
    finished: Finished | None = None
    rejoined: Rejoined | None = None
    error: RankError | None = None
    died: bool = False
    exitcode: int | None = None
    stuck: bool = False
    stack: str = ""
    output: str = ""
    marker: str = ""  # the rank's phase file, read when it stopped answering
    nccl_since: int = 0  # where the rank's NCCL log ended when the test was sent
    nccl_log: str = ""  # what NCCL wrote during the test, read when the test went wrong

    @property
    def done(self) -> bool:
        if self.died or self.error is not None:
            return True
        if self.finished is None:
            return False
        return not self.finished.rejoining or self.rejoined is not None

    @property
    def phase(self) -> str:
        """The phase the rank was in when it stopped answering."""
        if self.marker in ("setup", "call", "teardown"):
            return self.marker
        if self.marker == "done":
            return "after teardown"
        if self.marker:  # "begin" (finding the test, tearing down earlier fixtures) or unknown
            return "setup"
        if "teardown" in self.reports:
            return "after teardown"
        if "call" in self.reports or ("setup" in self.reports and not self.reports["setup"].passed):
            return "teardown"
        return "call" if "setup" in self.reports else "setup"


@dataclass
class RunRecord:
    ranks: list[RankRun]
    events: list[tuple[str, int, str]] = field(default_factory=list)  # (kind, rank, when), bad news in order
    timed_out: bool = False
    interrupted: str = ""  # "SIGTERM" etc. when the run was stopped by a signal
    elapsed: float = 0.0
    foreign: int = 0  # messages of another test, dropped
    pool_start: float | None = None  # seconds, when this test started the pool


class Attempt:
    def __init__(
        self,
        pool: RankPool,
        request: RunTest,
        deadline: float,
        deserialize: Callable[[dict], Any],
        grace: float = GRACE_SECONDS,
    ) -> None:
        self.pool = pool
        self.request = request
        self.deadline = deadline
        self.grace = grace
        self.deserialize = deserialize
        self.record = RunRecord([RankRun(r) for r in range(pool.world_size)])
        self._started = 0.0
        self._bad_at: float | None = None
        self._skip_at: float | None = None  # the first skip or xfail
        self._blocked: dict[int, str] = {}  # rank -> its stack, when last seen waiting in a collective

    def run(self) -> RunRecord:
        nccl_logs = self.pool.nccl_logs()
        for run in self.record.ranks:
            if run.rank in nccl_logs:
                run.nccl_since = nccl.log_size(nccl_logs[run.rank])
        offsets = self.pool.send(self.request)
        self._started = time.perf_counter()
        for run in self.record.ranks:
            run.log_start = offsets.get(run.rank, 0)
        try:
            self._follow()
        finally:
            self.record.elapsed = time.perf_counter() - self._started
        self._settle()
        return self.record

    def _follow(self) -> None:
        runs = self.record.ranks
        while True:
            pending = {r.rank for r in runs if not r.done}
            if not pending:
                return
            now = time.perf_counter()
            limit = self._started + self.deadline
            if self._bad_at is None and self._skip_at is not None:
                if now >= self._skip_at + self.grace:
                    self._look_for_blocked_peers(pending, now)
                    continue
                limit = min(limit, self._skip_at + self.grace)
            if self._bad_at is not None:
                limit = min(limit, self._bad_at + self.grace)
            if now >= limit:
                self.record.timed_out = self._bad_at is None
                for rank in pending:
                    runs[rank].stuck = True
                    runs[rank].marker = self.pool.phase(rank)
                return
            for rank, message in self.pool.poll(pending, limit - now):
                self._take(runs[rank], message)

    def _take(self, run: RankRun, message: Any) -> None:
        if message is DIED:
            if not run.done:
                run.died = True
                run.marker = self.pool.phase(run.rank)
                run.exitcode = self.pool.exitcode(run.rank)
                self._bad("died", run.rank, run.phase)
            return
        if getattr(message, "seq", self.request.seq) != self.request.seq:
            self.record.foreign += 1  # another test's: never attributed to this one
            return
        if isinstance(message, (Reports, Finished)):
            for data in message.reports:
                report = self.deserialize(data)
                run.reports[report.when] = report
                if not report.passed or hasattr(report, "wasxfail"):
                    self._bad("failed" if report.failed else "skipped", run.rank, report.when)
        if isinstance(message, Finished):
            run.finished = message
        if isinstance(message, Rejoined):
            run.rejoined = message
        elif isinstance(message, RankError):
            run.error = message
            run.marker = self.pool.phase(run.rank)
            self._bad("error", run.rank, run.phase)

    def _bad(self, kind: str, rank: int, when: str) -> None:
        self.record.events.append((kind, rank, when))
        if kind in GRACE_STARTERS:
            if self._bad_at is None:
                self._bad_at = time.perf_counter()
        elif self._skip_at is None:
            self._skip_at = time.perf_counter()

    def _look_for_blocked_peers(self, pending: set[int], now: float) -> None:
        """After a skip or xfail, every ``grace`` seconds: a peer seen waiting in a collective
        with the same stack at two samples in a row waits for a rank that has left the test,
        and is cut at once (a peer still working, even inside torch.distributed code, is left
        alone, to the deadline)."""
        self._skip_at = now
        waiting = {
            rank: stack
            for rank, stack in self.pool.dump_stacks(sorted(pending)).items()
            if waiting_in_collective(stack)
        }
        if any(self._blocked.get(rank) == stack for rank, stack in waiting.items()):
            self._bad_at = now - self.grace
        self._blocked = waiting

    def _settle(self) -> None:
        """Stacks of stuck ranks (before anyone kills them), then every rank's output."""
        stuck = [r.rank for r in self.record.ranks if r.stuck]
        if stuck:
            for rank, stack in self.pool.dump_stacks(stuck).items():
                self.record.ranks[rank].stack = stack
        self.collect_output()
        if self.record.events or self.record.timed_out:
            self.collect_nccl_logs()

    def collect_nccl_logs(self) -> None:
        """NCCL's own account of what went wrong (its WARN lines), per rank, from this test only."""
        for rank, path in self.pool.nccl_logs().items():
            run = self.record.ranks[rank]
            run.nccl_log = nccl.log_tail(path, since=run.nccl_since)

    def collect_output(self) -> None:
        for run in self.record.ranks:
            if run.finished is not None:
                run.output = self.pool.output(run.rank, *run.finished.log_span)
            else:
                run.output = self.pool.output(run.rank, run.log_start)

    def interrupted(self, signal_name: str) -> RunRecord:
        """What is known when a signal stopped the wait: unfinished ranks count as stuck."""
        self.record.interrupted = signal_name
        self.record.elapsed = time.perf_counter() - self._started if self._started else 0.0
        for run in self.record.ranks:
            if not run.done:
                run.stuck = True
                run.marker = self.pool.phase(run.rank)
        self.collect_output()
        self.collect_nccl_logs()
        return self.record
