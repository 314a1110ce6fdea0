"""One outcome per test, from pytest's per-phase reports: what the terminal summary, the
JSON document and the Prometheus textfile all read, so they count the same.

An error in setup or teardown wins over the call's verdict, a failure over a skip. A
collection error is a test of its own (outcome ``error``): a module that does not import
must never leave a node looking green.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

_PRECEDENCE = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


@dataclass
class CaseOutcome:
    """One test's verdict over its setup, call and teardown, with its properties."""

    nodeid: str
    outcome: str  # passed | failed | error | skipped
    properties: list[tuple[str, object]] = field(default_factory=list)
    skip_reason: str = ""
    message: str = ""  # first line of the failure, error or skip
    duration: float = 0.0
    path: str = ""  # the test file, relative to the rootdir (report.location[0])


def phase_outcome(report) -> str:
    when = getattr(report, "when", None)
    if report.outcome == "failed":
        return "failed" if when == "call" else "error"
    if report.outcome == "skipped":
        return "skipped"
    return "passed"


def skip_reason(report) -> str:
    longrepr = getattr(report, "longrepr", None)
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return ""


def first_line(report) -> str:
    """The failure's (or skip's) one-line message, as pytest's short summary shows it; the
    engine's rank verdicts (engine/verdict.py) read rank reports with it too."""
    longrepr = getattr(report, "longrepr", None)
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple):
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    text = getattr(crash, "message", None) if crash is not None else None
    if text is None:
        text = str(longrepr)
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def outcomes_from_reports(reports: Iterable[object]) -> list[CaseOutcome]:
    """Fold pytest's reports (TestReport, failed CollectReport) into one outcome per test."""
    tests: dict[str, CaseOutcome] = {}
    for report in reports:
        if not hasattr(report, "outcome") or not hasattr(report, "nodeid"):
            continue  # warnings, deselected items
        outcome = phase_outcome(report)
        properties = list(getattr(report, "user_properties", ()) or ())
        reason = skip_reason(report) if outcome == "skipped" else ""
        message = first_line(report) if outcome != "passed" else ""
        duration = float(getattr(report, "duration", 0.0) or 0.0)
        location = getattr(report, "location", None)
        path = str(location[0]) if location else str(getattr(report, "fspath", "") or "")
        test = tests.get(report.nodeid)
        if test is None:
            tests[report.nodeid] = CaseOutcome(report.nodeid, outcome, properties, reason, message, duration, path)
            continue
        test.duration += duration
        if _PRECEDENCE[outcome] > _PRECEDENCE[test.outcome]:
            test.outcome = outcome
            test.skip_reason = reason
            test.message = message
        if len(properties) > len(test.properties):
            test.properties = properties
    return list(tests.values())
