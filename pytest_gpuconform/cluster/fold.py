"""Collapse the per-rank JUnit files of one cluster run into one file.

The same test ran in every rank; in the merged file it is one test case that fails if any
rank failed, and its message says which host and rank. Each case keeps rank 0's
properties plus ``ranks``, a one-line account of every rank's outcome. Suite properties
are rank 0's inventory plus the list of hosts.

The merged case is a ``<failure>`` when some rank's check failed (or the ranks of a
multi-rank test disagree about skipping: the check itself is wrong), else an ``<error>``
when some rank errored (setup or teardown) or sent no report, as pytest writes errors: a
rank that crashed or was lost gave no verdict on the check, so its results are unknown,
which is what an error says. A failure anywhere wins, because the check's verdict is
then known to be "failed"; the message lists every rank that went wrong either way.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from ..reporting import junit

# How a rank's outcome reads in the merged file's messages and ``ranks`` property.
_WORD = {"passed": "passed", "failed": "failure", "error": "error", "skipped": "skipped"}


def _outcome(case: ET.Element) -> tuple[str, ET.Element | None]:
    outcome, element = junit.case_outcome(case)
    return _WORD[outcome], element


def merge(reports: list[tuple[str, int, str]], missing: dict[int, str] | None = None) -> ET.Element:
    """reports: [(host, rank, junit xml text)] in rank order; a rank with no text has no
    report, and ``missing`` may say why (rank -> reason, from faults.py)."""
    parsed: list[tuple[str, int, ET.Element | None]] = []
    for host, rank, text in sorted(reports, key=lambda r: r[1]):
        if not text.strip():
            parsed.append((host, rank, None))
            continue
        root = ET.fromstring(text)
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        parsed.append((host, rank, suite))
    base = next(s for _, _, s in parsed if s is not None)
    assert base is not None
    suite = ET.Element(
        "testsuite",
        {"name": "gpuconform-cluster", "hostname": base.get("hostname", ""), "timestamp": base.get("timestamp", "")},
    )
    props = ET.SubElement(suite, "properties")
    for prop in base.findall("properties/property"):
        props.append(prop)
    ET.SubElement(
        props, "property", {"name": "gpuconform.cluster_ranks", "value": " ".join(f"{h}/r{r}" for h, r, _ in parsed)}
    )
    order: list[tuple[str, str]] = []
    cases: dict[tuple[str, str], list[tuple[str, int, ET.Element]]] = {}
    for host, rank, rank_suite in parsed:
        if rank_suite is None:
            continue
        for case in rank_suite.findall("testcase"):
            key = (case.get("classname", ""), case.get("name", ""))
            if key not in cases:
                order.append(key)
                cases[key] = []
            cases[key].append((host, rank, case))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    for key in order:
        merged, outcome = _merge_case(cases[key], parsed, missing or {})
        suite.append(merged)
        counts["tests"] += 1
        total_time += float(merged.get("time", "0") or 0)
        if outcome == "failure":
            counts["failures"] += 1
        elif outcome == "error":
            counts["errors"] += 1
        elif outcome == "skipped":
            counts["skipped"] += 1
    for name, value in counts.items():
        suite.set(name, str(value))
    suite.set("time", f"{total_time:.3f}")
    root = ET.Element("testsuites", {"name": "gpuconform cluster"})
    root.append(suite)
    return root


def _merge_case(ranked: list[tuple[str, int, ET.Element]], parsed, reasons: dict[int, str]) -> tuple[ET.Element, str]:
    host0, rank0, first = ranked[0]
    merged = ET.Element("testcase", {k: v for k, v in first.attrib.items()})
    merged.set("time", f"{max(float(c.get('time', '0') or 0) for _, _, c in ranked):.3f}")
    outcomes = []
    elements: dict[tuple[str, int], Any] = {}
    for host, rank, case in ranked:
        outcome, element = _outcome(case)
        outcomes.append((host, rank, outcome, case))
        elements[(host, rank)] = element
    seen = {(h, r) for h, r, _ in ranked}
    missing = [(h, r) for h, r, _ in parsed if (h, r) not in seen]
    props = ET.SubElement(merged, "properties")
    for prop in first.findall("properties/property"):
        props.append(prop)
    summary = " ".join(f"{h}/r{r}:{o}" for h, r, o, _ in outcomes) + "".join(f" {h}/r{r}:missing" for h, r in missing)
    ET.SubElement(props, "property", {"name": "ranks", "value": summary})
    bad = [(h, r, o, c) for h, r, o, c in outcomes if o in ("failure", "error")]
    skip_reasons = {(elements[(h, r)].get("message") or "") for h, r, o, _ in outcomes if o == "skipped"}
    skipped = [(h, r) for h, r, o, _ in outcomes if o == "skipped"]
    # For a multi-rank test, all ranks ran one body: a partial skip is a defect. Per-node
    # tests (no world_size) may skip on some nodes and pass on others (a CPU node beside GPUs).
    multi_rank = any(p.get("name") == "world_size" for p in first.findall("properties/property"))
    disagree = multi_rank and bool(skipped) and (len(skipped) != len(outcomes) or len(skip_reasons) != 1)
    system_out = []
    if bad or missing or disagree:
        failed_check = disagree or any(o == "failure" for _, _, o, _ in bad)
        tag = "failure" if failed_check else "error"
        lines, texts = [], []
        for host, rank, outcome, case in bad:
            element = _outcome(case)[1]  # per case: a rank may have two (a failed call, then a teardown error)
            assert element is not None
            first_line = (element.get("message") or "").splitlines()[:1]
            lines.append(f"{outcome} on host {host} rank {rank}: {first_line[0] if first_line else ''}")
            texts.append(f"--- host {host} rank {rank} ---\n{element.text or ''}")
        for host, rank in missing:  # an error, with the reason where faults.py knows it
            lines.append(
                f"no report from host {host} rank {rank}: {reasons.get(rank, 'rank crashed or its report is missing')}"
            )
        if disagree:
            lines.append("ranks disagree about skipping: " + ", ".join(f"{h}/r{r}:{o}" for h, r, o, _ in outcomes))
        result = ET.SubElement(merged, tag, {"message": "; ".join(lines)})
        result.text = "\n".join(texts)
        outcome = tag
    elif all(o == "skipped" for _, _, o, _ in outcomes):
        element = elements[(host0, rank0)]
        ET.SubElement(merged, "skipped", dict(element.attrib)).text = element.text
        outcome = "skipped"
    else:
        outcome = "passed"
    for host, rank, _, case in outcomes:
        out = case.find("system-out")
        if out is not None and out.text:
            system_out.append(f"--- host {host} rank {rank} ---\n{out.text}")
    if system_out:
        ET.SubElement(merged, "system-out").text = "\n".join(system_out)
    return merged, outcome


def failed(root: ET.Element) -> bool:
    suite = root.find("testsuite")
    assert suite is not None  # merge() always writes one
    return int(suite.get("failures", "0")) + int(suite.get("errors", "0")) > 0


def write(root: ET.Element, path: str) -> None:
    junit.write_atomically(root, path)
