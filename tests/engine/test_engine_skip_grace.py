"""A skip or xfail on one rank does not cut its slower peers short: every rank may take its
own time to reach the same skip or xfail. A peer seen waiting in a collective (the same
stack, innermost frame in torch.distributed, at two samples 3 s apart) for a rank that
skipped is cut then; one stuck anywhere else is cut at the test's deadline; each with a
message saying so."""

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

PEERS_LEFT_BEHIND = """
import time
import pytest
import torch.distributed as dist

@pytest.mark.world_size(2, timeout=60)
def test_peer_waits_in_collective(rank):
    if rank == 1:
        pytest.skip("rank 1 lacks the feature")
    dist.barrier()

@pytest.mark.world_size(2, timeout=8)
def test_peer_hangs_outside_collectives(rank):
    if rank == 1:
        pytest.skip("rank 1 lacks the feature")
    time.sleep(3600)
"""


def _cases(pytester):
    return {c.get("name"): c for c in ET.parse(pytester.path / "out.xml").getroot().iter("testcase")}


def test_slow_peer_of_a_skip_or_xfail_is_waited_for(run_gpuconform, pytester):
    pytester.makepyfile(test_slow=SLOW_PEERS)
    result = run_gpuconform("-k", "cpu", "--junitxml=out.xml", "-rxs")
    result.assert_outcomes(passed=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(["*XFAIL*test_xfail_slow_peer*known broken here*", "*SKIPPED*feature absent*"])


def test_peer_left_behind_by_a_skip_is_cut_with_a_clear_message(run_gpuconform, pytester):
    """Blocked in a collective (seen in two stack samples a grace apart): cut within seconds.
    Stuck anywhere else: cut at the deadline. Either way with every rank's status and stack."""
    pytester.makepyfile(test_wait=PEERS_LEFT_BEHIND)
    result = run_gpuconform("-k", "cpu", "--junitxml=out.xml")
    result.assert_outcomes(failed=2)
    cases = _cases(pytester)
    expected = {
        "test_peer_waits_in_collective[ws2-cpu]": (
            "ranks disagree about skipping (ranks 0 cut: blocked in a collective after a peer's skip): "
            "rank 0: blocked in collective (barrier) during call; rank 1: skipped: rank 1 lacks the feature",
            (0, 20),
        ),
        "test_peer_hangs_outside_collectives[ws2-cpu]": (
            "ranks disagree about skipping (waited to the deadline, 8 s, for ranks 0): "
            "rank 0: still running during call; rank 1: skipped: rank 1 lacks the feature",
            (8, 30),
        ),
    }
    for name, (message, (least, most)) in expected.items():
        failure = cases[name].find("failure")
        assert failure is not None, ET.tostring(cases[name])[:600]
        assert failure.get("message") == message
        assert "--- rank 0 stack ---" in (failure.text or "")
        assert least <= float(cases[name].get("time")) < most, cases[name].get("time")


WAITING = """Thread 0x00007f0000000002 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 324 in wait
  File "/site/torch/distributed/elastic/timer.py", line 80 in _watch

Current thread 0x00007f0000000001 (most recent call first):
  File "/site/torch/distributed/distributed_c10d.py", line 2806 in all_reduce
  File "/tmp/test_x.py", line 9 in test_waits
"""

WORKING = """Current thread 0x00007f0000000001 (most recent call first):
  File "/site/torch/_tensor.py", line 1512 in __torch_function__
  File "/site/torch/distributed/tensor/_dispatch.py", line 160 in dispatch
  File "/tmp/test_x.py", line 9 in test_works
"""


SLEEPING_BESIDE_A_DIST_THREAD = """Thread 0x00007f0000000002 (most recent call first):
  File "/site/torch/distributed/elastic/agent.py", line 50 in _poll

Current thread 0x00007f0000000001 (most recent call first):
  File "/tmp/test_x.py", line 9 in test_sleeps
"""


def test_waiting_in_collective_reads_the_main_threads_innermost_frame():
    from pytest_gpuconform.engine.attempt import waiting_in_collective

    assert waiting_in_collective(WAITING)
    assert not waiting_in_collective(WORKING)  # torch.distributed below, local work on top
    assert not waiting_in_collective(SLEEPING_BESIDE_A_DIST_THREAD)  # only the main thread counts
    assert not waiting_in_collective("(no stack: the rank did not answer SIGUSR1)")
