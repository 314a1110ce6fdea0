"""The collective checks catch corrupted collectives: one fault per kind of silent failure.

Each fault mimics a reported class of bug (nccl#2001: a few wrong elements at 1 MiB; an
async work whose ``wait()`` returns before the data landed; a reduction run with the wrong
operator or through a narrower type; wrong block order, a lost tail, a list form that
scatters the wrong block, a receiver that missed the broadcast) inside the ranks, and the
check must fail naming the rank, the call, the element and how wrong it is. One subprocess
runs them all.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

RE_EXPORT = "from pytest_gpuconform.conformance.test_collectives import {name}\n"

# A work object for faults that finish the real call themselves (gloo work must not be
# waited on twice).
DONE = """
class _Done:
    def wait(self, *args):
        return True
"""

FAULTS = {
    # One element wrong after a blocking all_reduce on rank 1, at 2**18 elements (nccl#2001).
    "test_fault_allreduce_element": """
import torch.distributed as dist
_real = dist.all_reduce
def _corrupting(tensor, *args, **kwargs):
    work = _real(tensor, *args, **kwargs)
    if dist.get_rank() == 1 and tensor.numel() == 262144 and not kwargs.get("async_op"):
        tensor.view(-1)[12345] += 1
    return work
dist.all_reduce = _corrupting
"""
    + RE_EXPORT.format(name="test_all_reduce"),
    # async_op=True on rank 0: wait() returns, but the result never reached the caller's tensor.
    "test_fault_allreduce_async_early": DONE
    + """
import torch.distributed as dist
_real = dist.all_reduce
def _early(tensor, *args, **kwargs):
    if kwargs.get("async_op") and dist.get_rank() == 0 and tensor.numel() == 1031:
        _real(tensor.clone(), *args, **{**kwargs, "async_op": False})
        return _Done()
    return _real(tensor, *args, **kwargs)
dist.all_reduce = _early
"""
    + RE_EXPORT.format(name="test_all_reduce"),
    # BXOR runs as BOR on every rank: a wrong operator table.
    "test_fault_allreduce_wrong_op": """
import torch.distributed as dist
_real = dist.all_reduce
def _wrong_op(tensor, op=dist.ReduceOp.SUM, *args, **kwargs):
    if op == dist.ReduceOp.BXOR:
        op = dist.ReduceOp.BOR
    return _real(tensor, op, *args, **kwargs)
dist.all_reduce = _wrong_op
"""
    + RE_EXPORT.format(name="test_all_reduce"),
    # int64 reduced through float64: exact below 2**53, wrong in the low bits above it.
    "test_fault_allreduce_int64_as_double": """
import torch
import torch.distributed as dist
_real = dist.all_reduce
def _through_double(tensor, *args, **kwargs):
    if tensor.dtype == torch.int64:
        wide = tensor.double()
        _real(wide, *args, **{**kwargs, "async_op": False})
        tensor.copy_(wide.to(torch.int64))
        return _Done() if kwargs.get("async_op") else None
    return _real(tensor, *args, **kwargs)
dist.all_reduce = _through_double
"""
    + DONE
    + RE_EXPORT.format(name="test_all_reduce"),
    # all_gather into one tensor delivers the ranks' blocks in the wrong order on rank 0.
    "test_fault_allgather_order": """
import torch
import torch.distributed as dist
_real = dist.all_gather_single
def _swapped(output, input, *args, **kwargs):
    work = _real(output, input, *args, **kwargs)
    if dist.get_rank() == 0 and input.numel() == 262144 and not kwargs.get("async_op"):
        n = input.numel()
        output.copy_(torch.cat([output[n:], output[:n]]))
    return work
dist.all_gather_single = _swapped
"""
    + RE_EXPORT.format(name="test_all_gather"),
    # The list form of all_gather fills rank 1's slots in reverse order.
    "test_fault_allgather_list_reversed": """
import torch.distributed as dist
_real = dist.all_gather
def _reversed(tensor_list, tensor, *args, **kwargs):
    work = _real(tensor_list, tensor, *args, **kwargs)
    if dist.get_rank() == 1 and tensor.numel() == 1031 and not kwargs.get("async_op"):
        copies = [t.clone() for t in tensor_list]
        for slot, source in zip(tensor_list, reversed(copies)):
            slot.copy_(source)
    return work
dist.all_gather = _reversed
"""
    + RE_EXPORT.format(name="test_all_gather"),
    # reduce_scatter from one tensor loses the tail element of an odd-sized block on rank 1.
    "test_fault_reducescatter_tail": """
import torch.distributed as dist
_real = dist.reduce_scatter_single
def _bad_tail(output, input, *args, **kwargs):
    work = _real(output, input, *args, **kwargs)
    if dist.get_rank() == 1 and output.numel() == 1031 and not kwargs.get("async_op"):
        output[-1] += 1
    return work
dist.reduce_scatter_single = _bad_tail
"""
    + RE_EXPORT.format(name="test_reduce_scatter"),
    # The list form of reduce_scatter hands every rank the other rank's block.
    "test_fault_reducescatter_list_block": """
import torch.distributed as dist
_real = dist.reduce_scatter
def _other_block(output, input_list, *args, **kwargs):
    return _real(output, list(reversed(input_list)), *args, **kwargs)
dist.reduce_scatter = _other_block
"""
    + RE_EXPORT.format(name="test_reduce_scatter"),
    # Rank 1 takes part in the 2**18-element broadcasts from root 0, but its buffer is never written.
    "test_fault_broadcast_lost": """
import torch.distributed as dist
_real = dist.broadcast
def _lost(tensor, src=None, *args, **kwargs):
    if dist.get_rank() == 1 and src == 0 and tensor.numel() == 262144:
        return _real(tensor.clone(), src, *args, **kwargs)
    return _real(tensor, src, *args, **kwargs)
dist.broadcast = _lost
"""
    + RE_EXPORT.format(name="test_broadcast"),
    # A gloo build that refuses floating AVG (torch 2.6+ has it): a broken stack, not a skip.
    "test_fault_allreduce_avg_refused": """
import torch.distributed as dist
_real = dist.all_reduce
def _refuses_avg(tensor, op=dist.ReduceOp.SUM, *args, **kwargs):
    if op == dist.ReduceOp.AVG:
        raise RuntimeError("Cannot use ReduceOp.AVG with Gloo")
    return _real(tensor, op, *args, **kwargs)
dist.all_reduce = _refuses_avg
"""
    + RE_EXPORT.format(name="test_all_reduce"),
    "test_clean_collectives": RE_EXPORT.format(name="test_all_reduce"),
}

SELECTION = [
    "test_clean_collectives.py::test_all_reduce[ws2-cpu-fp32-sum]",
    "test_fault_allreduce_element.py::test_all_reduce[ws2-cpu-fp32-sum]",
    "test_fault_allreduce_async_early.py::test_all_reduce[ws2-cpu-bf16-max]",
    "test_fault_allreduce_wrong_op.py::test_all_reduce[ws2-cpu-int32-bxor]",
    "test_fault_allreduce_int64_as_double.py::test_all_reduce[ws2-cpu-int64-sum]",
    "test_fault_allreduce_avg_refused.py::test_all_reduce[ws2-cpu-fp32-avg]",
    "test_fault_allgather_order.py::test_all_gather[ws2-cpu-fp32]",
    "test_fault_allgather_list_reversed.py::test_all_gather[ws2-cpu-uint8]",
    "test_fault_reducescatter_tail.py::test_reduce_scatter[ws2-cpu-fp16]",
    "test_fault_reducescatter_list_block.py::test_reduce_scatter[ws2-cpu-int64]",
    "test_fault_broadcast_lost.py::test_broadcast[ws2-cpu-int32]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("collective_faults"), FAULTS, SELECTION)


def test_clean_run_passes_and_records_bandwidth(cases):
    case = cases["test_clean_collectives::test_all_reduce[ws2-cpu-fp32-sum]"]
    assert case.outcome == "passed", case.text[:1500]
    assert case.properties["wrong_elements"] == "0" and case.properties["wrong_elements_bound"] == "0"
    assert "wrong_elements_worst_rank" not in case.properties
    assert float(case.properties["busbw_GBps_1MiB"]) > 0 and case.properties["size_bytes"] == "1048576"


def test_corrupted_element_after_all_reduce_is_counted(cases):
    assert_caught(
        cases,
        "test_fault_allreduce_element::test_all_reduce[ws2-cpu-fp32-sum]",
        "all_reduce(sum): 1 of 2 ranks wrong",
        "rank 1: all_reduce(sum) fp32 x262144 (1048576 B): #wrong=1 of 262144 elements, first at [12345]",
        "max |diff|=1 (bound: exact)",
    )
    recorded = cases["test_fault_allreduce_element::test_all_reduce[ws2-cpu-fp32-sum]"].properties
    assert recorded["wrong_elements"] == "1" and recorded["wrong_elements_worst_rank"] == "1"


def test_async_wait_before_the_data_landed_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_allreduce_async_early::test_all_reduce[ws2-cpu-bf16-max]",
        "rank 0: all_reduce(max) bf16 x1031 (2062 B) async_op=True: #wrong=",
        "got ",
        "expected ",
        "(bound: exact)",
    )


def test_wrong_reduction_operator_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_allreduce_wrong_op::test_all_reduce[ws2-cpu-int32-bxor]",
        "all_reduce(bxor): 2 of 2 ranks wrong",
        "rank 0: all_reduce(bxor) int32 x1 (4 B): #wrong=1 of 1",
        "first at [0]: got ",
    )


def test_int64_reduced_in_double_precision_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_allreduce_int64_as_double::test_all_reduce[ws2-cpu-int64-sum]",
        "rank 0: all_reduce(sum) int64 x",
        "#wrong=",
        "expected ",
        "(bound: exact)",
    )


def test_gloo_refusing_floating_average_fails_instead_of_skipping(cases):
    case = cases["test_fault_allreduce_avg_refused::test_all_reduce[ws2-cpu-fp32-avg]"]
    assert case.outcome == "failed", (case.outcome, case.text[:1500])
    assert "Cannot use ReduceOp.AVG with Gloo" in case.text


def test_all_gather_block_order_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_allgather_order::test_all_gather[ws2-cpu-fp32]",
        "rank 0: all_gather (tensor form) fp32 x262144 (1048576 B): #wrong=",
        "first at [0]",
        "(bound: exact)",
    )


def test_all_gather_list_form_order_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_allgather_list_reversed::test_all_gather[ws2-cpu-uint8]",
        "rank 1: all_gather (list form) uint8 x1031 (1031 B): #wrong=",
        "first at [0]",
        "(bound: exact)",
    )


def test_reduce_scatter_tail_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_reducescatter_tail::test_reduce_scatter[ws2-cpu-fp16]",
        "rank 1: reduce_scatter(sum, tensor form) fp16 x1031 (2062 B): #wrong=1 of 1031 elements, first at [1030]",
        "max |diff|=1 (bound: exact)",
    )


def test_reduce_scatter_list_form_block_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_reducescatter_list_block::test_reduce_scatter[ws2-cpu-int64]",
        "rank 0: reduce_scatter(sum, list form) int64 x1 (8 B): #wrong=1 of 1 elements, first at [0]",
        "rank 1: reduce_scatter(sum, list form) int64 x1 (8 B)",
    )


def test_lost_broadcast_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_broadcast_lost::test_broadcast[ws2-cpu-int32]",
        "rank 1: broadcast(root=0) int32 x262144 (1048576 B): #wrong=",
        "(bound: exact)",
    )
