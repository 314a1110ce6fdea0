"""Point-to-point messages: what a rank receives is what its peer sent, bit for bit.

Pipeline parallelism moves activations and gradients between stages with exactly these
calls: blocking ``send``/``recv``, ``isend``/``irecv`` work objects, and
``batch_isend_irecv``, which schedules a group of them together (NCCL fuses them). The
patterns are a ring (each rank sends forward, as a pipeline's forward pass does) and both
directions at once (forward activations and backward gradients in flight together, as in
1F1B). Receive buffers start with other data, so a message that never landed is caught, and
each message's content names its sender and direction.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pytest_gpuconform.checks import integer_values, value_range

from ._collective_cases import ELEMENT_TYPES, WORLD_SIZES, record_bandwidth, verify_every_size

BLOCKING_ONLY = (False,)
FORWARD, BACKWARD = 0, 1


def _message(count, dtype, sender, direction, world_size, salt, device):
    low, high = value_range(dtype)
    source = 2 * sender + direction
    return integer_values(count, low, high, source=source, salt=salt, device=device).to(dtype)


def _not_yet_received(count, dtype, rank, world_size, salt, device):
    """What a receive buffer holds before the message arrives: data no peer sends."""
    return _message(count, dtype, world_size + rank, FORWARD, world_size, salt, device)


def _peers(rank, world_size):
    return (rank + 1) % world_size, (rank - 1) % world_size


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_send_recv(element_type, rank, world_size, device, record):
    """Blocking send/recv around a ring (even ranks send first, odd ranks receive first):
    the message arrives intact and ``recv`` reports the sender's rank."""
    dtype = ELEMENT_TYPES[element_type]
    record("dtype", element_type)
    successor, predecessor = _peers(rank, world_size)

    def run_once(count, salt, async_op):
        outgoing = _message(count, dtype, rank, FORWARD, world_size, salt, device)
        incoming = _not_yet_received(count, dtype, rank, world_size, salt, device)
        if rank % 2 == 0:
            dist.send(outgoing, successor)
            sender = dist.recv(incoming, predecessor)
        else:
            sender = dist.recv(incoming, predecessor)
            dist.send(outgoing, successor)
        yield (
            incoming,
            _message(count, dtype, predecessor, FORWARD, world_size, salt, device),
            f" ({predecessor}->{rank})",
        )
        reported = torch.tensor([-1 if sender is None else sender])
        yield reported, torch.tensor([predecessor]), f" ({predecessor}->{rank}) sender rank recv returned"

    verify_every_size(
        "send/recv",
        run_once,
        element_type,
        rank,
        world_size,
        device,
        record,
        modes=BLOCKING_ONLY,
        described_as="send/recv ring",
    )


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_isend_irecv(element_type, rank, world_size, device, record):
    """isend/irecv around a ring, both posted before either is waited on: after ``wait()``
    the message is intact and the sent buffer unchanged."""
    dtype = ELEMENT_TYPES[element_type]
    record("dtype", element_type)
    successor, predecessor = _peers(rank, world_size)

    def run_once(count, salt, async_op):
        outgoing = _message(count, dtype, rank, FORWARD, world_size, salt, device)
        incoming = _not_yet_received(count, dtype, rank, world_size, salt, device)
        works = [dist.irecv(incoming, predecessor), dist.isend(outgoing, successor)]
        for work in works:
            work.wait()
        yield (
            incoming,
            _message(count, dtype, predecessor, FORWARD, world_size, salt, device),
            f" ({predecessor}->{rank})",
        )
        yield (
            outgoing,
            _message(count, dtype, rank, FORWARD, world_size, salt, device),
            f" ({rank}->{successor}) sent buffer",
        )

    verify_every_size(
        "isend/irecv",
        run_once,
        element_type,
        rank,
        world_size,
        device,
        record,
        modes=BLOCKING_ONLY,
        described_as="isend/irecv ring",
    )


def _batch_exchange(ops):
    for work in dist.batch_isend_irecv(ops):
        work.wait()


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("pattern", ["ring", "bidirectional"])
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_batch_isend_irecv(element_type, pattern, rank, world_size, device, record):
    """batch_isend_irecv as a ring (send forward, receive from behind) and in both
    directions at once (forward to the successor and backward to the predecessor, each
    received from the matching neighbour): every message lands in its own buffer intact."""
    dtype = ELEMENT_TYPES[element_type]
    record("dtype", element_type)
    successor, predecessor = _peers(rank, world_size)
    directions = [FORWARD] if pattern == "ring" else [FORWARD, BACKWARD]

    def run_once(count, salt, async_op):
        ops, received = [], []
        for direction in directions:
            to, sender = (successor, predecessor) if direction == FORWARD else (predecessor, successor)
            incoming = _not_yet_received(count, dtype, rank, world_size, salt + direction, device)
            ops.append(dist.P2POp(dist.isend, _message(count, dtype, rank, direction, world_size, salt, device), to))
            ops.append(dist.P2POp(dist.irecv, incoming, sender))
            received.append(
                (
                    incoming,
                    _message(count, dtype, sender, direction, world_size, salt, device),
                    f" {('forward', 'backward')[direction]} ({sender}->{rank})",
                )
            )
        _batch_exchange(ops)
        yield from received

    verify_every_size(
        f"batch_isend_irecv({pattern})",
        run_once,
        element_type,
        rank,
        world_size,
        device,
        record,
        modes=BLOCKING_ONLY,
        described_as=f"batch_isend_irecv {pattern}",
    )
    if pattern == "ring":

        def make_run(count):
            outgoing = torch.zeros(count, dtype=dtype, device=device)
            incoming = torch.empty_like(outgoing)
            ops = [dist.P2POp(dist.isend, outgoing, successor), dist.P2POp(dist.irecv, incoming, predecessor)]
            return (lambda: _batch_exchange(ops)), count * dtype.itemsize

        record_bandwidth(make_run, "send_recv", element_type, device, world_size, record)
