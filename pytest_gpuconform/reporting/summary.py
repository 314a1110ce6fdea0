"""The table printed at the end of ``pytest --gpuconform``.

One row per area x (device, dtype, world size), with pass / fail / error / skip counts and
the key numbers of that row (measures.py says which: bounded values and ratios; the worst
of each across the row's tests, out-of-bound ones first and marked ``!``). Rows in which
everything skipped fold into one per (area, device) that gives the commonest reason. An operator
reading a CI log sees at a glance which feature broke on which device and by how much,
and where the full JUnit report is.

Pure functions of the test reports: plugin.py's ``pytest_terminal_summary`` passes
``terminalreporter.stats`` in and writes the lines out.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from .measures import Measure, key_measures

OUTCOMES = ("passed", "failed", "error", "skipped")
_PRECEDENCE = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
MAX_NUMBERS_PER_ROW = 3
MAX_REASON = 70


@dataclass
class CaseOutcome:
    """One test's verdict over its setup, call and teardown, with its properties."""

    nodeid: str
    outcome: str
    properties: list[tuple[str, object]] = field(default_factory=list)
    skip_reason: str = ""


def _phase_outcome(report) -> str:
    when = getattr(report, "when", None)
    if report.outcome == "failed":
        return "failed" if when == "call" else "error"
    if report.outcome == "skipped":
        return "skipped"
    return "passed"


def _skip_reason(report) -> str:
    longrepr = getattr(report, "longrepr", None)
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return ""


def outcomes_from_reports(reports: Iterable[object]) -> list[CaseOutcome]:
    """Fold pytest's per-phase reports (TestReport, CollectReport) into one outcome per test.

    An error in setup or teardown wins over the call's verdict, a failure over a skip.
    """
    tests: dict[str, CaseOutcome] = {}
    for report in reports:
        if not hasattr(report, "outcome") or not hasattr(report, "nodeid"):
            continue  # warnings, deselected items
        outcome = _phase_outcome(report)
        properties = list(getattr(report, "user_properties", ()) or ())
        reason = _skip_reason(report) if outcome == "skipped" else ""
        test = tests.get(report.nodeid)
        if test is None:
            tests[report.nodeid] = CaseOutcome(report.nodeid, outcome, properties, reason)
            continue
        if _PRECEDENCE[outcome] > _PRECEDENCE[test.outcome]:
            test.outcome = outcome
            test.skip_reason = reason
        if len(properties) > len(test.properties):
            test.properties = properties
    return list(tests.values())


def _area(test: CaseOutcome, props: dict) -> str:
    if "feature" in props:
        return str(props["feature"])
    module = test.nodeid.split("::", 1)[0]
    return os.path.splitext(os.path.basename(module))[0].removeprefix("test_") or module


def row_key(test: CaseOutcome) -> tuple[str, str, str, int]:
    props = dict(test.properties)
    try:
        world_size = int(str(props.get("world_size", 1)))
    except (TypeError, ValueError):
        world_size = 1
    return _area(test, props), str(props.get("device", "-")), str(props.get("dtype", "-")), world_size


def _worst(measures: list[Measure]) -> list[Measure]:
    """Per measure name, the instance furthest from (or past) its bound; the largest ratio."""
    worst: dict[str, Measure] = {}
    for measure in measures:
        kept = worst.get(measure.name)
        if kept is None or _badness(measure) > _badness(kept):
            worst[measure.name] = measure
    return sorted(worst.values(), key=lambda m: (-_badness(m), m.name))


def _badness(measure: Measure) -> float:
    if measure.bound is None:
        return -1.0 if math.isnan(measure.value) else -1.0 / (1.0 + abs(measure.value))
    used = measure.use_of_bound
    return math.inf if used is None or math.isnan(used) else used


def _key_numbers(tests: list[CaseOutcome]) -> str:
    measures = [m for test in tests for m in key_measures(test.properties)]
    shown = _worst(measures)
    text = ", ".join(m.describe() for m in shown[:MAX_NUMBERS_PER_ROW])
    if len(shown) > MAX_NUMBERS_PER_ROW:
        text += f" (+{len(shown) - MAX_NUMBERS_PER_ROW} more in the JUnit properties)"
    return text


def _fold_skipped_rows(rows: dict) -> dict:
    """Rows in which every test skipped (CUDA rows on a CPU node, world sizes the node cannot
    host) fold into one row per (area, device), with ``*`` for dtype and world size: the
    table stays short and the rows that ran stay visible."""
    folded: dict = {}
    for key, group in rows.items():
        if all(test.outcome == "skipped" for test in group):
            key = (key[0], key[1], "*", "*")
        folded.setdefault(key, []).extend(group)
    return folded


def _common_skip_reason(tests: list[CaseOutcome]) -> str:
    reasons: dict[str, int] = {}
    for test in tests:
        reasons[test.skip_reason] = reasons.get(test.skip_reason, 0) + 1
    # The commonest reason, ties broken by the text: the same row reads the same every run.
    reason = min(reasons, key=lambda text: (-reasons[text], text)) if reasons else ""
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 1] + "…"
    more = f" (+{len(reasons) - 1} other reasons)" if len(reasons) > 1 else ""
    return f"skipped: {reason or 'no reason given'}{more}"


def _sort_key(key: tuple) -> tuple:
    area, device, dtype, world_size = key
    return area, device, dtype == "*", dtype, world_size == "*", world_size if world_size != "*" else 0


def summary_lines(tests: list[CaseOutcome], junit_path: str | None, merged_path: str | None = None) -> list[str]:
    """The table as text lines, followed by where the JUnit report (and a cluster run's
    merged report) is."""
    rows: dict[tuple, list[CaseOutcome]] = {}
    for test in tests:
        rows.setdefault(row_key(test), []).append(test)
    rows = _fold_skipped_rows(rows)
    header = ("area", "device", "dtype", "ws", "pass", "fail", "error", "skip", "key numbers")
    table = [header]
    for key in sorted(rows, key=_sort_key):
        group = rows[key]
        counts = [sum(t.outcome == outcome for t in group) for outcome in OUTCOMES]
        last = _common_skip_reason(group) if key[2] == "*" else _key_numbers(group)
        table.append((key[0], key[1], key[2], str(key[3]), *map(str, counts), last))
    lines = []
    if len(table) == 1:
        lines.append("no tests ran")
    else:
        widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
        for row in table:
            cells = [
                cell.rjust(width) if 3 <= i <= 7 else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=False))
            ]
            lines.append("  ".join(cells + [row[-1]]).rstrip())
    if junit_path:
        lines.append(f"JUnit XML: {os.path.abspath(junit_path)}")
    else:
        lines.append("JUnit XML: not written (add --junitxml=PATH to keep the measured numbers)")
    if merged_path:
        lines.append(f"merged cluster JUnit XML: {os.path.abspath(merged_path)}")
    return lines


def summary_lines_from_stats(stats: dict, junit_path: str | None, merged_path: str | None = None) -> list[str]:
    """``summary_lines`` of a terminal reporter's ``stats`` (outcome -> reports)."""
    reports = [report for category in stats.values() for report in category]
    return summary_lines(outcomes_from_reports(reports), junit_path, merged_path)
