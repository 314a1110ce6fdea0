"""The faults the multi-rank engine must survive, each with its outcome and message, in one
run: after every fault the next test still passes and the JUnit file holds every case."""

import xml.etree.ElementTree as ET

import pytest

FAULTS = """
import os, time
import pytest
import torch
import torch.distributed as dist


def _healthy(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == world_size * (world_size + 1) / 2


@pytest.mark.world_size(2)
def test_a1_rank_assertion(rank):
    value = 40 + rank
    assert value == 40, f"rank {rank} saw value {value}"

@pytest.mark.world_size(2)
def test_a2_after(rank, world_size):
    _healthy(rank, world_size)

@pytest.mark.world_size(2)
def test_b1_raise_while_peer_waits(rank):
    if rank == 1:
        raise ValueError("rank 1 gave up")
    dist.all_reduce(torch.ones(3))

@pytest.mark.world_size(2)
def test_b2_after(rank, world_size):
    _healthy(rank, world_size)

@pytest.mark.world_size(2, timeout=4)
def test_c1_hang_in_collective(rank):
    if rank == 0:
        time.sleep(3600)
    dist.barrier()

@pytest.mark.world_size(2)
def test_c2_after(rank, world_size):
    _healthy(rank, world_size)

@pytest.mark.world_size(2)
def test_d1_exit_3(rank):
    if rank == 1:
        os._exit(3)
    dist.barrier()

@pytest.mark.world_size(2)
def test_d2_after(rank, world_size):
    _healthy(rank, world_size)

@pytest.mark.world_size(2)
def test_e1_segfault(rank):
    if rank == 0:
        import ctypes
        ctypes.string_at(0)
    dist.barrier()

@pytest.mark.world_size(2)
def test_e2_after(rank, world_size):
    _healthy(rank, world_size)

@pytest.mark.world_size(2)
def test_f1_skip_in_one_rank(rank):
    if rank == 1:
        pytest.skip("rank 1 has no such feature")

@pytest.mark.world_size(2)
def test_f2_skip_in_all_ranks(rank):
    pytest.skip("feature absent everywhere")

class Unpicklable:
    def __reduce__(self):
        raise TypeError("no pickling for you")

@pytest.fixture
def lock_holder():
    return Unpicklable()

@pytest.mark.world_size(2)
def test_g1_unpicklable_fixture(rank, lock_holder):
    assert isinstance(lock_holder, Unpicklable)

@pytest.fixture
def per_rank_data(rank):
    return rank * 10

@pytest.mark.world_size(2)
def test_g2_fixture_needing_rank(per_rank_data, rank):
    assert per_rank_data == rank * 10

@pytest.mark.world_size(2)
def test_g3_after(rank, world_size, tmp_path):
    assert tmp_path.exists()
    _healthy(rank, world_size)
"""


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    """One subprocess run of all faults (each costs a rank restart, so run them once)."""
    pytester_dir = tmp_path_factory.mktemp("faults")
    (pytester_dir / "test_faults.py").write_text(FAULTS)
    import subprocess
    import sys
    import time

    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--gpuconform",
            "-p",
            "no:cacheprovider",
            "test_faults.py",
            "-k",
            "cpu",
            "--junitxml=faults.xml",
            "-rA",
        ],
        cwd=pytester_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - started
    cases = {c.get("name"): c for c in ET.parse(pytester_dir / "faults.xml").getroot().iter("testcase")}
    return done, cases, elapsed


def _failure(cases, name):
    case = cases[f"{name}[ws2-cpu]"]
    failure = case.find("failure")
    assert failure is not None, f"{name}: expected a failure, got {ET.tostring(case)[:300]!r}"
    return failure.get("message"), failure.text or ""


def test_every_case_is_in_the_junit_file_and_the_run_continued(fault_run):
    done, cases, _ = fault_run
    assert done.returncode == 1, done.stdout[-3000:]
    assert len(cases) == 15, sorted(cases)
    for name in ("test_a2_after", "test_b2_after", "test_c2_after", "test_d2_after", "test_e2_after", "test_g3_after"):
        case = cases[f"{name}[ws2-cpu]"]
        assert len(case) == 0 or case[0].tag == "properties", f"{name} did not pass after a fault"


def test_rank_assertion_is_the_failure_message(fault_run):
    _, cases, _ = fault_run
    message, text = _failure(cases, "test_a1_rank_assertion")
    assert message == "rank 1 failed: AssertionError: rank 1 saw value 41"
    assert 'assert value == 40, f"rank {rank} saw value {value}"' in text
    assert "rank 0: passed" in text and "rank 1: failed: AssertionError" in text


def test_raise_while_peer_waits_fails_fast(fault_run):
    _, cases, _ = fault_run
    message, text = _failure(cases, "test_b1_raise_while_peer_waits")
    assert message == "rank 1 failed: ValueError: rank 1 gave up"
    assert "rank 0: blocked in collective (all_reduce)" in text
    assert float(cases["test_b1_raise_while_peer_waits[ws2-cpu]"].get("time")) < 15


def test_hang_fails_at_deadline_with_every_stack(fault_run):
    _, cases, _ = fault_run
    message, text = _failure(cases, "test_c1_hang_in_collective")
    assert message.startswith("timed out after 4 s")
    assert "--- rank 0 stack ---" in text and "in test_c1_hang_in_collective" in text
    assert "--- rank 1 stack ---" in text and "in barrier" in text
    assert "rank 1: blocked in collective (barrier)" in text


def test_exit_code_names_the_rank(fault_run):
    _, cases, _ = fault_run
    message, _ = _failure(cases, "test_d1_exit_3")
    assert message == "rank 1 exited with code 3"
    assert float(cases["test_d1_exit_3[ws2-cpu]"].get("time")) < 15


def test_segfault_names_rank_and_signal(fault_run):
    _, cases, _ = fault_run
    message, text = _failure(cases, "test_e1_segfault")
    assert message == "rank 0 killed by SIGSEGV (signal 11)"
    assert "Segmentation fault" in text and "in test_e1_segfault" in text


def test_skips_count_only_when_all_ranks_agree(fault_run):
    _, cases, _ = fault_run
    message, _ = _failure(cases, "test_f1_skip_in_one_rank")
    assert message.startswith("ranks disagree about skipping: rank 0: passed")
    skipped = cases["test_f2_skip_in_all_ranks[ws2-cpu]"].find("skipped")
    assert skipped is not None and skipped.get("message") == "feature absent everywhere"


def test_fixtures_are_resolved_in_each_rank(fault_run):
    """An unpicklable fixture value and a fixture built from ``rank`` just work: every rank
    resolves its own fixtures, nothing is pickled over."""
    _, cases, _ = fault_run
    for name in ("test_g1_unpicklable_fixture", "test_g2_fixture_needing_rank"):
        case = cases[f"{name}[ws2-cpu]"]
        assert case.find("failure") is None and case.find("error") is None, ET.tostring(case)[:500]


def test_gpu_world_size_beyond_node_is_skipped_with_reason(run_gpuconform, pytester, fake_nvml):
    from support import h100

    fake_nvml({"gpus": [h100(0), h100(1)]})
    pytester.makepyfile(
        test_big="""
        import pytest

        @pytest.mark.world_size(3)
        def test_three(rank):
            pass
    """
    )
    result = run_gpuconform("-rs", "-k", "cuda")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs 3 GPU(s), node has 2 visible GPU(s)*"])
