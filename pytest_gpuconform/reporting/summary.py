"""The gpuconform summary printed at the end of ``pytest --gpuconform``.

First the verdict, in one line saying what was verified (acceptance/verdict.py), then one
row per area x (device, dtype, world size) with pass / fail / error / skip counts and the
numbers of that row, then each failure cause that more than one test shares, once, with
its count, and where the JUnit report is.

Every line fits ``WIDTH`` (120) columns, so a CI log stays readable: a row's numbers are
the worst first, as many as fit, then "+N more"; a skip reason is shortened at a word
boundary (the full text is in pytest's ``-rs``). Which numbers a row shows: those with a
bound, ratios and throughputs (measures.py's ``shown_measures``); every other recorded
number is in the JUnit properties and the ``--gpuconform-json`` / ``--gpuconform-prometheus``
outputs only. Rows in which everything skipped fold into one per (area, device).

Pure functions of the test outcomes (outcomes.py): plugin.py passes them in.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections import Counter

from .causes import cause_of
from .measures import Measure, shown_measures
from .outcomes import CaseOutcome, outcomes_from_reports

__all__ = ["CaseOutcome", "outcomes_from_reports", "summary_lines", "summary_lines_from_stats", "shorten"]

OUTCOMES = ("passed", "failed", "error", "skipped")
WIDTH = 120
CAUSES_SHOWN = 5
ELLIPSIS = "…"


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters at a word boundary, marked with an ellipsis."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    cut = text[: width - 1]
    space = cut.rfind(" ")
    if space >= width // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:(") + ELLIPSIS


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


def _key_numbers(tests: list[CaseOutcome], width: int) -> str:
    shown = _worst([m for test in tests for m in shown_measures(test.properties)])
    texts = [m.describe() for m in shown]
    for count in range(len(texts), -1, -1):
        more = len(texts) - count
        text = ", ".join(texts[:count]) + (f"{', ' if count else ''}+{more} more" if more else "")
        if len(text) <= width or count == 0:
            return text
    return ""


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


def _common_skip_reason(tests: list[CaseOutcome], width: int) -> tuple[str, bool]:
    """("skipped: <commonest reason> (+N other reasons)", whether the reason was shortened)."""
    reasons = Counter(test.skip_reason for test in tests)
    # The commonest reason, ties broken by the text: the same row reads the same every run.
    reason = min(reasons, key=lambda text: (-reasons[text], text)) if reasons else ""
    more = f" (+{len(reasons) - 1} other reasons)" if len(reasons) > 1 else ""
    room = width - len("skipped: ") - len(more)
    text = shorten(reason or "no reason given", room)
    return f"skipped: {text}{more}", text != (reason or "no reason given")


def _sort_key(key: tuple) -> tuple:
    area, device, dtype, world_size = key
    return area, device, dtype == "*", dtype, world_size == "*", world_size if world_size != "*" else 0


def _table(tests: list[CaseOutcome], width: int) -> tuple[list[str], bool]:
    rows: dict[tuple, list[CaseOutcome]] = {}
    for test in tests:
        rows.setdefault(row_key(test), []).append(test)
    rows = _fold_skipped_rows(rows)
    header = ("area", "device", "dtype", "ws", "pass", "fail", "error", "skip", "key numbers")
    keys = sorted(rows, key=_sort_key)
    cells = [header] + [
        (k[0], k[1], k[2], str(k[3]), *(str(sum(t.outcome == o for t in rows[k])) for o in OUTCOMES)) for k in keys
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    used = sum(widths) + 2 * (len(widths))
    room = max(width - used, 20)
    lines, shortened = [], False
    for index, row in enumerate(cells):
        if index == 0:
            last = header[-1]
        else:
            group = rows[keys[index - 1]]
            if keys[index - 1][2] == "*":
                last, cut = _common_skip_reason(group, room)
                shortened = shortened or cut
            else:
                last = _key_numbers(group, room)
        padded = [
            cell.rjust(w) if 3 <= i <= 7 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join(padded + [last]).rstrip())
    return lines, shortened


def _causes(tests: list[CaseOutcome], width: int) -> list[str]:
    """Each failure cause more than one test shares, once, with its count and an example."""
    groups: dict[str, list[CaseOutcome]] = {}
    for test in tests:
        if test.outcome in ("failed", "error"):
            groups.setdefault(cause_of(test.message), []).append(test)
    shared = sorted(((c, g) for c, g in groups.items() if len(g) > 1), key=lambda item: (-len(item[1]), item[0]))
    if not shared:
        return []
    lines = [f"failures sharing a cause ({len(shared)}): count, one message, first test"]
    for _, group in shared[:CAUSES_SHOWN]:
        lines.append(shorten(f"  {len(group)} × {group[0].message or '(no message)'}", width))
        lines.append(shorten(f"      first: {group[0].nodeid}", width))
    if len(shared) > CAUSES_SHOWN:
        lines.append(f"  (+{len(shared) - CAUSES_SHOWN} more causes: see the JUnit report or gpuconform report)")
    return lines


def summary_lines(
    tests: list[CaseOutcome],
    junit_path: str | None,
    merged_path: str | None = None,
    verdict_line: str | None = None,
    width: int = WIDTH,
) -> list[str]:
    """The summary as text lines (each at most ``width`` columns, paths aside)."""
    # The verdict is never cut: it wraps, at word boundaries, onto indented lines.
    lines = textwrap.wrap(f"verdict: {verdict_line}", width, subsequent_indent="  ") if verdict_line else []
    if not tests:
        lines.append("no tests ran")
    else:
        table, shortened = _table(tests, width)
        lines += table
        lines += _causes(tests, width)
        if shortened:
            lines.append("(skip reasons shortened; pytest -rs lists each in full)")
    if junit_path:
        lines.append(f"JUnit XML: {os.path.abspath(junit_path)}")
    else:
        lines.append("JUnit XML: not written (add --junitxml=PATH to keep the measured numbers)")
    if merged_path:
        lines.append(f"merged cluster JUnit XML: {os.path.abspath(merged_path)}")
    return lines


def summary_lines_from_stats(
    stats: dict, junit_path: str | None, merged_path: str | None = None, verdict_line: str | None = None
) -> list[str]:
    """``summary_lines`` of a terminal reporter's ``stats`` (outcome -> reports)."""
    reports = [report for category in stats.values() for report in category]
    return summary_lines(outcomes_from_reports(reports), junit_path, merged_path, verdict_line)
