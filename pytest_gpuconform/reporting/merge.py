"""``gpuconform merge``: many per-node / per-rank JUnit files into one cluster report.

Why not plain ``junitparser merge``: CI reporters key test cases on classname + name
(GitLab keeps only the first of two equal ones), so the same check run on sixteen nodes
would collapse into one line. Here every test case's classname is prefixed with its node
label and every suite is named after its node (``hostname`` too), while the suite
properties (the node inventory) and the test case properties (measured numbers) are
carried over untouched. junitparser still reads the output (tests/reporting/test_consumers.py).

Streaming: each input suite is read (suites.py), rewritten and written out before the
next is read, so memory does not grow with the number of nodes; the root's totals
(``tests``, ``failures``, ``errors``, ``skipped``, ``time``) are known only at the end, so
suites go to a temporary body first and the root is written around it. Nothing appears at
the output path unless every input was good (``BadReport``, naming the file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

from . import junit
from .suites import (
    HOST_PROPERTY,
    RANK_PROPERTY,
    SOURCE_PROPERTY,
    BadReport,
    NodeSuite,
    check_inputs,
    iter_suites,
)

TOTALS = ("tests", "failures", "errors", "skipped")


def _time(text: str | None) -> float:
    try:
        return float(text) if text else 0.0
    except ValueError:
        return 0.0


def relabel_suite(node: NodeSuite) -> tuple[ElementTree.Element, dict[str, int], float]:
    """``node``'s suite rewritten in place for the merged file: named after its node,
    classnames prefixed with the node label, statistics recounted, identity properties
    added. Returns (suite, counts, time)."""
    suite, label = node.element, node.label
    counts = dict.fromkeys(TOTALS, 0)
    total_time = 0.0
    for case in suite.iterfind("testcase"):
        classname = case.get("classname") or ""
        if classname != label and not classname.startswith(label + "."):
            case.set("classname", f"{label}.{classname}" if classname else label)
        outcome = junit.case_outcome(case)[0]
        counts["tests"] += 1
        if outcome != "passed":
            counts[{"failed": "failures", "error": "errors", "skipped": "skipped"}[outcome]] += 1
        total_time += _time(case.get("time"))
    kept = {name: suite.get(name) for name in ("timestamp",)}
    machine = suite.get("hostname")
    suite.attrib.clear()
    suite.set("name", label)
    for name in TOTALS:
        suite.set(name, str(counts[name]))
    suite.set("time", f"{total_time:.3f}")
    if kept["timestamp"]:
        suite.set("timestamp", kept["timestamp"])
    suite.set("hostname", node.host)
    properties = suite.find("properties")
    if properties is None:
        properties = ElementTree.Element("properties")
        suite.insert(0, properties)
    # The node's identity travels as properties too, so a merged file merges (and renders)
    # again the same way.
    names = {name for name, _ in node.properties}
    extra = [
        (HOST_PROPERTY, node.host),
        (RANK_PROPERTY, node.rank),
        (SOURCE_PROPERTY, os.path.basename(node.path)),
        (junit.MACHINE_PROPERTY, machine if machine and machine != node.host else None),
    ]
    for name, value in extra:
        if value is not None and name not in names:
            ElementTree.SubElement(properties, "property", {"name": name, "value": value})
    return suite, counts, total_time


class _CaseKeys:
    """Refuses the same node's test twice (an earlier merged output among the inputs).

    Only labels seen in more than one file need their test ids kept, so memory stays
    proportional to those, not to the fleet: the first file of each label is remembered
    by name and read again only if a second file of that label turns up."""

    def __init__(self) -> None:
        self.first_file: dict[str, str] = {}
        self.keys: dict[str, dict[tuple[str, str], str]] = {}

    @staticmethod
    def _of(suite: ElementTree.Element) -> Iterable[tuple[str, str]]:
        return ((case.get("classname") or "", case.get("name") or "") for case in suite.iterfind("testcase"))

    def check(self, node: NodeSuite) -> None:
        label, path = node.label, node.path
        first = self.first_file.setdefault(label, path)
        if first == path and label not in self.keys:
            return
        if label not in self.keys:
            self.keys[label] = {}
            for earlier in iter_suites(first):
                if earlier.label == label:
                    relabel_suite(earlier)
                    self.keys[label].update((key, first) for key in self._of(earlier.element))
        seen = self.keys[label]
        own = set()
        for key in self._of(node.element):
            # Within one file a name may repeat: pytest writes a second <testcase> for an
            # error in teardown after a failed call.
            if seen.get(key, path) != path and key not in own:
                raise BadReport(
                    f"{path}: test {key[0]}::{key[1]} of node {label} is also in {seen[key]}; "
                    "pass each node's report once (is an earlier merged output among the inputs?)"
                )
            own.add(key)
        seen.update((key, path) for key in own)


def merge_to(paths: list[str], output: str) -> tuple[dict[str, int], int]:
    """Merge ``paths`` into ``output`` (streaming); returns (the totals written, nodes)."""
    check_inputs(paths, output)
    totals = dict.fromkeys(TOTALS, 0)
    nodes: set[str] = set()
    elapsed = 0.0
    keys = _CaseKeys()
    directory = os.path.dirname(os.path.abspath(output))
    with junit.AtomicOutput(output) as out:
        with tempfile.TemporaryFile(dir=directory) as body:
            for path in paths:
                for node in iter_suites(path):
                    suite, counts, took = relabel_suite(node)
                    keys.check(node)
                    suite.tail = None
                    # encoding="unicode" then one encode: ElementTree's utf-8 writer is ~50% slower.
                    body.write(ElementTree.tostring(suite, encoding="unicode").encode("utf-8"))
                    for name in TOTALS:
                        totals[name] += counts[name]
                    elapsed += took
                    nodes.add(node.label)
            attributes = " ".join(
                f"{name}={quoteattr(str(value))}"
                for name, value in [("name", "gpuconform"), *totals.items(), ("time", f"{elapsed:.3f}")]
            )
            out.write(f"<?xml version='1.0' encoding='utf-8'?>\n<testsuites {attributes}>".encode())
            body.seek(0)
            shutil.copyfileobj(body, out, 1 << 20)
            out.write(b"</testsuites>\n")
    return totals, len(nodes)


def run(paths: list[str], output: str) -> str:
    """Merge ``paths`` into ``output``; returns a one-line account of what was merged."""
    totals, nodes = merge_to(paths, output)
    bad = totals["failures"] + totals["errors"]
    return (
        f"merged {len(paths)} file(s), {nodes} node(s), {totals['tests']} tests "
        f"({bad} failed or errored, {totals['skipped']} skipped) into {output}"
    )
