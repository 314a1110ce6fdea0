"""The JUnit toolkit every writer and reader of reports in the plugin shares.

* ``case_outcome``: what one ``<testcase>`` says happened, read the same way by the merge,
  the cluster fold, the page, the JSON and Prometheus outputs and the baselines.
* ``AtomicOutput`` / ``write_atomically``: a reader (a CI upload step, node_exporter's
  textfile collector, a second merge) never sees half a file; the file gets the
  permissions the umask gives any new file (0644 under umask 022), not mkstemp's 0600:
  reports are for reading. An output that cannot be written is ``UnwritableOutput``,
  naming the path and the reason, raised before any work is done.
* ``finish_pytest_report``: pytest's own ``--junitxml`` file, after the run, made to say
  which node it is (``hostname`` follows ``GPUCONFORM_HOST``) and to name the shipped
  suite's tests the same from any directory (stable_ids.py).
* ``add_suite_properties``: the node inventory as ``<testsuite>`` properties, written by
  the process that owns the XML (the xdist controller too).

pytest's ``<error>`` elements are kept as pytest writes them: every consumer tested in
tests/reporting/test_consumers.py reads them, and the schema in tests/data accepts them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import IO
from xml.etree import ElementTree

import pytest

from .. import compat

SUITE_PROPERTY_PREFIX = "gpuconform."
MACHINE_PROPERTY = "gpuconform.machine_hostname"


def case_outcome(case: ElementTree.Element) -> tuple[str, ElementTree.Element | None]:
    """("passed" | "failed" | "error" | "skipped", the element that says so, or None).

    An error (``<error>``, or ``<failure type="error">`` as earlier versions wrote it) wins
    over a failure, a failure over a skip: pytest writes a second result element for a
    teardown error after a failed call.
    """
    found: dict[str, ElementTree.Element] = {}
    for child in case:
        tag = child.tag
        if tag == "error" or (tag == "failure" and child.get("type") == "error"):
            found.setdefault("error", child)
        elif tag == "failure":
            found.setdefault("failed", child)
        elif tag == "skipped":
            found.setdefault("skipped", child)
    for outcome in ("error", "failed", "skipped"):
        if outcome in found:
            return outcome, found[outcome]
    return "passed", None


class UnwritableOutput(OSError):
    """An output file that cannot be created (the message names it and says why)."""


class AtomicOutput:
    """``with AtomicOutput(path) as stream:`` write bytes; the file appears, complete, when
    the block ends without an exception, and not at all otherwise.

    The temporary file is created on entry, so an unwritable destination fails before any
    work that would produce its content."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._temporary = ""
        self.stream: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        directory = os.path.dirname(os.path.abspath(self.path))
        if os.path.isdir(self.path):
            raise UnwritableOutput(f"{self.path}: is a directory; give a file name")
        try:
            os.makedirs(directory, exist_ok=True)
            handle, self._temporary = tempfile.mkstemp(
                prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=directory
            )
        except OSError as exc:
            raise UnwritableOutput(f"{self.path}: cannot write ({exc.strerror or exc} in {directory})") from None
        self.stream = os.fdopen(handle, "wb")
        return self.stream

    def __exit__(self, kind, value, traceback) -> None:
        assert self.stream is not None
        try:
            self.stream.close()
            if kind is None:
                os.chmod(self._temporary, 0o666 & ~current_umask())
                os.replace(self._temporary, self.path)
        except OSError as exc:
            self._discard()
            raise UnwritableOutput(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        if kind is not None:
            self._discard()

    def _discard(self) -> None:
        if self._temporary and os.path.exists(self._temporary):
            os.unlink(self._temporary)


def write_atomically(content: ElementTree.Element | bytes | str, path: str) -> None:
    """Write an XML element, bytes or text to ``path`` through ``AtomicOutput``."""
    if isinstance(content, ElementTree.Element):
        data = ElementTree.tostring(content, encoding="utf-8", xml_declaration=True)
    elif isinstance(content, str):
        data = content.encode("utf-8")
    else:
        data = content
    with AtomicOutput(path) as stream:
        stream.write(data)


def current_umask() -> int:
    """The process umask (reading it means setting it: put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def finish_pytest_report(path: str, host: str, machine: str, classnames: Mapping[str, str]) -> bool:
    """Rewrite pytest's JUnit file in place, once, after the run: every ``<testsuite>`` gets
    ``hostname`` = ``host`` (the name the report uses, ``GPUCONFORM_HOST`` when set; the
    machine's own name is kept as a property when it differs) and classnames follow
    ``classnames`` (pytest's -> stable). Returns whether anything changed."""
    root = ElementTree.parse(path).getroot()
    changed = False
    for suite in [root] if root.tag == "testsuite" else root.findall("testsuite"):
        if suite.get("hostname") != host:
            suite.set("hostname", host)
            if machine != host:
                properties = suite.find("properties")
                if properties is None:
                    properties = ElementTree.Element("properties")
                    suite.insert(0, properties)
                ElementTree.SubElement(properties, "property", {"name": MACHINE_PROPERTY, "value": machine})
            changed = True
        for case in suite.iterfind("testcase"):
            stable = classnames.get(case.get("classname", ""))
            if stable is not None and stable != case.get("classname"):
                case.set("classname", stable)
                changed = True
    if changed:
        write_atomically(root, path)
    return changed


def add_suite_properties(config: pytest.Config, properties: list[tuple[str, str]]) -> None:
    """``record_testsuite_property`` does nothing under xdist (the fixture runs in workers;
    only the controller writes the XML, pytest#7767), so the properties go to pytest's own
    LogXML object, in whichever process writes it."""
    xml = compat.junit_xml(config)
    if xml is None:
        return
    for name, value in properties:
        xml.add_global_property(f"{SUITE_PROPERTY_PREFIX}{name}", value)
