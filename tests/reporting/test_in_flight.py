"""A run under pytest-xdist stopped by SIGTERM: the JUnit file names every test that ran
and reports the one cut short as an error (reporting/in_flight.py).

Before, the xdist controller wrote ``<testcase time="0.000"/>`` for the test in flight: no
name, no result (schema-invalid), counted as passed by every reader.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from support.runs import write_files
from support.tools import schema_errors

TIME_LIMITED = """
import time
from pathlib import Path

def test_a_finishes():
    pass

def test_b_finishes():
    pass

def test_c_outlives_the_time_limit():
    Path("started").write_text("1")
    time.sleep(600)
"""


@pytest.mark.parametrize("whom", ["process-group", "controller"])
def test_sigterm_under_xdist_leaves_a_valid_report_naming_the_interrupted_test(tmp_path, whom):
    """SIGTERM to every process of the run (Slurm's time limit) or to the controller only
    (a CI runner cancelling its command): exit code 2, the finished tests passed, the one
    in flight an error saying what stopped it and after how long, the file schema-valid."""
    write_files(tmp_path, {"test_time_limited.py": TIME_LIMITED})
    command = [sys.executable, "-m", "pytest", "--gpuconform", "-p", "no:cacheprovider", "-n", "2"]
    command += ["test_time_limited.py", "--junitxml=junit.xml"]
    with open(tmp_path / "output.txt", "w") as output:
        run = subprocess.Popen(command, cwd=tmp_path, stdout=output, stderr=output, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not (tmp_path / "started").exists():
                assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "output.txt").read_text()[-3000:]
                time.sleep(0.1)
            time.sleep(1.0)  # the finished tests' reports have reached the controller
            if whom == "process-group":
                os.killpg(run.pid, signal.SIGTERM)
            else:
                run.send_signal(signal.SIGTERM)
            code = run.wait(timeout=60)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    text = (tmp_path / "output.txt").read_text()
    assert code == pytest.ExitCode.INTERRUPTED, text[-3000:]
    junit = tmp_path / "junit.xml"
    assert schema_errors(junit) == "", junit.read_text()[-3000:]
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    assert all(case.get("name") for case in cases), [ET.tostring(c, encoding="unicode")[:300] for c in cases]
    by_name = {case.get("name"): case for case in cases}
    assert sorted(by_name) == ["test_a_finishes", "test_b_finishes", "test_c_outlives_the_time_limit"], text[-3000:]
    for name in ("test_a_finishes", "test_b_finishes"):
        assert [e.tag for e in by_name[name] if e.tag in ("failure", "error", "skipped")] == []
    cut = by_name["test_c_outlives_the_time_limit"]
    error = cut.find("error")
    assert error is not None and cut.find("failure") is None, ET.tostring(cut, encoding="unicode")
    message = error.get("message") or ""
    assert "interrupted by SIGTERM after " in message and " s on worker gw" in message, message
    assert "before its result arrived (its setup had passed; the test did not finish)" in message, message
    assert float(cut.get("time")) >= 1.0, "the case's time is how long it had run"
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("3", "1", "0")
    assert "2 passed, 1 error" in text, text[-2000:]


def test_only_a_test_nothing_said_the_end_of_gets_an_error():
    """Open at the end: a test whose call failure (or xdist's crash report) arrived is only
    closed; one with nothing after its setup gets the interruption as its error; a finished
    one gets nothing."""
    from types import SimpleNamespace

    from pytest_gpuconform.reporting.in_flight import InFlightTests

    def report(name: str, when: str, outcome: str = "passed", start: float = 0.0) -> pytest.TestReport:
        longrepr = "boom" if outcome == "failed" else None
        return pytest.TestReport(f"t.py::{name}", ("t.py", 0, name), {}, outcome, longrepr, when, start=start)  # type: ignore[arg-type]

    tracker = InFlightTests()
    started = time.time() - 3.0
    for sent in (
        report("failed_call", "setup", start=started),
        report("failed_call", "call", "failed"),
        report("cut", "setup", start=started),
        report("finished", "setup"),
        report("finished", "call"),
        report("finished", "teardown"),
    ):
        tracker.pytest_runtest_logreport(sent)
    tracker.reason = "interrupted by SIGTERM"
    logged: list[pytest.TestReport] = []
    hook = SimpleNamespace(pytest_runtest_logreport=lambda report: logged.append(report))
    tracker.pytest_sessionfinish(SimpleNamespace(config=SimpleNamespace(hook=hook)))  # type: ignore[arg-type]
    assert [(r.nodeid, r.when, r.outcome) for r in logged] == [
        ("t.py::failed_call", "teardown", "passed"),
        ("t.py::cut", "setup", "failed"),
        ("t.py::cut", "teardown", "passed"),
    ]
    assert str(logged[1].longrepr).startswith("interrupted by SIGTERM after 3."), logged[1].longrepr
    assert 3.0 <= logged[1].duration < 10.0
