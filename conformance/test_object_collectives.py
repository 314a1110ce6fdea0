"""Object collectives: Python objects arrive as they were sent, nested tensors included.

Checkpoint metadata (DCP's save plans), configs and data-loader state travel through
``broadcast_object_list``, ``all_gather_object``, ``gather_object`` and
``scatter_object_list``: pickled, sizes exchanged first, then the bytes. The objects here
are nested (dicts of lists of tuples), hold tensors of several dtypes and a dataclass, and
have a different pickled size on every rank, so a lost length, a truncated buffer, or a
block delivered to the wrong rank changes what arrives. Every collective runs from and to
every root; receivers start with placeholders, so an object that never arrived is caught.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from pytest_gpuconform.checks import ExactTally, structure_mismatch

WORLD_SIZES = (2, 4, 8)


@dataclass(frozen=True)
class ShardRecord:
    """A piece of checkpoint metadata, as DCP's planners exchange them."""

    fqn: str
    offsets: tuple
    sizes: tuple


def payload(source: int) -> dict:
    """The object that ``source`` sends: nested, with tensors, and of a size that depends on
    the source (so pickles differ in length between ranks)."""
    return {
        "source": source,
        "name": f"rank-{source}-ünïcødé",
        "step": 10**12 + source,
        "lr": 0.1 * (source + 1),
        "flags": (True, None, b"\x00\xff" * (source + 1)),
        "layers": [
            {
                "weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) * (source + 1),
                "bias": torch.full((3,), source - 2**40, dtype=torch.int64),
            },
            {"scale": torch.tensor([source, -source, 0.5], dtype=torch.bfloat16), "frozen": source % 2 == 0},
        ],
        "nested": {"a": [1, [2, (3, {"deep": source})]]},
        "shard": ShardRecord(f"layers.{source}.weight", (2 * source, 0), (2, 3)),
        "history": list(range(50 * source)),
    }


def _compare(tally: ExactTally, got, want, what: str) -> None:
    tally.note(structure_mismatch(got, want, what), wrong_elements=1)


@pytest.mark.world_size(*WORLD_SIZES)
def test_broadcast_object_list(rank, world_size, device, record):
    """broadcast_object_list from every root: every rank holds the root's objects."""
    tally = ExactTally()
    for root in range(world_size):
        sent = [payload(root), f"from {root}", root]
        objects = list(sent) if rank == root else [None, None, None]
        dist.broadcast_object_list(objects, src=root)
        _compare(tally, objects, sent, f"broadcast_object_list(root={root})")
    tally.verdict("broadcast_object_list", rank, world_size, record)


@pytest.mark.world_size(*WORLD_SIZES)
def test_all_gather_object(rank, world_size, device, record):
    """all_gather_object: slot r of every rank's list is rank r's object."""
    tally = ExactTally()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, payload(rank))
    _compare(tally, gathered, [payload(r) for r in range(world_size)], "all_gather_object")
    tally.verdict("all_gather_object", rank, world_size, record)


@pytest.mark.world_size(*WORLD_SIZES)
def test_gather_object(rank, world_size, device, record):
    """gather_object to every root: the root's list holds every rank's object in order."""
    tally = ExactTally()
    for root in range(world_size):
        gathered = [None] * world_size if rank == root else None
        dist.gather_object(payload(rank + root), gathered, dst=root)
        if rank == root:
            _compare(tally, gathered, [payload(r + root) for r in range(world_size)], f"gather_object(root={root})")
    tally.verdict("gather_object", rank, world_size, record)


@pytest.mark.world_size(*WORLD_SIZES)
def test_scatter_object_list(rank, world_size, device, record):
    """scatter_object_list from every root: rank r receives the root's r-th object."""
    tally = ExactTally()
    for root in range(world_size):
        sent = [payload(root * world_size + r) for r in range(world_size)] if rank == root else None
        received = [None]
        dist.scatter_object_list(received, sent, src=root)
        _compare(tally, received[0], payload(root * world_size + rank), f"scatter_object_list(root={root})")
    tally.verdict("scatter_object_list", rank, world_size, record)
