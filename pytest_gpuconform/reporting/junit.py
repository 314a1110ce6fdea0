"""The JUnit toolkit every writer and reader of reports in the plugin shares.

* ``case_outcome``: what one ``<testcase>`` says happened, read the same way by the merge,
  the cluster fold, the page and the baselines.
* ``errors_as_failures`` / ``make_schema_safe``: the JUnit schema CI tools validate against
  (Maven Surefire's junit-10) has no ``<error>`` element, so an error is written as
  ``<failure type="error">``: every reporter shows it as a failure and the message still
  says "failed on setup with ...".
* ``write_atomically``: a reader (a CI upload step, a second merge) never sees half a file,
  and the file gets the permissions the umask gives any new file (0644 under umask 022),
  not mkstemp's 0600: reports are for reading.
* ``add_suite_properties``: the node inventory as ``<testsuite>`` properties, written by
  the process that owns the XML (the xdist controller too).
"""

from __future__ import annotations

import os
import tempfile
from xml.etree import ElementTree

import pytest

from .. import compat

ERROR_TYPE = "error"
SUITE_PROPERTY_PREFIX = "gpuconform."
OUTCOMES = ("passed", "failed", "error", "skipped")


def case_outcome(case: ElementTree.Element) -> tuple[str, ElementTree.Element | None]:
    """("passed" | "failed" | "error" | "skipped", the element that says so, or None).

    An error (``<error>``, or ``<failure type="error">`` once made schema-safe) wins over a
    failure, a failure over a skip: pytest writes a second result element for a teardown
    error after a failed call.
    """
    found: dict[str, ElementTree.Element] = {}
    for child in case:
        if child.tag == "error" or (child.tag == "failure" and child.get("type") == ERROR_TYPE):
            found.setdefault("error", child)
        elif child.tag in ("failure", "skipped"):
            found.setdefault("failed" if child.tag == "failure" else "skipped", child)
    for outcome in ("error", "failed", "skipped"):
        if outcome in found:
            return outcome, found[outcome]
    return "passed", None


def errors_as_failures(case: ElementTree.Element) -> int:
    """Turn the case's ``<error>`` into ``<failure type="error">`` in place; how many there were."""
    errors = 0
    for child in case:
        if child.tag == "error":
            child.tag = "failure"
            child.set("type", ERROR_TYPE)
            errors += 1
    return errors


def make_schema_safe(path: str) -> int:
    """Rewrite pytest's own JUnit file in place so that it validates against the schema:
    each ``<error>`` becomes ``<failure type="error">`` and the suite counts follow. Meant for
    a trylast ``pytest_sessionfinish`` (the file exists then). Returns how many were rewritten."""
    root = ElementTree.parse(path).getroot()
    rewritten = 0
    for suite in [root] if root.tag == "testsuite" else root.findall("testsuite"):
        errors = sum(errors_as_failures(case) for case in suite.findall("testcase"))
        if errors:
            failures = sum(case_outcome(case)[0] in ("failed", "error") for case in suite.findall("testcase"))
            suite.set("failures", str(failures))
            suite.set("errors", "0")
            rewritten += errors
    if rewritten:
        write_atomically(root, path)
    return rewritten


def write_atomically(content: ElementTree.Element | bytes | str, path: str) -> None:
    """Write an XML element, bytes or text to a temporary file beside ``path`` and rename
    it into place, with the permissions of a freshly created file under the umask."""
    if isinstance(content, ElementTree.Element):
        data = ElementTree.tostring(content, encoding="utf-8", xml_declaration=True)
    elif isinstance(content, str):
        data = content.encode("utf-8")
    else:
        data = content
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def current_umask() -> int:
    """The process umask (reading it means setting it: put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def add_suite_properties(config: pytest.Config, properties: list[tuple[str, str]]) -> None:
    """``record_testsuite_property`` does nothing under xdist (the fixture runs in workers;
    only the controller writes the XML, pytest#7767), so the properties go to pytest's own
    LogXML object, in whichever process writes it."""
    xml = compat.junit_xml(config)
    if xml is None:
        return
    for name, value in properties:
        xml.add_global_property(f"{SUITE_PROPERTY_PREFIX}{name}", value)
