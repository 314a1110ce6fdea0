"""Rank-side fixtures of wider scope are torn down inside the test that used them last, and
what goes wrong there (an exception, a rank that exits) fails the run at that test."""

import re
import xml.etree.ElementTree as ET

TEARDOWN_RAISES_A = """
import pytest

@pytest.fixture(scope="module")
def device_health():
    yield "ok"
    raise RuntimeError("device unhealthy at module teardown")

@pytest.mark.world_size(2)
def test_uses_health(rank, device_health):
    assert device_health == "ok"

def test_plain_in_controller():
    pass
"""

ANOTHER_FILE_B = """
import pytest

@pytest.mark.world_size(2)
def test_other(rank):
    pass
"""

TEARDOWN_EXITS = """
import os
import pytest

@pytest.fixture(scope="module")
def leaves_rank_1():
    yield
    if os.environ["RANK"] == "1":
        os._exit(3)

@pytest.mark.world_size(2)
def test_uses_it(rank, leaves_rank_1):
    pass

def test_plain_in_controller():
    pass
"""


def _cases(pytester):
    root = ET.parse(pytester.path / "out.xml").getroot()
    return {c.get("name"): c for c in root.iter("testcase")}


def _error_of(case):
    error = case.find("error")
    assert error is not None, ET.tostring(case)[:600]
    return error.get("message") or "", error.text or ""


def test_module_fixture_teardown_error_fails_the_test_that_used_it(run_gpuconform, pytester):
    pytester.makepyfile(test_a=TEARDOWN_RAISES_A, test_b=ANOTHER_FILE_B)
    result = run_gpuconform("-k", "cpu or plain", "--junitxml=out.xml")
    result.assert_outcomes(passed=3, errors=1)
    assert result.ret == 1
    message, text = _error_of(_cases(pytester)["test_uses_health[ws2-cpu]"])
    assert "device unhealthy at module teardown" in message + text
    assert re.search(r"rank [01] error in teardown", message), message  # whichever rank reported first


def test_module_fixture_teardown_error_of_the_last_file_is_not_lost(run_gpuconform, pytester):
    pytester.makepyfile(test_a=TEARDOWN_RAISES_A)
    result = run_gpuconform("-k", "cpu or plain", "--junitxml=out.xml")
    result.assert_outcomes(passed=2, errors=1)
    assert result.ret == 1
    message, text = _error_of(_cases(pytester)["test_uses_health[ws2-cpu]"])
    assert "device unhealthy at module teardown" in message + text


def test_rank_exiting_in_module_fixture_teardown_fails_the_run(run_gpuconform, pytester):
    pytester.makepyfile(test_a=TEARDOWN_EXITS, test_b=ANOTHER_FILE_B)
    result = run_gpuconform("-k", "cpu or plain", "--junitxml=out.xml")
    assert result.ret == 1, result.stdout.str()[-3000:]
    message, _ = _error_of(_cases(pytester)["test_uses_it[ws2-cpu]"])
    assert "rank 1 exited with code 3" in message, message


SESSION_TEARDOWN_RAISES = """
import pytest

@pytest.fixture(scope="session")
def session_health():
    yield
    raise RuntimeError("NCCL unhealthy at session teardown")

@pytest.mark.world_size(2)
def test_fails_and_replaces_its_ranks(rank, session_health):
    assert rank == 5

@pytest.mark.world_size(2)
def test_runs_on_new_ranks(rank):
    pass
"""


def test_session_teardown_error_of_replaced_ranks_fails_the_run(run_gpuconform, pytester):
    """A failing test's ranks are replaced and leave with the session fixture still up: its
    teardown error comes back as a failed case of its own, with the ranks' output."""
    pytester.makepyfile(test_a=SESSION_TEARDOWN_RAISES)
    result = run_gpuconform("-k", "cpu", "--junitxml=out.xml")
    result.assert_outcomes(passed=1, failed=2)
    case = _cases(pytester)["ranks_left_cleanly"]
    failure = case.find("failure")
    assert failure is not None, ET.tostring(case)[:600]
    text = failure.text or ""
    assert "rank 0 exited with code 70: its session's last fixture teardown failed" in text
    assert "rank 1 exited with code 70" in text
    assert "RuntimeError: NCCL unhealthy at session teardown" in text


def test_session_teardown_error_under_xdist_fails_the_run_from_the_controller(run_gpuconform, pytester):
    """Under -n the worker cannot report a case of its own (xdist sends only the running
    test's reports): the controller reports it, named after the worker, and no worker crashes."""
    pytester.makepyfile(test_a=SESSION_TEARDOWN_RAISES)
    result = run_gpuconform("-k", "cpu", "-n", "1", "--junitxml=out.xml")  # one worker runs both tests
    out = result.stdout.str()
    assert "INTERNALERROR" not in out and "crashed" not in out, out[-3000:]
    assert result.ret == 1, out[-3000:]
    (name,) = [n for n in _cases(pytester) if n.startswith("ranks_left_cleanly[gw")]
    failure = _cases(pytester)[name].find("failure")
    assert failure is not None
    text = failure.text or ""
    assert "exited with code 70: its session's last fixture teardown failed" in text, text[:2000]
    assert "RuntimeError: NCCL unhealthy at session teardown" in text


CRASH_WHILE_COLLECTING = """
import os
import pytest

if os.environ.get("RANK") == "1":
    os._exit(3)

@pytest.mark.world_size(2)
def test_never_ran(rank):
    pass
"""


def test_rank_dying_before_setup_does_not_pass_the_test(run_gpuconform, pytester):
    """A rank that dies importing the next file never ran its test: the previous test's
    phase marker must not make setup and call look passed."""
    pytester.makepyfile(test_a=ANOTHER_FILE_B, test_b=CRASH_WHILE_COLLECTING)
    result = run_gpuconform("-k", "cpu", "--junitxml=out.xml")
    result.assert_outcomes(passed=1, errors=1)
    case = _cases(pytester)["test_never_ran[ws2-cpu]"]
    assert case.find("error") is not None and case.find("failure") is None, ET.tostring(case)[:600]
    message, text = _error_of(case)
    assert "rank 1 exited with code 3" in message
    assert "rank 1: crashed: exited with code 3 during setup" in text
