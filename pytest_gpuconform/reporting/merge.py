"""``gpuconform merge``: many per-node / per-rank JUnit files into one cluster report.

Why not plain ``junitparser merge``: CI reporters key test cases on classname + name
(GitLab keeps only the first of two equal ones), so the same check run on sixteen nodes
would collapse into one line. Here every test case's classname is prefixed with its node
label and every suite is named after its node, while the suite properties (the node
inventory) and the test case properties (measured numbers) are carried over untouched.

The node label is the suite property ``gpuconform.host`` (falling back to the suite's
``hostname`` attribute, then the file name), plus ``-r<rank>`` for per-rank files of a
cluster run (property ``gpuconform.rank``, or a file named ``...-r<rank>.xml`` as the
plugin's ``{host}-r{rank}`` template writes them).

The output validates against Surefire's junit-10 schema with test case properties. That
schema has no ``<error>`` element (it calls it ``errors``, which no reporter reads), so a
pytest error (a failing fixture, a crashed worker) is written as ``<failure type="error">``:
every reporter shows it as a failure, and the message still says "failed on setup with ...".

An unreadable input is a ``BadReport`` naming the file; nothing is written then.

Plain ElementTree rather than ``junitparser merge``, which writes ``skipped`` on
``<testsuites>`` (the schema rejects it), folds suites that compare equal into one and
keeps ``<error>``; junitparser still reads the output (tests/reporting/test_merge.py checks it).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

from . import junit

HOST_PROPERTY = "gpuconform.host"
RANK_PROPERTY = "gpuconform.rank"
SOURCE_PROPERTY = "gpuconform.source"
_RANK_FILE = re.compile(r"-r(\d+)\.xml$")


class BadReport(Exception):
    """An input that is not a readable JUnit report (the message names the file)."""


@dataclass
class NodeSuite:
    """One <testsuite> of one input file, with the node it came from."""

    path: str
    host: str
    rank: str | None
    element: ElementTree.Element
    properties: list[tuple[str, str]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return node_label(self.host, self.rank)


def _parse(path: str) -> ElementTree.Element:
    try:
        if os.path.isdir(path):
            raise BadReport(f"{path}: is a directory, not a JUnit XML file")
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise BadReport(f"{path}: no such file") from None
    except OSError as exc:
        raise BadReport(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size == 0:
        raise BadReport(
            f"{path}: is empty (0 bytes); the run that should have written it probably crashed or was killed"
        )
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise BadReport(f"{path}: not well-formed XML ({exc}); truncated or corrupt") from None
    except (OSError, UnicodeError) as exc:
        raise BadReport(f"{path}: cannot read ({exc})") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise BadReport(
            f"{path}: not a JUnit report (root element is <{root.tag}>, expected <testsuites> or <testsuite>)"
        )
    return root


def _suite_properties(suite: ElementTree.Element) -> list[tuple[str, str]]:
    return [(prop.get("name", ""), prop.get("value", "")) for prop in suite.iterfind("properties/property")]


def _identity(path: str, suite: ElementTree.Element, properties: list[tuple[str, str]]) -> tuple[str, str | None]:
    """(host, rank or None) of one input suite."""
    values = dict(properties)
    host = values.get(HOST_PROPERTY) or suite.get("hostname") or Path(path).stem
    rank = values.get(RANK_PROPERTY)
    if rank is None:
        match = _RANK_FILE.search(os.path.basename(path))
        rank = match.group(1) if match else None
    return host, rank


def node_label(host: str, rank: str | None) -> str:
    return host if rank is None or host.endswith(f"-r{rank}") else f"{host}-r{rank}"


def read_report(path: str) -> list[NodeSuite]:
    """The suites of one JUnit file, each labelled with its node; BadReport if unusable."""
    root = _parse(path)
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    if not suites:
        raise BadReport(f"{path}: contains no <testsuite>; not a test report")
    result = []
    for suite in suites:
        if suite.find("testsuite") is not None:
            raise BadReport(f"{path}: nested <testsuite> elements are not supported")
        for case in suite.findall("testcase"):
            if not case.get("name"):
                raise BadReport(f"{path}: a <testcase> without a name attribute")
        properties = _suite_properties(suite)
        result.append(NodeSuite(path, *_identity(path, suite, properties), suite, properties))
    return result


def _time(text: str | None) -> float:
    try:
        return float(text) if text else 0.0
    except ValueError:
        return 0.0


def _schema_safe_case(case: ElementTree.Element, label: str) -> ElementTree.Element:
    """A copy of ``case`` with the node in its classname and <error> made a typed <failure>."""
    case = copy.deepcopy(case)
    classname = case.get("classname") or ""
    if classname != label and not classname.startswith(label + "."):
        case.set("classname", f"{label}.{classname}" if classname else label)
    junit.errors_as_failures(case)
    return case


def _merged_suite(node: NodeSuite) -> ElementTree.Element:
    """The output <testsuite> of one node: its name is the node label, statistics recounted."""
    suite = ElementTree.Element("testsuite")
    cases = [_schema_safe_case(case, node.label) for case in node.element.findall("testcase")]
    outcomes = [junit.case_outcome(case)[0] for case in cases]
    suite.set("name", node.label)
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(outcomes.count("failed") + outcomes.count("error")))
    suite.set("errors", "0")
    suite.set("skipped", str(outcomes.count("skipped")))
    suite.set("time", f"{sum(_time(case.get('time')) for case in cases):.3f}")
    for attribute in ("timestamp", "hostname"):
        value = node.element.get(attribute)
        if value:
            suite.set(attribute, value)
    properties = ElementTree.SubElement(suite, "properties")
    # The node's identity travels as properties too, so a merged file merges (and renders)
    # again the same way.
    names = {name for name, _ in node.properties}
    extra = [(HOST_PROPERTY, node.host), (RANK_PROPERTY, node.rank), (SOURCE_PROPERTY, os.path.basename(node.path))]
    for name, value in node.properties + [(n, v) for n, v in extra if v is not None and n not in names]:
        ElementTree.SubElement(properties, "property", {"name": name, "value": value})
    suite.extend(cases)
    for tag in ("system-out", "system-err"):
        for text in node.element.findall(tag):
            suite.append(copy.deepcopy(text))
    return suite


def merge_reports(paths: list[str]) -> ElementTree.Element:
    """The merged <testsuites> of ``paths``; BadReport for an unusable or duplicated input."""
    if not paths:
        raise BadReport("no input files given")
    seen_files: dict[str, str] = {}
    seen_cases: dict[tuple[str, str, str], str] = {}
    root = ElementTree.Element("testsuites", {"name": "gpuconform"})
    for path in paths:
        real = os.path.realpath(path)
        if real in seen_files:
            raise BadReport(f"{path}: given twice (also as {seen_files[real]})")
        seen_files[real] = path
        for node in read_report(path):
            suite = _merged_suite(node)
            for case in suite.findall("testcase"):
                key = (node.label, case.get("classname") or "", case.get("name") or "")
                # Within one file a name may repeat: pytest writes a second <testcase> for
                # an error in teardown after a failed call.
                if seen_cases.get(key, path) != path:
                    raise BadReport(
                        f"{path}: test {key[1]}::{key[2]} of node {node.label} is also in "
                        f"{seen_cases[key]}; pass each node's report once (is an earlier "
                        f"merged output among the inputs?)"
                    )
                seen_cases[key] = path
            root.append(suite)
    suites = root.findall("testsuite")
    for attribute in ("tests", "failures", "errors"):
        root.set(attribute, str(sum(int(s.get(attribute, "0")) for s in suites)))
    root.set("time", f"{sum(_time(s.get('time')) for s in suites):.3f}")
    return root


def check_output_not_input(paths: list[str], output: str) -> None:
    if os.path.realpath(output) in {os.path.realpath(p) for p in paths}:
        raise BadReport(f"{output}: the output is also one of the inputs")


def run(paths: list[str], output: str) -> str:
    """Merge ``paths`` into ``output``; returns a one-line account of what was merged."""
    check_output_not_input(paths, output)
    root = merge_reports(paths)
    junit.write_atomically(root, output)
    suites = root.findall("testsuite")
    nodes = sorted({s.get("name", "") for s in suites})
    skipped = sum(int(s.get("skipped", "0")) for s in suites)
    return (
        f"merged {len(paths)} file(s), {len(nodes)} node(s), {root.get('tests')} tests "
        f"({root.get('failures')} failed or errored, {skipped} skipped) into {output}"
    )


def add_command(commands) -> None:
    """Register ``gpuconform merge`` on the CLI's subparsers (cli.py)."""
    parser = commands.add_parser(
        "merge",
        help="merge JUnit reports of many nodes / ranks into one (host in suite and classname)",
        description="Merge per-node / per-rank JUnit XML files into one report in which the same "
        "test from several nodes stays distinguishable. Exit 2 on a missing, empty or corrupt "
        "input; nothing is written then.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="JUnit XML files (pytest --junitxml)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="merged JUnit XML to write")
    parser.set_defaults(func=_command)


def _command(args) -> int:
    import sys

    try:
        print(run(args.files, args.output))
    except BadReport as exc:
        print(f"gpuconform merge: error: {exc}", file=sys.stderr)
        return 2
    return 0
