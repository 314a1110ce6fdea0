"""Other plugins that change how tests run give every multi-rank test its own right outcome.

The file holds a hang, a failure on rank 1 and passing tests. With the first engine,
pytest-timeout's signal method failed the hang but kept its ranks, so the next test was
reported with the hang's leftovers (a false pass); with --reruns both a failing and a
hanging test ended PASSED. Here every test's JUnit case must say what that test did,
under pytest-timeout (signal and thread methods), pytest-rerunfailures, pytest-randomly,
and pytest-cov (lines run in the ranks are covered).
"""

from __future__ import annotations

import re

import pytest

from support.runs import run_pytest, write_files

MIXED = """
import time
import pytest
import torch
import torch.distributed as dist

@pytest.mark.world_size(2)
def test_a_passes(rank):
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2

@pytest.mark.world_size(2)
def test_b_hangs(rank):
    if rank == 0:
        time.sleep(3600)
    dist.barrier()

@pytest.mark.world_size(2)
def test_c_fails_on_rank_1(rank):
    assert rank != 1, f"rank {rank} is wrong"

@pytest.mark.world_size(2)
def test_d_passes(rank):
    t = torch.full((1,), float(rank))
    dist.all_reduce(t)
    assert t.item() == 1

def test_e_in_the_controller():
    pass
"""

PLUGINS = {
    "timeout-signal": ["--timeout", "3"],
    "timeout-thread": ["--timeout", "3", "--timeout-method", "thread"],
    "rerunfailures": ["--timeout", "3", "--reruns", "1"],
    "randomly": ["-p", "randomly", "--timeout", "3"],
}


@pytest.mark.parametrize("plugin", sorted(PLUGINS))
def test_each_test_gets_its_own_outcome(pytester, plugin):
    write_files(pytester.path, {"test_mixed.py": MIXED})
    run = run_pytest(pytester.path, "-k", "cpu or controller", "-rA", *PLUGINS[plugin], timeout=300)
    assert run.done.returncode == 1, run.output[-3000:]
    for name in ("test_a_passes[ws2-cpu]", "test_d_passes[ws2-cpu]", "test_e_in_the_controller"):
        assert run.outcome(name)[0] == "passed", (name, run.output[-3000:])
    kind, message, text = run.outcome("test_b_hangs[ws2-cpu]")
    assert kind == "failure"
    if plugin == "timeout-thread":
        assert re.fullmatch(
            r"rank [01] exited with code 1 \(pytest-timeout ended it at its timeout, thread method\)", message
        )
    else:
        assert message == "rank 0 failed: Failed: Timeout (>3.0s) from pytest-timeout.", message
        assert "rank 1: blocked in collective (barrier) during call" in text
    kind, message, _ = run.outcome("test_c_fails_on_rank_1[ws2-cpu]")
    assert (kind, message) == ("failure", "rank 1 failed: AssertionError: rank 1 is wrong")
    if plugin == "rerunfailures":
        assert re.search(r"2 failed, 3 passed, \d+ deselected, 2 rerun", run.output), run.output[-2000:]
    if plugin == "randomly":
        order = [n for n in re.findall(r"^PASSED test_mixed.py::(\w+)", run.done.stdout, re.M)]
        assert len(order) == 3 and "Using --randomly-seed=" in run.done.stdout


HELPER = """
def only_in_ranks(rank):
    doubled = rank * 2
    return doubled + 1
"""

COVERED = """
import pytest
from helper_module import only_in_ranks

@pytest.mark.world_size(2)
def test_body(rank):
    assert only_in_ranks(rank) == 2 * rank + 1
"""


def test_lines_run_in_ranks_are_covered(pytester):
    """coverage's own subprocess support ([run] patch = subprocess) measures the ranks; the
    ranks leave before pytest-cov combines the data."""
    write_files(
        pytester.path,
        {"helper_module.py": HELPER, "test_covered.py": COVERED, ".coveragerc": "[run]\npatch = subprocess\n"},
    )
    run = run_pytest(pytester.path, "-k", "cpu", "--cov=helper_module", "--cov-report=term-missing")
    assert run.outcome("test_body[ws2-cpu]")[0] == "passed", run.output[-3000:]
    assert re.search(r"helper_module\.py\s+3\s+0\s+100%", run.done.stdout), run.done.stdout[-2000:]
