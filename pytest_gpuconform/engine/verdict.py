"""The ranks' phase reports folded into one pytest report per phase.

Rules, in order:

* The first bad news decides: the first rank to report a failing phase supplies the
  failure, with its own native representation (pytest's traceback and assertion diffs, its
  path and line), its one-line message prefixed by the rank; a rank that died fails the test
  naming the rank and its exit code or signal; a rank whose own machinery failed says so.
* Ranks must agree: skipped, xfailed and xpassed count only when every rank reports the
  same for the same phase; anything else is a failure listing what each rank did.
* A test still running at its deadline fails with every stuck rank's stack; a run stopped
  by SIGTERM or SIGINT is an error saying so and how long it had run.

Every failure carries a one-line-per-rank summary (what each rank did, and how long its
setup, call and teardown took, apart from the ranks' start-up) and each rank's output goes
to the report's captured sections. What a test left behind in its ranks (isolation
findings) is attached to its teardown report: a warning, a JUnit property, and under
``--gpuconform-strict-isolation`` a failure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from .. import compat
from ..node import nccl
from ..reporting.outcomes import first_line
from .attempt import DIST_FRAME, RankRun, RunRecord
from .findings import ISOLATION_PROPERTY, strict_headline
from .logs import crash_lines
from .pool import describe_exit

PHASES = ("setup", "call", "teardown")
_TIMEOUT_BANNER = re.compile(r"^\++ Timeout \++$", re.MULTILINE)


@dataclass
class Context:
    """What the fold needs to know besides the ranks' reports."""

    deadline: float
    strict_isolation: bool = False
    pool_start: float | None = None  # seconds, when this test started the pool
    pool_start_detail: str = ""


@dataclass
class Verdict:
    reports: dict[str, pytest.TestReport]
    reusable: bool
    headline: str = ""
    can_retire: bool = False  # not reusable, but every rank is idle: let it leave gracefully
    findings: list[str] = field(default_factory=list)


@dataclass
class _Failure:
    when: str
    headline: str
    native: Any = None  # the failing rank's TestReport, when a rank reported the failure
    lines: list[str] = field(default_factory=list)


# -- what each rank did --------------------------------------------------------------------------
def _category(report) -> tuple[str, str]:
    xfail = getattr(report, "wasxfail", None)
    if report.passed:
        return ("xpassed", xfail) if xfail is not None else ("passed", "")
    if report.skipped:
        return ("xfailed", xfail) if xfail is not None else ("skipped", first_line(report))
    return "failed", first_line(report)


def _passed_silently(run: RankRun, when: str) -> bool:
    """The rank got past this phase, but its (passing) report was still buffered when it
    crashed or was killed: its phase file says where it was."""
    if when in run.reports or not (run.died or run.stuck or run.error is not None):
        return False
    reached = run.phase.replace("after ", "")
    return reached in PHASES and PHASES.index(reached) > PHASES.index(when) or run.phase == "after teardown"


def _blocked(stack: str) -> str:
    match = DIST_FRAME.search(stack)
    return f"blocked in collective ({match.group(1)})" if match else "still running"


def rank_status(run: RankRun) -> str:
    if run.died:
        return f"crashed: {describe_exit(run.exitcode)} during {run.phase}"
    if run.stuck:
        return f"{_blocked(run.stack)} during {run.phase}"
    if run.error is not None:
        return f"error: {(run.error.text.strip().splitlines() or [''])[0]}"
    for when in PHASES:
        report = run.reports.get(when)
        if report is None:
            continue
        kind, text = _category(report)
        if kind == "failed":
            return f"failed: {text}" if when == "call" else f"error in {when}: {text}"
        if kind != "passed":
            return f"{kind}: {text}" if text else kind
    return "passed" if run.reports else "no report"


def rank_line(run: RankRun) -> str:
    times = [f"{when} {run.reports[when].duration:.2f} s" for when in PHASES if when in run.reports]
    if run.finished is not None and run.finished.collect_seconds >= 0.05:
        times.append(f"collecting the file {run.finished.collect_seconds:.2f} s")
    suffix = f" ({', '.join(times)})" if times else ""
    return f"rank {run.rank}: {rank_status(run)}{suffix}"


def _summary(record: RunRecord, context: Context) -> list[str]:
    lines = ["ranks:"] + [f"  {rank_line(run)}" for run in record.ranks]
    if context.pool_start is not None:
        detail = f" ({context.pool_start_detail})" if context.pool_start_detail else ""
        lines.append(
            f"start-up (before the test, not in its phases): ranks ready in {context.pool_start:.2f} s{detail}"
        )
    return lines


def _stacks(record: RunRecord) -> list[str]:
    lines = []
    for run in record.ranks:
        if run.stack:
            lines += [f"--- rank {run.rank} stack ---", run.stack.rstrip()]
    return lines


# -- the failure, if any ---------------------------------------------------------------------------
def _death(run: RankRun) -> _Failure:
    headline = f"rank {run.rank} {describe_exit(run.exitcode)}"
    if _TIMEOUT_BANNER.search(run.output):
        headline += " (pytest-timeout ended it at its timeout, thread method)"
    tail = crash_lines(run.output) or "(no output)"
    when = "teardown" if run.phase == "after teardown" else run.phase
    return _Failure(when, headline, lines=[f"--- rank {run.rank} output (last lines) ---", tail])


def _disagreement(record: RunRecord, deadline: float) -> _Failure | None:
    for when in PHASES:
        seen = {}
        for run in record.ranks:
            if when in run.reports:
                seen[run.rank] = _category(run.reports[when])
            elif _passed_silently(run, when):
                seen[run.rank] = ("passed", "")
            elif run.stuck and run.phase == when:
                seen[run.rank] = ("stuck", "")
        if len(set(seen.values())) <= 1 or not any(k in ("skipped", "xfailed", "xpassed") for k, _ in seen.values()):
            continue
        kinds = {k for k, _ in seen.values()}
        about = "skipping" if "skipped" in kinds else "xfail"
        statuses = "; ".join(f"rank {run.rank}: {rank_status(run)}" for run in record.ranks)
        stuck = [str(run.rank) for run in record.ranks if run.stuck]
        waited = ""
        if stuck and record.timed_out:
            waited = f" (waited to the deadline, {deadline:g} s, for ranks {', '.join(stuck)})"
        elif stuck:
            waited = (
                f" (ranks {', '.join(stuck)} cut: blocked in a collective after a peer's {about.removesuffix('ping')})"
            )
        return _Failure(when, f"ranks disagree about {about}{waited}: {statuses}")
    return None


def _primary(record: RunRecord, context: Context) -> _Failure | None:
    if record.interrupted:
        return _Failure(
            "setup", f"interrupted by {record.interrupted} after {record.elapsed:.1f} s; ranks stopped and killed"
        )
    for kind, rank, when in record.events:
        run = record.ranks[rank]
        if kind == "failed":
            text = first_line(run.reports[when])
            place = "failed" if when == "call" else f"error in {when}"
            return _Failure(when, f"rank {rank} {place}: {text}", native=run.reports[when])
        if kind == "died":
            return _death(run)
        if kind == "error" and run.error is not None:
            first = (run.error.text.strip().splitlines() or ["failed"])[0]
            when = "setup" if not run.reports else run.phase.replace("after ", "")
            return _Failure(when, first, lines=[run.error.text.rstrip()])
    disagreement = _disagreement(record, context.deadline)
    if disagreement is not None:
        return disagreement
    stuck = [run for run in record.ranks if run.stuck]
    if stuck:
        headline = (
            f"timed out after {context.deadline:g} s (--gpuconform-timeout, world_size(timeout=...) or "
            f"pytest-timeout); ranks still running: {', '.join(str(r.rank) for r in stuck)}"
        )
        return _Failure(stuck[0].phase.replace("after ", ""), headline)
    return None


# -- building pytest's reports ---------------------------------------------------------------------
def _location_line(item: pytest.Item, headline: str) -> str:
    """'test_x.py:12: <headline>': where annotators (and editors) put the failure."""
    path, lineno, _ = item.location
    return f"{path}:{(lineno or 0) + 1}: {headline}"


def _failure_longrepr(item: pytest.Item, failure: _Failure, record: RunRecord, context: Context):
    summary = _summary(record, context)
    native = failure.native.longrepr if failure.native is not None else None
    crash = getattr(native, "reprcrash", None)
    if native is not None and crash is not None and hasattr(native, "addsection"):
        crash.message = failure.headline
        for run in record.ranks:
            if run.stack:
                native.addsection(f"rank {run.rank} stack", run.stack.rstrip())
        native.addsection("gpuconform", "\n".join(summary))
        return native
    lines = [_location_line(item, failure.headline)]
    if native is not None:
        lines.append(str(native))
    lines += failure.lines + _stacks(record) + [""] + summary
    return compat.text_longrepr(str(item.path), (item.location[1] or 0) + 1, failure.headline, lines)


def _sections(record: RunRecord, when: str, with_output: bool) -> list[tuple[str, str]]:
    sections = []
    for run in record.ranks:
        report = run.reports.get(when)
        for name, content in getattr(report, "sections", ()) or ():
            sections.append((f"{name} [rank {run.rank}]", content))
        if with_output and run.output.strip():
            sections.append((f"Captured stdout and stderr [rank {run.rank}]", run.output))
    return sections


def _make(item: pytest.Item, when: Any, outcome: Any, longrepr, record: RunRecord, sections, extra=None):
    present = [run.reports[when] for run in record.ranks if when in run.reports]
    duration = max((r.duration for r in present), default=0.0)
    if any((run.stuck or run.died) and run.phase == when for run in record.ranks) or (
        record.interrupted and when == "setup"
    ):
        # Waiting for a rank that never reported this phase took the rest of the run.
        earlier = sum(
            max((run.reports[w].duration for run in record.ranks if w in run.reports), default=0.0)
            for w in PHASES[: PHASES.index(when)]
        )
        duration = max(duration, record.elapsed - earlier)
    start = min((r.start for r in present), default=0.0)
    stop = max((r.stop for r in present), default=start + duration)
    return pytest.TestReport(
        item.nodeid,
        item.location,
        {name: 1 for name in item.keywords},
        outcome,
        longrepr,
        when,
        sections,
        duration,
        start,
        stop,
        list(item.user_properties),
        **(extra or {}),
    )


def _agreed(item: pytest.Item, when: str, record: RunRecord, sections) -> pytest.TestReport:
    """All ranks reported the same for this phase: the first rank's report speaks for all."""
    first = next(run.reports[when] for run in record.ranks if when in run.reports)
    kind, _ = _category(first)
    extra = {"wasxfail": first.wasxfail} if hasattr(first, "wasxfail") else {}
    outcome = "passed" if kind in ("passed", "xpassed") else "skipped"
    longrepr = first.longrepr if outcome == "skipped" else None
    return _make(item, when, outcome, longrepr, record, sections, extra)


def _records(item: pytest.Item, record: RunRecord) -> None:
    """record() values of rank 0 (every rank ran the same body) onto the controller's item."""
    rank0 = record.ranks[0].reports
    last = rank0.get("teardown") or rank0.get("call") or rank0.get("setup")
    if last is not None:
        known = list(item.user_properties)
        item.user_properties.extend(p for p in last.user_properties if tuple(p) not in map(tuple, known))


def findings_of(record: RunRecord) -> tuple[list[str], bool]:
    """(one line per distinct finding, naming its ranks; whether every one was put right)."""
    by_text: dict[str, list[int]] = {}
    restored = True
    rejoining = [run.rank for run in record.ranks if run.finished is not None and run.finished.rejoining]
    for run in record.ranks:
        for finding in run.finished.findings if run.finished is not None else ():
            by_text.setdefault(finding.text, []).append(run.rank)
            restored = restored and finding.restored
        if run.rejoined is not None and run.rejoined.error:
            by_text.setdefault(f"could not rebuild the default process group: {run.rejoined.error.strip()}", []).append(
                run.rank
            )
            restored = False
    if rejoining and len(rejoining) != len(record.ranks):
        others = [run.rank for run in record.ranks if run.rank not in rejoining]
        by_text.setdefault(f"the default process group was kept by ranks {others}: ranks replaced", []).append(
            rejoining[0]
        )
        restored = False
    lines = []
    for text, ranks in by_text.items():
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        lines.append(f"{who}: {text}")
    return lines, restored


def _nccl_logs(record: RunRecord) -> dict[int, str]:
    """What NCCL wrote during the test, per rank (empty for gloo pools)."""
    return {run.rank: run.nccl_log for run in record.ranks}


def fold(item: pytest.Item, record: RunRecord, context: Context) -> Verdict:
    failure = _primary(record, context)
    hint = nccl.warning_hint(_nccl_logs(record)) if failure is not None else None
    if failure is not None and hint:
        failure.headline = f"{failure.headline} ({hint})"
    _records(item, record)
    findings, restored = findings_of(record)
    if findings:
        item.user_properties.append((ISOLATION_PROPERTY, "; ".join(findings)))
    output_from = PHASES.index(failure.when if failure is not None else "call")

    def sections(when: str) -> list[tuple[str, str]]:
        found = _sections(record, when, PHASES.index(when) >= output_from)
        if failure is not None and failure.when == when:
            found += nccl.log_sections(_nccl_logs(record))
        return found

    reports: dict[str, pytest.TestReport] = {}
    for when in ("setup", "call"):
        if failure is not None and failure.when == when:
            longrepr = _failure_longrepr(item, failure, record, context)
            reports[when] = _make(item, when, "failed", longrepr, record, sections(when))
            break
        if not all(when in run.reports or _passed_silently(run, when) for run in record.ranks):
            break
        if any(when in run.reports for run in record.ranks):
            reports[when] = _agreed(item, when, record, sections(when))
        else:
            reports[when] = _make(item, when, "passed", None, record, sections(when))
        if not reports[when].passed:
            break  # skipped or xfailed setup: there is no call
    if failure is not None and failure.when == "teardown":
        longrepr = _failure_longrepr(item, failure, record, context)
        reports["teardown"] = _make(item, "teardown", "failed", longrepr, record, sections("teardown"))
    else:
        reports["teardown"] = _teardown(item, record, sections("teardown"))
    if findings and context.strict_isolation and reports["teardown"].passed:
        headline = strict_headline(findings)
        lines = [_location_line(item, headline), *findings]
        longrepr = compat.text_longrepr(str(item.path), (item.location[1] or 0) + 1, headline, lines)
        reports["teardown"] = _make(item, "teardown", "failed", longrepr, record, reports["teardown"].sections)
    reusable = (
        failure is None
        and restored
        and record.foreign == 0
        and all(run.done and not run.died and run.error is None for run in record.ranks)
    )
    idle = record.foreign == 0 and all(
        run.done and not run.died and (run.error is None or not run.error.fatal) for run in record.ranks
    )
    return Verdict(reports, reusable, failure.headline if failure else "", idle and not reusable, findings)


def _teardown(item: pytest.Item, record: RunRecord, sections) -> pytest.TestReport:
    """A teardown failure that is not the test's first failure still counts (pytest reports
    both), from the first rank whose teardown failed; ranks killed before their teardown add
    nothing (their failure is already reported)."""
    for run in record.ranks:
        report = run.reports.get("teardown")
        if report is not None and report.failed:
            secondary = _Failure("teardown", f"rank {run.rank} error in teardown: {first_line(report)}", native=report)
            longrepr = _failure_longrepr(item, secondary, record, Context(deadline=0))
            return _make(item, "teardown", "failed", longrepr, record, sections)
    return _make(item, "teardown", "passed", None, record, sections)


def engine_error(item: pytest.Item, headline: str, lines: list[str]) -> Verdict:
    """The test could not be run in ranks at all (ranks would not start, GPUs not leased):
    an error of its setup, stated at the test's own location."""
    reports = {
        "setup": missing_report(item, "setup", headline, lines),
        "teardown": _make(item, "teardown", "passed", None, RunRecord([]), []),
    }
    return Verdict(reports, reusable=False, headline=headline)


def missing_report(item: pytest.Item, when: str, headline: str, lines: list[str] | None = None) -> pytest.TestReport:
    """A failed report of phase ``when`` that no rank supplied, stated at the test's location."""
    longrepr = compat.text_longrepr(
        str(item.path), (item.location[1] or 0) + 1, headline, [_location_line(item, headline), *(lines or [])]
    )
    return _make(item, when, "failed", longrepr, RunRecord([]), [])


def placeholder(item: pytest.Item, when: str) -> pytest.TestReport:
    """A phase with nothing to report (its test failed in the controller before reaching the ranks)."""
    return _make(item, when, "passed", None, RunRecord([]), [])
