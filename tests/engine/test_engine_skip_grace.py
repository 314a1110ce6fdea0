"""A skip or xfail on one rank does not cut its slower peers short: every rank may take its
own time to reach the same skip or xfail. A peer that waits in a collective for a rank that
skipped is cut at the test's deadline, with a message saying so."""

import xml.etree.ElementTree as ET

SLOW_PEERS = """
import time
import pytest

@pytest.mark.world_size(2)
@pytest.mark.xfail(reason="known broken here", strict=True)
def test_xfail_slow_peer(rank):
    if rank == 1:
        time.sleep(5)  # local work before reaching the same failure
    assert False, f"rank {rank} hit the known bug"

@pytest.mark.world_size(2)
def test_skip_slow_peer(rank):
    if rank == 1:
        time.sleep(5)
    pytest.skip("feature absent on this node")

@pytest.mark.world_size(2)
def test_after(rank):
    pass
"""

PEER_WAITS_FOR_SKIPPER = """
import pytest
import torch.distributed as dist

@pytest.mark.world_size(2, timeout=8)
def test_peer_waits(rank):
    if rank == 1:
        pytest.skip("rank 1 lacks the feature")
    dist.barrier()
"""


def _cases(pytester):
    return {c.get("name"): c for c in ET.parse(pytester.path / "out.xml").getroot().iter("testcase")}


def test_slow_peer_of_a_skip_or_xfail_is_waited_for(run_gpuconform, pytester):
    pytester.makepyfile(test_slow=SLOW_PEERS)
    result = run_gpuconform("-k", "cpu", "--junitxml=out.xml", "-rxs")
    result.assert_outcomes(passed=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(["*XFAIL*test_xfail_slow_peer*known broken here*", "*SKIPPED*feature absent*"])


def test_peer_blocked_after_a_skip_is_cut_at_the_deadline(run_gpuconform, pytester):
    pytester.makepyfile(test_wait=PEER_WAITS_FOR_SKIPPER)
    result = run_gpuconform("-k", "cpu", "--junitxml=out.xml")
    result.assert_outcomes(failed=1)
    case = _cases(pytester)["test_peer_waits[ws2-cpu]"]
    failure = case.find("failure")
    assert failure is not None, ET.tostring(case)[:600]
    message = failure.get("message") or ""
    assert message.startswith("ranks disagree about skipping (waited to the deadline, 8 s, for ranks 0): "), message
    assert "rank 0: blocked in collective (barrier) during call" in message
    assert "rank 1: skipped: rank 1 lacks the feature" in message
    assert "--- rank 0 stack ---" in (failure.text or "")
    assert 8 <= float(case.get("time")) < 30
