"""Faults on one rank only, outside a test's body: a fixture that fails on one rank in its
setup or its teardown, and a test that fails on a rank other than 0 in a run without
--junitxml. The ranks must stay in step (the next test pairs its collectives correctly)
and every rank's exit code must say that the cluster failed.
"""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET

import pytest

from support.torchrun_hosts import start_loopback_agents, start_standalone

FIXTURE_FAULTS = """
import pytest, torch
import torch.distributed as dist

@pytest.fixture
def setup_fails_on_rank1(rank):
    if rank == 1:
        raise RuntimeError("fixture setup fails on rank 1 only")

@pytest.fixture
def teardown_fails_on_rank1(rank):
    yield
    if rank == 1:
        raise RuntimeError("fixture teardown fails on rank 1 only")

def _pairs_correctly(rank):
    t = torch.full((1,), 10.0 * (rank + 1))
    dist.all_reduce(t)
    assert t.item() == 30.0, f"got {t.item()}: a collective of an earlier test leaked into this one"

@pytest.mark.world_size(2)
def test_a_setup_fails_on_rank1(rank, setup_fails_on_rank1):
    # Only rank 0 runs the body, and passes: the collective it started stays half done.
    dist.all_reduce(torch.ones(1), async_op=True)

@pytest.mark.world_size(2)
def test_b_after_a_setup_error(rank):
    _pairs_correctly(rank)

@pytest.mark.world_size(2)
def test_c_teardown_fails_on_rank1(rank, teardown_fails_on_rank1):
    import os
    os.environ["LEFT_BY_C"] = "1"  # put back after the teardown, failed or not
    if rank == 0:  # half done: rank 1 never joins it
        dist.all_reduce(torch.ones(1), async_op=True)

@pytest.mark.world_size(2)
def test_d_after_a_teardown_error(rank):
    import os
    assert "LEFT_BY_C" not in os.environ
    _pairs_correctly(rank)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cases(path) -> dict[str, ET.Element]:
    return {c.get("name"): c for c in ET.parse(path).getroot().iter("testcase")}


def test_a_fixture_failing_on_one_rank_leaves_no_half_done_collective(tmp_path):
    """rank 1's fixture fails in setup (rank 0 passes, leaving a collective half done), then
    in teardown (rank 1 would skip the exchange of outcomes): every rank rebuilds its
    process groups, so the next test's all_reduce pairs correctly and passes; the fixture
    failures are errors in the merged file, naming rank 1."""
    (tmp_path / "test_fixtures.py").write_text(FIXTURE_FAULTS)
    args = ["test_fixtures.py", "-k", "cpu", "--gpuconform-timeout", "10"]
    agents = start_standalone(tmp_path, [*args, "--junitxml", "reports/junit-{host}-r{rank}.xml"], 2, _free_port())
    agents.wait(150)
    output = agents.outputs()
    assert agents[0].returncode == 1, output
    merged = _cases(next((tmp_path / "reports").glob("junit-cluster.xml")))
    for name in ("test_b_after_a_setup_error[ws2-cpu]", "test_d_after_a_teardown_error[ws2-cpu]"):
        case = merged[name]
        assert [e.tag for e in case if e.tag in ("failure", "error", "skipped")] == [], ET.tostring(
            case, encoding="unicode"
        )[:3000]
    for name, phase in (
        ("test_a_setup_fails_on_rank1[ws2-cpu]", "setup"),
        ("test_c_teardown_fails_on_rank1[ws2-cpu]", "teardown"),
    ):
        case = merged[name]
        error = case.find("error")
        assert error is not None and case.find("failure") is None, ET.tostring(case, encoding="unicode")[:3000]
        message = error.get("message") or ""
        assert message.startswith("error on host "), message
        assert f"rank 1: failed on {phase} with" in message and f"fixture {phase} fails on rank 1 only" in message


ONE_RANK_FAILS = """
import pytest

@pytest.mark.world_size(2)
def test_fails_on_rank1_only(rank):
    assert rank == 0, f"rank {rank} disagrees"

def test_per_node_fails_on_rank1_only(rank):
    assert rank == 0, f"rank {rank} disagrees"
"""


@pytest.mark.parametrize("test", ["test_fails_on_rank1_only", "test_per_node_fails_on_rank1_only"])
def test_b_every_rank_exits_non_zero_without_junitxml(tmp_path, test):
    """Two torchrun agents (a host each), no --junitxml: a test failing on rank 1 only must
    fail rank 0 too, so each agent (and a job that looks at rank 0's) exits non-zero."""
    (tmp_path / "test_one_rank.py").write_text(ONE_RANK_FAILS)
    agents = start_loopback_agents(["node0", "node1"], tmp_path, ["test_one_rank.py", "-k", test], _free_port())
    agents.wait(150)
    output = agents.outputs()
    assert [a.returncode for a in agents] == [1, 1], output
    passing = next(a for a in agents if "failed" not in a.output().splitlines()[-1:][0])
    assert "gpuconform cluster: this rank exits non-zero because tests failed on host " in passing.output(), output
    assert " rank 1 (1)" in passing.output(), output


SETUP_WAITS = """
import pytest, torch
import torch.distributed as dist

@pytest.fixture
def rank0_waits_for_rank1(rank):
    if rank == 1:
        raise RuntimeError("fixture setup fails on rank 1 only")
    dist.all_reduce(torch.ones(1))  # rank 1 never comes: blocked in C inside a fixture

@pytest.mark.world_size(2)
def test_a_fixture_waits_in_a_collective(rank, rank0_waits_for_rank1):
    pass

@pytest.mark.world_size(2)
def test_b_next(rank):
    t = torch.full((1,), 10.0 * (rank + 1))
    dist.all_reduce(t)
    assert t.item() == 30.0, f"got {t.item()}"
"""


def test_a_fixture_blocked_in_a_collective_is_cut_at_the_deadline(tmp_path):
    """Rank 0's fixture waits in all_reduce for rank 1, whose own fixture failed: the deadline
    covers setup as it covers the body, so the wait is cut at 3 s + the watchdog's grace
    (not at the group's timeout, deadline + 30 s), and the next test passes."""
    (tmp_path / "test_setup_waits.py").write_text(SETUP_WAITS)
    args = ["test_setup_waits.py", "-k", "cpu", "--gpuconform-timeout", "3"]
    agents = start_standalone(tmp_path, [*args, "--junitxml", "reports/junit-{host}-r{rank}.xml"], 2, _free_port())
    agents.wait(120)
    output = agents.outputs()
    assert agents[0].returncode == 1, output
    merged = _cases(next((tmp_path / "reports").glob("junit-cluster.xml")))
    case = merged["test_b_next[ws2-cpu]"]
    assert [e for e in case if e.tag in ("failure", "error", "skipped")] == [], ET.tostring(case, encoding="unicode")
    error = merged["test_a_fixture_waits_in_a_collective[ws2-cpu]"].find("error")
    assert error is not None
    text = (error.get("message") or "") + (error.text or "")
    assert "fixture setup fails on rank 1 only" in text and "timed out after 3 s" in text, text[:3000]
    assert float(merged["test_a_fixture_waits_in_a_collective[ws2-cpu]"].get("time")) < 20


def test_a_rank_lost_after_the_tests_fails_the_survivors_without_junitxml():
    """No JUnit files, every test passed here, and rank 1 is gone by the final exchange: its
    results are unknown, so this rank must not exit 0. (Driven without launching a world:
    a rank that vanishes after its last test leaves torchrun's surviving agent waiting at
    its exit barrier for minutes.)"""
    from types import SimpleNamespace

    from pytest_gpuconform.cluster.plugin import ClusterMode
    from pytest_gpuconform.cluster.world import ClusterWorld

    said: list[str] = []
    mode = object.__new__(ClusterMode)
    mode.world = ClusterWorld("torchrun", 0, 2, 0, "node0")
    mode.xml_template = None
    mode.merged_junit = None
    mode.failed_elsewhere = []
    reporter = SimpleNamespace(write_line=said.append)
    mode.config = SimpleNamespace(
        option=SimpleNamespace(xmlpath=None), pluginmanager=SimpleNamespace(get_plugin=lambda name: reporter)
    )
    lost = {1: "nothing listens on its liveness port any more"}
    mode.faults = SimpleNamespace(
        reports=lambda gather, own_xml: ([("node0", 0, "")], dict(lost)), lost=lost, lost_text=lambda: "rank 1 lost"
    )
    session = SimpleNamespace(exitstatus=pytest.ExitCode.OK)
    mode.pytest_sessionfinish(session)
    assert session.exitstatus == pytest.ExitCode.TESTS_FAILED
    assert said == ["gpuconform cluster: this rank exits non-zero because results are missing: rank 1"]


SIGTERMED = """
import os, time
import pytest
import torch, torch.distributed as dist

@pytest.mark.world_size(2)
def test_a_in_flight(rank):
    open(f"started{rank}", "w").write(str(os.getpid()))
    time.sleep(4)  # SIGTERM arrives here
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2.0

@pytest.mark.world_size(2)
def test_b_never_starts(rank):
    pass
"""


def test_sigterm_lets_the_test_in_flight_finish_and_every_report_be_written(tmp_path):
    """What torchrun's agent does when it loses its store, or a scheduler at a time limit:
    SIGTERM to every rank mid-test. The test in flight finishes, the session stops after
    it, and every rank's JUnit (and the merged file) is written; exit code 2."""
    import os
    import signal
    import time

    (tmp_path / "test_sigterm.py").write_text(SIGTERMED)
    args = ["test_sigterm.py", "-k", "cpu", "--junitxml", "reports/junit-{host}-r{rank}.xml"]
    agents = start_standalone(tmp_path, args, 2, _free_port())
    started = [tmp_path / "started0", tmp_path / "started1"]
    deadline = time.monotonic() + 120
    while not all(path.exists() and path.read_text() for path in started):
        assert time.monotonic() < deadline, agents.outputs()
        time.sleep(0.1)
    for path in started:
        os.kill(int(path.read_text()), signal.SIGTERM)
    agents.wait(120)
    output = agents.outputs()
    assert agents[0].returncode not in (0, None), output
    for junit in sorted((tmp_path / "reports").glob("junit-*-r*.xml")):
        cases = _cases(junit)
        assert set(cases) == {"test_a_in_flight[ws2-cpu]"}, (junit.name, set(cases), output)
        assert [e.tag for e in cases["test_a_in_flight[ws2-cpu]"]] == [] or all(
            e.tag in ("properties", "system-out", "system-err") for e in cases["test_a_in_flight[ws2-cpu]"]
        ), output
    assert len(list((tmp_path / "reports").glob("junit-*-r*.xml"))) == 2, output
    assert "interrupted by SIGTERM" in output, output
