"""The point-to-point and barrier checks catch lost or damaged messages and barriers that
do not wait.

Faults planted in the ranks: a blocking recv that damages one element, an irecv whose
``wait()`` returns while the message went elsewhere, a batched ring that damages a message,
a bidirectional batch whose two receive buffers are swapped, and barriers (plain and
monitored) that return at once. One subprocess runs them all.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

P2P = "from pytest_gpuconform.conformance.test_point_to_point import {name}\n"
# The late rank arrives 1 s late instead of 0.1 s: a rank stalled by a busy machine must
# not let a broken barrier look right.
BARRIERS = (
    "import pytest_gpuconform.conformance.test_barriers as _barriers\n_barriers.LATE_SECONDS = 1.0\n"
    "from pytest_gpuconform.conformance.test_barriers import {name}\n"
)

FAULTS = {
    "test_fault_recv_damaged": """
import torch.distributed as dist
_real = dist.recv
def _damaged(tensor, src=None, *args, **kwargs):
    sender = _real(tensor, src, *args, **kwargs)
    if dist.get_rank() == 1 and tensor.numel() == 1031:
        tensor[5] += 1
    return sender
dist.recv = _damaged
"""
    + P2P.format(name="test_send_recv"),
    # irecv on rank 0 receives into a copy: wait() returns, the caller's buffer never changes.
    "test_fault_irecv_elsewhere": """
import torch.distributed as dist
_real = dist.irecv
def _elsewhere(tensor, src=None, *args, **kwargs):
    if dist.get_rank() == 0:
        return _real(tensor.clone(), src, *args, **kwargs)
    return _real(tensor, src, *args, **kwargs)
dist.irecv = _elsewhere
"""
    + P2P.format(name="test_isend_irecv"),
    # A message received in a batch on rank 0 arrives with one element changed.
    "test_fault_batch_ring_damaged": """
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
    + P2P.format(name="test_batch_isend_irecv"),
    # Both directions in one batch on rank 1: the two receive buffers are posted the other way round.
    "test_fault_batch_directions_swapped": """
import torch.distributed as dist
_real = dist.batch_isend_irecv
def _swapped(ops):
    receives = [i for i, op in enumerate(ops) if op.op is dist.irecv]
    if dist.get_rank() == 1 and len(receives) == 2:
        ops = list(ops)
        first, second = receives
        ops[first], ops[second] = (dist.P2POp(dist.irecv, ops[second].tensor, ops[first].peer),
                                   dist.P2POp(dist.irecv, ops[first].tensor, ops[second].peer))
    return _real(ops)
dist.batch_isend_irecv = _swapped
"""
    + P2P.format(name="test_batch_isend_irecv"),
    "test_fault_barrier_returns_at_once": """
import torch.distributed as dist
class _Done:
    def wait(self, *args):
        return True
dist.barrier = lambda *args, async_op=False, **kwargs: _Done() if async_op else None
"""
    + BARRIERS.format(name="test_barrier_synchronises"),
    "test_fault_monitored_barrier_returns_at_once": """
import torch.distributed as dist
dist.monitored_barrier = lambda *args, **kwargs: None
"""
    + BARRIERS.format(name="test_monitored_barrier_synchronises"),
}

SELECTION = [
    "test_fault_recv_damaged.py::test_send_recv[ws2-cpu-fp32]",
    "test_fault_irecv_elsewhere.py::test_isend_irecv[ws2-cpu-int64]",
    "test_fault_batch_ring_damaged.py::test_batch_isend_irecv[ws2-cpu-bf16-ring]",
    "test_fault_batch_directions_swapped.py::test_batch_isend_irecv[ws2-cpu-uint8-bidirectional]",
    "test_fault_barrier_returns_at_once.py::test_barrier_synchronises[ws2-cpu-async_op]",
    "test_fault_monitored_barrier_returns_at_once.py::test_monitored_barrier_synchronises[ws2-cpu-True]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("p2p_faults"), FAULTS, SELECTION)


def test_damaged_blocking_receive_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_recv_damaged::test_send_recv[ws2-cpu-fp32]",
        "rank 1: send/recv ring (0->1) fp32 x1031 (4124 B): #wrong=1 of 1031 elements, first at [5]",
        "max |diff|=1 (bound: exact)",
    )


def test_receive_that_never_lands_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_irecv_elsewhere::test_isend_irecv[ws2-cpu-int64]",
        "rank 0: isend/irecv ring (1->0) int64 x1 (8 B): #wrong=1 of 1 elements, first at [0]",
    )


def test_damaged_batched_message_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_batch_ring_damaged::test_batch_isend_irecv[ws2-cpu-bf16-ring]",
        "rank 0: batch_isend_irecv ring forward (1->0) bf16 x1031 (2062 B): #wrong=1 of 1031 elements, first at [3]",
        "max |diff|=1 (bound: exact)",
    )


def test_messages_in_the_wrong_buffers_are_caught(cases):
    assert_caught(
        cases,
        "test_fault_batch_directions_swapped::test_batch_isend_irecv[ws2-cpu-uint8-bidirectional]",
        "rank 1: batch_isend_irecv bidirectional forward (0->1) uint8 x1 (1 B): #wrong=1 of 1",
    )


# Which rank sees the early exit depends on how far apart the ranks start the test (nothing
# lines them up when the barrier does not wait), so the messages are checked for what every
# catch says: the barrier, a rank that left, the ranks it left behind, the lateness.
def test_barrier_that_does_not_wait_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_barrier_returns_at_once::test_barrier_synchronises[ws2-cpu-async_op]",
        "barrier(async_op): ",
        " ranks wrong: rank ",
        ": barrier(async_op) late rank ",
        ": left after ",
        " s, before rank(s) [",
        " arrived 1.0 s late)",
    )


def test_monitored_barrier_that_does_not_wait_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_monitored_barrier_returns_at_once::test_monitored_barrier_synchronises[ws2-cpu-True]",
        ": monitored_barrier(wait_all_ranks=True) late rank ",
        ": left after ",
        " s, before rank(s) [",
        " arrived 1.0 s late)",
    )
