"""The rooted and all-to-all checks catch collectives that are right for rank 0 only, or
put blocks in the wrong place.

Faults planted in the ranks: reduce that always reduces to rank 0, gather that reverses
the root's list when the root is rank 1, gather that scribbles on a sender's input,
scatter that sends block 0 to everyone, all_to_all_single whose uneven offsets are off by
one element, and an all_to_all list whose slots are swapped. One subprocess runs them all.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

ROOTED = "from pytest_gpuconform.conformance.test_rooted_collectives import {name}\n"
ALL_TO_ALL = "from pytest_gpuconform.conformance.test_all_to_all import {name}\n"

FAULTS = {
    # dst is ignored: every reduce goes to rank 0.
    "test_fault_reduce_to_rank0": """
import torch.distributed as dist
_real = dist.reduce
def _to_zero(tensor, dst=None, *args, **kwargs):
    return _real(tensor, 0, *args, **kwargs)
dist.reduce = _to_zero
"""
    + ROOTED.format(name="test_reduce"),
    # With rank 1 as the root, its gather list comes back reversed.
    "test_fault_gather_reversed": """
import torch.distributed as dist
_real = dist.gather
def _reversed(tensor, gather_list=None, dst=None, *args, **kwargs):
    work = _real(tensor, gather_list, dst, *args, **kwargs)
    if dst == 1 and dist.get_rank() == 1 and tensor.numel() == 1031 and not kwargs.get("async_op"):
        copies = [t.clone() for t in gather_list]
        for slot, source in zip(gather_list, reversed(copies)):
            slot.copy_(source)
    return work
dist.gather = _reversed
"""
    + ROOTED.format(name="test_gather"),
    # A sender's input is used as scratch space: rank 0's one-element input is zeroed.
    "test_fault_gather_scribbles_input": """
import torch.distributed as dist
_real = dist.gather
def _scribbling(tensor, gather_list=None, dst=None, *args, **kwargs):
    work = _real(tensor, gather_list, dst, *args, **kwargs)
    if dist.get_rank() == 0 and dst == 1 and tensor.numel() == 1 and not kwargs.get("async_op"):
        tensor.zero_()
    return work
dist.gather = _scribbling
"""
    + ROOTED.format(name="test_gather"),
    # scatter from root 1 sends its first block to every rank.
    "test_fault_scatter_first_block": """
import torch.distributed as dist
_real = dist.scatter
def _first_block(tensor, scatter_list=None, src=None, *args, **kwargs):
    if src == 1 and scatter_list is not None:
        scatter_list = [scatter_list[0]] * len(scatter_list)
    return _real(tensor, scatter_list, src, *args, **kwargs)
dist.scatter = _first_block
"""
    + ROOTED.format(name="test_scatter"),
    # Uneven all_to_all_single on rank 0: the received blocks land one element off.
    "test_fault_alltoall_uneven_offsets": """
import torch.distributed as dist
_real = dist.all_to_all_single
def _shifted(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
    work = _real(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)
    if dist.get_rank() == 0 and output_split_sizes is not None and not kwargs.get("async_op") and output.numel() > 1:
        output.copy_(output.roll(1))
    return work
dist.all_to_all_single = _shifted
"""
    + ALL_TO_ALL.format(name="test_all_to_all_single"),
    # all_to_all over lists on rank 1: slots 0 and 1 swapped.
    "test_fault_alltoall_list_swapped": """
import torch.distributed as dist
_real = dist.all_to_all
def _swapped(output_list, input_list, *args, **kwargs):
    work = _real(output_list, input_list, *args, **kwargs)
    if dist.get_rank() == 1 and not kwargs.get("async_op"):
        first = output_list[0].clone()
        output_list[0].copy_(output_list[1])
        output_list[1].copy_(first)
    return work
dist.all_to_all = _swapped
"""
    + ALL_TO_ALL.format(name="test_all_to_all"),
}

SELECTION = [
    "test_fault_reduce_to_rank0.py::test_reduce[ws2-cpu-fp32]",
    "test_fault_gather_reversed.py::test_gather[ws2-cpu-bf16]",
    "test_fault_gather_scribbles_input.py::test_gather[ws2-cpu-int32]",
    "test_fault_scatter_first_block.py::test_scatter[ws2-cpu-uint8]",
    "test_fault_alltoall_uneven_offsets.py::test_all_to_all_single[ws2-cpu-fp16-uneven]",
    "test_fault_alltoall_list_swapped.py::test_all_to_all[ws2-cpu-int64-even]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("rooted_faults"), FAULTS, SELECTION)


def test_reduce_that_ignores_the_root_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_reduce_to_rank0::test_reduce[ws2-cpu-fp32]",
        "reduce(sum): 1 of 2 ranks wrong",
        "rank 1: reduce(sum, root=1) fp32 x1 (4 B): #wrong=1 of 1",
        "first at [0]: got ",
        "(bound: exact)",
    )


def test_gather_order_at_a_non_zero_root_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_gather_reversed::test_gather[ws2-cpu-bf16]",
        "rank 1: gather(root=1) bf16 x1031 (2062 B): #wrong=",
        "first at [0]",
        "(bound: exact)",
    )


def test_gather_that_scribbles_on_its_input_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_gather_scribbles_input::test_gather[ws2-cpu-int32]",
        "rank 0: gather(root=1) input after the call int32 x1 (4 B): #wrong=1 of 1 elements, first at [0]: got 0",
    )


def test_scatter_of_the_wrong_block_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_scatter_first_block::test_scatter[ws2-cpu-uint8]",
        "rank 1: scatter(root=1) uint8 x1 (1 B): #wrong=1 of 1 elements",
        "(bound: exact)",
    )


def test_uneven_all_to_all_offsets_are_caught(cases):
    assert_caught(
        cases,
        "test_fault_alltoall_uneven_offsets::test_all_to_all_single[ws2-cpu-fp16-uneven]",
        "all_to_all_single(uneven): 1 of 2 ranks wrong",
        "rank 0: all_to_all_single(uneven splits) fp16 x1 (2 B): #wrong=3 of 3 elements",
        "(bound: exact)",
    )


def test_swapped_all_to_all_slots_are_caught(cases):
    assert_caught(
        cases,
        "test_fault_alltoall_list_swapped::test_all_to_all[ws2-cpu-int64-even]",
        "rank 1: all_to_all(list form, even splits, slot 0) int64 x1 (8 B): #wrong=1 of 1 elements",
    )
