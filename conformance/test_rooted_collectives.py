"""Collectives with a root: reduce to, gather to and scatter from every rank in turn.

Checkpoint code gathers to rank 0, data loaders scatter from it, metrics reduce to it; a
stack whose tree or ring is wrong for one root only passes a check that always uses rank
0. So every rank is the root once, at every size, blocking and async, and each result is
exact. Inputs a collective only reads (what gather sends, what scatter distributes) must
come back untouched: a backend that uses them as scratch space corrupts the caller's data.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pytest_gpuconform.checks import integer_values, value_range

from ._collective_cases import ELEMENT_TYPES, WORLD_SIZES, finish, record_bandwidth, verify_every_size


def _values(count, dtype, source, salt, device, divisor=1):
    low, high = value_range(dtype, divisor)
    return integer_values(count, low, high, source=source, salt=salt, device=device).to(dtype)


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_reduce(element_type, rank, world_size, device, record):
    """reduce(sum) to every root: the root holds the sum of every rank's input."""
    dtype = ELEMENT_TYPES[element_type]
    record("dtype", element_type)

    def run_once(count, salt, async_op):
        inputs = [_values(count, dtype, r, salt, device, world_size) for r in range(world_size)]
        expected = sum(i.to(torch.int64) for i in inputs).to(dtype)
        for root in range(world_size):
            buffer = inputs[rank].clone()
            finish(dist.reduce(buffer, dst=root, async_op=async_op), async_op)
            if rank == root:  # other ranks' buffers are unspecified after reduce
                yield buffer, expected, f"(sum, root={root})"

    verify_every_size("reduce(sum)", run_once, element_type, rank, world_size, device, record, described_as="reduce")

    def make_run(count):
        scratch = torch.zeros(count, dtype=dtype, device=device)
        return (lambda: dist.reduce(scratch, dst=0)), count * dtype.itemsize

    record_bandwidth(make_run, "reduce", element_type, device, world_size, record)


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_gather(element_type, rank, world_size, device, record):
    """gather to every root: the root's list holds every rank's block in rank order; every
    rank's input is unchanged."""
    dtype = ELEMENT_TYPES[element_type]
    record("dtype", element_type)

    def run_once(count, salt, async_op):
        blocks = [_values(count, dtype, r, salt, device) for r in range(world_size)]
        for root in range(world_size):
            mine = blocks[rank].clone()
            slots = (
                [torch.empty(count, dtype=dtype, device=device) for _ in range(world_size)] if rank == root else None
            )
            finish(dist.gather(mine, slots, dst=root, async_op=async_op), async_op)
            if rank == root:
                yield torch.cat(slots), torch.cat(blocks), f"(root={root})"
            yield mine, blocks[rank], f"(root={root}) input after the call"

    verify_every_size("gather", run_once, element_type, rank, world_size, device, record)

    def make_run(count):
        mine = torch.zeros(count, dtype=dtype, device=device)
        slots = [torch.empty_like(mine) for _ in range(world_size)] if rank == 0 else None
        return (lambda: dist.gather(mine, slots, dst=0)), world_size * count * dtype.itemsize

    record_bandwidth(make_run, "gather", element_type, device, world_size, record)


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_scatter(element_type, rank, world_size, device, record):
    """scatter from every root: rank r receives the root's r-th block; the root's list is
    unchanged. Receivers start from other data, so a rank that received nothing is caught."""
    dtype = ELEMENT_TYPES[element_type]
    record("dtype", element_type)

    def run_once(count, salt, async_op):
        for root in range(world_size):
            blocks = [_values(count, dtype, root * world_size + r, salt, device) for r in range(world_size)]
            sent = [b.clone() for b in blocks] if rank == root else None
            output = _values(count, dtype, world_size * world_size + rank, salt, device)
            finish(dist.scatter(output, sent, src=root, async_op=async_op), async_op)
            yield output, blocks[rank], f"(root={root})"
            if rank == root:
                yield torch.cat(sent), torch.cat(blocks), f"(root={root}) scatter_list after the call"

    verify_every_size("scatter", run_once, element_type, rank, world_size, device, record)

    def make_run(count):
        output = torch.empty(count, dtype=dtype, device=device)
        sent = [torch.zeros_like(output) for _ in range(world_size)] if rank == 0 else None
        return (lambda: dist.scatter(output, sent, src=0)), world_size * count * dtype.itemsize

    record_bandwidth(make_run, "scatter", element_type, device, world_size, record)
