"""A phase the ranks did not report is a failure of that phase, not a second setup error."""

import xml.etree.ElementTree as ET

# A rank-side plugin that runs setup and teardown but never the call (and so never reports it).
CONFTEST = """
import os
import pytest
from _pytest.runner import call_and_report

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if "RANK" not in os.environ:
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    call_and_report(item, "setup", log=True)
    call_and_report(item, "teardown", log=True, nextitem=nextitem)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
"""

TEST = """
import pytest

@pytest.mark.world_size(2)
def test_no_call(rank):
    pass
"""


def test_missing_call_report_is_a_call_failure(run_gpuconform, pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_missing=TEST)
    result = run_gpuconform("-k", "cpu", "--junitxml=out.xml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*FAILED test_missing.py::test_no_call[[]ws2-cpu[]] - the ranks sent no call report*"])
    case = next(ET.parse(pytester.path / "out.xml").getroot().iter("testcase"))
    assert case.find("error") is None, ET.tostring(case)[:600]
    assert case.find("failure").get("message") == "the ranks sent no call report"
