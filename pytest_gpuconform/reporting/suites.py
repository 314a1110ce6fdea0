"""Reading JUnit inputs one ``<testsuite>`` at a time: what ``merge`` and ``report`` share.

A fleet's reports are large (1,000 nodes x ~400 cases is ~300 MB of XML); holding them all
as one tree needs gigabytes. ``iter_suites`` parses incrementally and hands out one suite
with its node identity at a time, then drops it, so both commands need memory for one
node's suite, not for the fleet.

The node label is the suite property ``gpuconform.host`` (falling back to the suite's
``hostname`` attribute, then the file name), plus ``-r<rank>`` for per-rank files of a
cluster run (property ``gpuconform.rank``, or a file named ``...-r<rank>.xml`` as the
plugin's ``{host}-r{rank}`` template writes them).

An unreadable input is a ``BadReport`` naming the file and what is wrong with it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

HOST_PROPERTY = "gpuconform.host"
RANK_PROPERTY = "gpuconform.rank"
SOURCE_PROPERTY = "gpuconform.source"
_RANK_FILE = re.compile(r"-r(\d+)\.xml$")
# Files up to this size are parsed in one go (C speed; a node's report is ~0.3 MB); larger
# ones (merged fleet files) incrementally, one suite in memory at a time.
WHOLE_FILE_BYTES = 8 << 20


class BadReport(Exception):
    """An input that is not a readable JUnit report, or an output that cannot be written
    (the message names the file and the reason)."""


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


def node_label(host: str, rank: str | None) -> str:
    return host if rank is None or host.endswith(f"-r{rank}") else f"{host}-r{rank}"


def check_readable(path: str) -> None:
    """Cheap checks before any parsing, so a typo fails at once, not after 999 files."""
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
    if not os.access(path, os.R_OK):
        raise BadReport(f"{path}: cannot read (permission denied)")


def check_inputs(paths: list[str], output: str | None = None) -> None:
    """Every input readable, none given twice, the output not among them."""
    if not paths:
        raise BadReport("no input files given")
    seen: dict[str, str] = {}
    for path in paths:
        check_readable(path)
        real = os.path.realpath(path)
        if real in seen:
            raise BadReport(f"{path}: given twice (also as {seen[real]})")
        seen[real] = path
    if output is not None and os.path.realpath(output) in seen:
        raise BadReport(f"{output}: the output is also one of the inputs")


def _properties(suite: ElementTree.Element) -> list[tuple[str, str]]:
    return [(prop.get("name", ""), prop.get("value", "")) for prop in suite.iterfind("properties/property")]


def _identity(path: str, suite: ElementTree.Element, properties: list[tuple[str, str]]) -> tuple[str, str | None]:
    values = dict(properties)
    host = values.get(HOST_PROPERTY) or suite.get("hostname") or Path(path).stem
    rank = values.get(RANK_PROPERTY)
    if rank is None:
        match = _RANK_FILE.search(os.path.basename(path))
        rank = match.group(1) if match else None
    return host, rank


def _checked(path: str, suite: ElementTree.Element) -> NodeSuite:
    for case in suite.iterfind("testcase"):
        if not case.get("name"):
            raise BadReport(f"{path}: a <testcase> without a name attribute")
    properties = _properties(suite)
    return NodeSuite(path, *_identity(path, suite, properties), suite, properties)


def iter_suites(path: str) -> Iterator[NodeSuite]:
    """The suites of one JUnit file, in file order, each labelled with its node.

    Each suite is complete when yielded and may be discarded after the consumer moves on;
    do not keep references to ``element`` across iterations. BadReport when the file is
    unusable (possibly after earlier suites were yielded: consumers write nothing until
    the end).
    """
    check_readable(path)
    try:
        if os.path.getsize(path) <= WHOLE_FILE_BYTES:
            yield from _whole(path)
        else:
            yield from _incremental(path)
    except ElementTree.ParseError as exc:
        raise BadReport(f"{path}: not well-formed XML ({exc}); truncated or corrupt") from None
    except (OSError, UnicodeError) as exc:
        raise BadReport(f"{path}: cannot read ({exc})") from None


def _root_checked(path: str, root: ElementTree.Element) -> None:
    if root.tag not in ("testsuites", "testsuite"):
        raise BadReport(
            f"{path}: not a JUnit report (root element is <{root.tag}>, expected <testsuites> or <testsuite>)"
        )


def _nested(path: str) -> BadReport:
    return BadReport(f"{path}: nested <testsuite> elements are not supported")


def _whole(path: str) -> Iterator[NodeSuite]:
    root = ElementTree.parse(path).getroot()
    _root_checked(path, root)
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    if not suites:
        raise BadReport(f"{path}: contains no <testsuite>; not a test report")
    for suite in suites:
        if suite.find("testsuite") is not None:
            raise _nested(path)
    for suite in suites:
        yield _checked(path, suite)


def _incremental(path: str) -> Iterator[NodeSuite]:
    depth = 0
    root: ElementTree.Element | None = None
    found = 0
    for event, element in ElementTree.iterparse(path, events=("start", "end")):
        if event == "start":
            if root is None:
                root = element
                _root_checked(path, root)
            elif element.tag == "testsuite" and (depth > 1 or root.tag == "testsuite"):
                raise _nested(path)
            depth += 1
            continue
        depth -= 1
        if element.tag != "testsuite" or depth > 1:
            continue
        found += 1
        yield _checked(path, element)
        if element is not root:
            element.clear()
            assert root is not None
            root.remove(element)
    if not found:
        raise BadReport(f"{path}: contains no <testsuite>; not a test report")
