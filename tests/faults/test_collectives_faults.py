"""The collective checks catch corrupted collectives: one fault per kind of silent failure.

Each fault mimics a reported class of bug (nccl#2001: a few wrong elements at 1 MiB;
pytorch#138811: run-to-run differences; wrong block order, a lost tail, a receiver that
missed the broadcast, a damaged point-to-point message) inside the ranks, and the check
must fail naming the rank, the tensor and how wrong it is. One subprocess runs them all.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

RE_EXPORT = "from pytest_gpuconform.conformance.test_collectives import {name}\n"

FAULTS = {
    # One element wrong after all_reduce on rank 1, at sizes >= 1 MiB only (nccl#2001).
    "test_fault_allreduce_element": """
import torch.distributed as dist
_real = dist.all_reduce
def _corrupting(tensor, *args, **kwargs):
    work = _real(tensor, *args, **kwargs)
    if dist.get_rank() == 1 and tensor.numel() >= 262144:
        tensor.view(-1)[12345] += 1
    return work
dist.all_reduce = _corrupting
"""
    + RE_EXPORT.format(name="test_all_reduce"),
    # The second identical all_reduce on rank 0 differs from the first (pytorch#138811).
    "test_fault_allreduce_rerun": """
import collections
import torch.distributed as dist
_real = dist.all_reduce
_calls = collections.Counter()
def _flaky(tensor, *args, **kwargs):
    work = _real(tensor, *args, **kwargs)
    if dist.get_rank() == 0 and tensor.numel() == 1031:
        _calls[tensor.numel()] += 1
        if _calls[tensor.numel()] == 2:
            tensor.view(-1)[7] += 2
    return work
dist.all_reduce = _flaky
"""
    + RE_EXPORT.format(name="test_all_reduce"),
    # all_gather delivers the ranks' blocks in the wrong order on rank 0.
    "test_fault_allgather_order": """
import torch
import torch.distributed as dist
_real = dist.all_gather_single
def _swapped(output, input, *args, **kwargs):
    work = _real(output, input, *args, **kwargs)
    if dist.get_rank() == 0 and input.numel() >= 262144:
        n = input.numel()
        output.copy_(torch.cat([output[n:], output[:n]]))
    return work
dist.all_gather_single = _swapped
"""
    + RE_EXPORT.format(name="test_all_gather"),
    # reduce_scatter loses the tail element of an odd-sized block on rank 1.
    "test_fault_reducescatter_tail": """
import torch.distributed as dist
_real = dist.reduce_scatter_single
def _bad_tail(output, input, *args, **kwargs):
    work = _real(output, input, *args, **kwargs)
    if dist.get_rank() == 1 and output.numel() == 1031:
        output[-1] += 1
    return work
dist.reduce_scatter_single = _bad_tail
"""
    + RE_EXPORT.format(name="test_reduce_scatter"),
    # Rank 1 takes part in a 1 MiB broadcast from root 0 but its buffer is never written.
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
    # A received point-to-point message arrives with one element changed on rank 0.
    "test_fault_sendrecv_damaged": """
import torch.distributed as dist
_real = dist.batch_isend_irecv
class _Done:  # gloo work must not be waited on twice
    def wait(self):
        return True
def _damaged(ops):
    for work in _real(ops):
        work.wait()
    if dist.get_rank() == 0:
        for op in ops:
            if op.op is dist.irecv and op.tensor.numel() == 1031:
                op.tensor[3] += 1
    return [_Done() for _ in ops]
dist.batch_isend_irecv = _damaged
"""
    + RE_EXPORT.format(name="test_send_recv"),
    "test_clean_collectives": RE_EXPORT.format(name="test_all_reduce"),
}

SELECTION = [
    "test_clean_collectives.py::test_all_reduce[ws2-cpu-fp32-sum]",
    "test_fault_allreduce_element.py::test_all_reduce[ws2-cpu-fp32-sum]",
    "test_fault_allreduce_rerun.py::test_all_reduce[ws2-cpu-bf16-max]",
    "test_fault_allgather_order.py::test_all_gather[ws2-cpu-fp32]",
    "test_fault_reducescatter_tail.py::test_reduce_scatter[ws2-cpu-fp16]",
    "test_fault_broadcast_lost.py::test_broadcast[ws2-cpu-int32]",
    "test_fault_sendrecv_damaged.py::test_send_recv[ws2-cpu-bf16]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("collective_faults"), FAULTS, SELECTION)


def test_clean_run_passes_and_records_bandwidth(cases):
    case = cases["test_clean_collectives::test_all_reduce[ws2-cpu-fp32-sum]"]
    assert case.outcome == "passed", case.text[:1500]


def test_corrupted_element_after_all_reduce_is_counted(cases):
    assert_caught(
        cases,
        "test_fault_allreduce_element::test_all_reduce[ws2-cpu-fp32-sum]",
        "rank 1: all_reduce(sum) fp32 x262144 (1048576 B): #wrong=1 of 262144 elements, first at [12345]",
        "max |diff|=1 (bound: exact)",
        "(bound: bitwise equal to rank 0)",
    )


def test_run_to_run_difference_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_allreduce_rerun::test_all_reduce[ws2-cpu-bf16-max]",
        "rank 0: all_reduce(max) bf16 x1031 (2062 B) run 2 vs run 1: #wrong=1 of 1031 elements, first at [7]",
        "max |diff|=2",
        "(bound: run-to-run bitwise identical)",
    )


def test_all_gather_block_order_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_allgather_order::test_all_gather[ws2-cpu-fp32]",
        "rank 0: all_gather fp32 x262144 (1048576 B): #wrong=",
        "(bound: exact)",
    )


def test_reduce_scatter_tail_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_reducescatter_tail::test_reduce_scatter[ws2-cpu-fp16]",
        "rank 1: reduce_scatter(sum) fp16 x1031 (2062 B): #wrong=1 of 1031 elements, first at [1030]",
        "max |diff|=1 (bound: exact)",
    )


def test_lost_broadcast_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_broadcast_lost::test_broadcast[ws2-cpu-int32]",
        "rank 1: broadcast(root=0) int32 x262144 (1048576 B): #wrong=",
        "(bound: exact)",
    )


def test_damaged_point_to_point_message_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_sendrecv_damaged::test_send_recv[ws2-cpu-bf16]",
        "rank 0: send/recv ring (1->0) bf16 x1031 (2062 B): #wrong=1 of 1031 elements, first at [3]",
        "max |diff|=1 (bound: exact)",
    )
