"""Rank processes are reused across tests, reset between them, and replaced after a failure."""

import xml.etree.ElementTree as ET

REUSE = """
import os
import pytest
import torch
import torch.distributed as dist


def _note(record, rank):
    t = torch.tensor([os.getpid()], dtype=torch.int64)
    gathered = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    record("pids", ",".join(str(int(g)) for g in gathered))


@pytest.mark.world_size(2)
def test_1_leaves_state_behind(rank, record):
    _note(record, rank)
    record("first_draw", float(torch.rand(1)))
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(1234)
    torch.set_grad_enabled(False)


@pytest.mark.world_size(2)
def test_2_sees_clean_state(rank, record):
    _note(record, rank)
    assert torch.get_default_dtype() == torch.float32, torch.get_default_dtype()
    assert torch.is_grad_enabled()
    assert not torch.is_autocast_enabled("cpu")
    draws = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(draws, torch.rand(1))
    assert torch.equal(draws[0], draws[1]), "ranks start each test from the same seed"


@pytest.mark.world_size(2)
def test_3_fails(rank, record):
    _note(record, rank)
    assert rank == 0


@pytest.mark.world_size(2)
def test_4_after_failure(rank, record):
    _note(record, rank)
"""


def _pids(pytester, name):
    root = ET.parse(pytester.path / "out.xml").getroot()
    case = next(c for c in root.iter("testcase") if c.get("name") == f"{name}[ws2-cpu]")
    return {p.get("name"): p.get("value") for p in case.iter("property")}["pids"]


def test_ranks_are_reused_and_reset_then_replaced_after_failure(run_gpuconform, pytester):
    pytester.makepyfile(test_reuse=REUSE)
    result = run_gpuconform("-k", "cpu", "--junitxml=out.xml")
    result.assert_outcomes(passed=3, failed=1)
    first, second, third, fourth = (
        _pids(pytester, f"test_{n}")
        for n in ("1_leaves_state_behind", "2_sees_clean_state", "3_fails", "4_after_failure")
    )
    assert first == second == third, "ranks were not reused"
    assert set(fourth.split(",")).isdisjoint(third.split(",")), "failed ranks were reused"


def test_fresh_ranks_option_starts_new_processes_per_test(run_gpuconform, pytester):
    pytester.makepyfile(test_reuse=REUSE)
    result = run_gpuconform("-k", "cpu and (test_1 or test_2)", "--junitxml=out.xml", "--gpuconform-fresh-ranks")
    result.assert_outcomes(passed=2)
    first, second = _pids(pytester, "test_1_leaves_state_behind"), _pids(pytester, "test_2_sees_clean_state")
    assert set(first.split(",")).isdisjoint(second.split(","))


def test_fresh_marker_keyword(run_gpuconform, pytester):
    pytester.makepyfile(
        test_reuse=REUSE.replace(
            "@pytest.mark.world_size(2)\ndef test_1", "@pytest.mark.world_size(2, fresh=True)\ndef test_1"
        )
    )
    result = run_gpuconform("-k", "cpu and (test_1 or test_2)", "--junitxml=out.xml")
    result.assert_outcomes(passed=2)
    first, second = _pids(pytester, "test_1_leaves_state_behind"), _pids(pytester, "test_2_sees_clean_state")
    assert set(first.split(",")).isdisjoint(second.split(","))


def test_suite_properties_survive_xdist(pytester):
    pytester.makepyfile(test_x="def test_x():\n    pass\n\ndef test_y():\n    pass\n")
    result = pytester.runpytest_subprocess(
        "--gpuconform", "-p", "no:cacheprovider", ".", "-n", "2", "--junitxml=out.xml"
    )
    result.assert_outcomes(passed=2)
    names = {p.get("name") for p in ET.parse(pytester.path / "out.xml").getroot().iter("property")}
    assert {"gpuconform.host", "gpuconform.torch", "gpuconform.gpu_count"} <= names


def test_one_line_junit_message_also_under_xdist(pytester):
    pytester.makepyfile(
        test_f="""
        import pytest

        @pytest.mark.world_size(2)
        def test_fails(rank):
            assert rank == 0, f"rank {rank} disagrees"
    """
    )
    result = pytester.runpytest_subprocess(
        "--gpuconform", "-p", "no:cacheprovider", ".", "-n", "2", "-k", "cpu", "--junitxml=out.xml"
    )
    result.assert_outcomes(failed=1, skipped=0)
    failure = next(ET.parse(pytester.path / "out.xml").getroot().iter("failure"))
    assert failure.get("message").startswith("rank 1 failed: AssertionError: rank 1 disagrees")
    assert "ranks:" not in failure.get("message") and "ranks:" in failure.text
