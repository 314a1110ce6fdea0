"""The rank verdict helpers every multi-rank check ends with cannot be fooled by the
collectives they use: a broadcast that delivers nothing makes unequal tensors differ, not
compare equal to themselves; an all_gather that delivers nothing is an error, not a list
of empty findings. The faults are planted in the ranks; the checks are the public helpers,
as the shipped suite's DDP, compile and comm-hook checks call them.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

CHECKS = """
import pytest
import torch
from pytest_gpuconform.checks import raise_if_any, same_on_all_ranks


@pytest.mark.world_size(2)
def test_params_equal_across_ranks(rank, world_size):
    params = torch.full((8,), float(rank))  # rank 1 differs from rank 0 at every element
    raise_if_any(same_on_all_ranks(params, "param 'w'", rank, world_size), rank, world_size, "params")


@pytest.mark.world_size(2)
def test_rank_1_finds_a_problem(rank, world_size):
    raise_if_any("wrong_elements=3" if rank == 1 else None, rank, world_size, "tally")
"""

FAULTS = {
    "test_fault_broadcast_delivers_nothing": """
import torch.distributed as dist
dist.broadcast = lambda tensor, src=0, group=None, async_op=False: None
"""
    + CHECKS,
    "test_fault_all_gather_delivers_nothing": """
import torch.distributed as dist
dist.all_gather = lambda tensor_list, tensor, group=None, async_op=False: None
"""
    + CHECKS,
    "test_clean_verdicts": CHECKS,
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rank_verdicts")
    return run_faulted(directory, FAULTS, [f"{name}.py" for name in FAULTS])


def test_a_broadcast_that_delivers_nothing_cannot_make_ranks_look_equal(cases):
    assert_caught(
        cases,
        "test_fault_broadcast_delivers_nothing::test_params_equal_across_ranks[ws2-cpu]",
        "rank 1: param 'w': #wrong=8 of 8 elements",
        "(bound: bitwise equal to rank 0)",
    )


def test_an_all_gather_that_delivers_nothing_is_an_error_not_a_pass(cases):
    assert_caught(
        cases,
        "test_fault_all_gather_delivers_nothing::test_rank_1_finds_a_problem[ws2-cpu]",
        "gather_text: all_gather did not deliver every rank's length",
    )


def test_without_faults_the_verdicts_say_what_the_ranks_found(cases):
    assert cases["test_clean_verdicts::test_params_equal_across_ranks[ws2-cpu]"].outcome == "failed"
    assert_caught(
        cases,
        "test_clean_verdicts::test_rank_1_finds_a_problem[ws2-cpu]",
        "1 of 2 ranks wrong: rank 1: wrong_elements=3",
    )
