"""One outcome for a multi-rank test, from what each rank reported or failed to report.

Rules, in order: a rank that died fails the test (naming the rank and its exit code or
signal); otherwise the first rank to report a failure supplies the failure message; a test
still running at its deadline fails with every rank's stack; a skip counts only if every
rank skipped for the same reason; anything else mixed is a failure, because ranks that
disagree about whether a check applies are themselves a defect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .pool import PoolResult, describe_exit
from .rank.messages import RankReport

_DIST_FRAME = re.compile(r'File "[^"]*torch/distributed/[^"]*", line \d+ in (\w+)')


@dataclass
class Verdict:
    outcome: str  # "passed" | "failed" | "skipped"
    headline: str = ""  # one line: what went wrong where (JUnit's message)
    details: str = ""  # the failing rank's traceback, or stacks of hung ranks
    rank_lines: list[str] = field(default_factory=list)
    records: list = field(default_factory=list)
    reusable: bool = True  # may the ranks run the next test?

    def longrepr(self) -> str:
        parts = [self.headline]
        if self.details:
            parts += ["", self.details.rstrip()]
        parts += ["", "ranks:"] + [f"  {line}" for line in self.rank_lines]
        return "\n".join(parts)


def _blocked_in(stack: str) -> str:
    match = _DIST_FRAME.search(stack)
    return f"blocked in collective ({match.group(1)})" if match else "still running"


def rank_line(rank: int, result: PoolResult) -> str:
    report = result.reports.get(rank)
    if report is not None:
        if report.outcome == "passed":
            return f"rank {rank}: passed ({report.duration:.2f} s)"
        if report.outcome == "skipped":
            return f"rank {rank}: skipped: {report.message}"
        return f"rank {rank}: failed: {report.message}"
    if rank in result.exitcodes:
        return f"rank {rank}: crashed: {describe_exit(result.exitcodes[rank])}"
    return f"rank {rank}: {_blocked_in(result.stacks.get(rank, ''))}"


def _stacks_text(result: PoolResult) -> str:
    return "\n".join(f"--- rank {rank} stack ---\n{result.stacks[rank].rstrip()}" for rank in sorted(result.stacks))


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def judge(result: PoolResult, world_size: int, timeout: float) -> Verdict:
    lines = [rank_line(rank, result) for rank in range(world_size)]
    records = result.reports[0].records if 0 in result.reports else []
    failed: list[RankReport] = [r for r in result.reports.values() if r.outcome == "failed"]
    if result.exitcodes:
        rank, code = next(iter(result.exitcodes.items()))
        details = f"--- rank {rank} output (last lines) ---\n{_tail(result.output.get(rank, ''))}"
        if result.stacks:
            details += "\n" + _stacks_text(result)
        return Verdict("failed", f"rank {rank} {describe_exit(code)}", details, lines, records, reusable=False)
    if failed:
        first = failed[0]
        details = first.traceback
        if result.stacks:
            details += "\n" + _stacks_text(result)
        return Verdict("failed", f"rank {first.rank} failed: {first.message}", details, lines, records, reusable=False)
    skips = {r.message for r in result.reports.values() if r.outcome == "skipped"}
    skipped_ranks = [r.rank for r in result.reports.values() if r.outcome == "skipped"]
    if skipped_ranks and (len(skipped_ranks) != world_size or len(skips) != 1):
        # Checked before the deadline: a peer of a skipping rank often waits in a collective.
        return Verdict(
            "failed",
            "ranks disagree about skipping: " + "; ".join(lines),
            _stacks_text(result),
            lines,
            records,
            reusable=False,
        )
    if result.timed_out or result.running:
        headline = (
            f"timed out after {timeout:g} s (--gpuconform-timeout or world_size(timeout=...)); "
            f"ranks still running: {', '.join(map(str, result.running))}"
        )
        return Verdict("failed", headline, _stacks_text(result), lines, records, reusable=False)
    if skipped_ranks:
        return Verdict("skipped", skips.pop(), "", lines, records)
    return Verdict("passed", "", "", lines, records)
