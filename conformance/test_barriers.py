"""barrier and monitored_barrier synchronise: no rank leaves before every rank arrived.

Checkpointing waits on a barrier before reading what other ranks wrote; a barrier that
returns early gives no error, only a rank that reads a half-written file. Returning is not
the promise, so the checks do not stop there. Each rank writes "arrived" into a store
beside the process group just before entering the barrier, one rank arrives late, and
every rank, once out of the barrier, must find every rank's arrival already written (the
store's ``check`` does not wait). The late rank is the last rank and, in a second round,
rank 0 (the coordinator of monitored_barrier).
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from pytest_gpuconform.checks import raise_if_any

from . import _stores
from ._collective_cases import destroy_groups

LATE_SECONDS = 0.1
MONITOR_TIMEOUT = timedelta(seconds=30)


def _left_early(enter, store, round_name, late, rank, world_size) -> str | None:
    """Arrive (late if this is the late rank), pass the barrier, then name the ranks whose
    arrival is not yet visible; None when every rank had arrived."""
    if rank == late:
        time.sleep(LATE_SECONDS)
    store.set(f"{round_name}/arrived/{rank}", "1")
    started = time.perf_counter()
    enter()
    waited = time.perf_counter() - started
    missing = [r for r in range(world_size) if not store.check([f"{round_name}/arrived/{r}"])]
    if not missing:
        return None
    return (
        f"{round_name}: left after {waited:.3f} s, before rank(s) {missing} arrived "
        f"(rank {late} arrived {LATE_SECONDS} s late)"
    )


def _prove_synchronises(enter, name, rank, world_size) -> None:
    store = _stores.tcp_store(rank, world_size)
    try:
        problems = [
            _left_early(enter, store, f"{name} late rank {late}", late, rank, world_size)
            for late in sorted({world_size - 1, 0})
        ]
        raise_if_any("; ".join(p for p in problems if p) or None, rank, world_size, name)
    finally:
        _stores.all_done(world_size)
        del store


@pytest.mark.world_size(2, 4, 8)
@pytest.mark.parametrize("form", ["blocking", "async_op"])
def test_barrier_synchronises(form, rank, world_size, device):
    """dist.barrier(), and barrier(async_op=True) then wait(): no rank leaves early."""

    def enter():
        if form == "blocking":
            dist.barrier()
        else:
            dist.barrier(async_op=True).wait()

    _prove_synchronises(enter, f"barrier({form})", rank, world_size)


@pytest.mark.world_size(2, 4, 8)
@pytest.mark.parametrize("wait_all_ranks", [False, True])
def test_monitored_barrier_synchronises(wait_all_ranks, rank, world_size, device):
    """monitored_barrier (gloo only: on NCCL nodes a gloo group is made for it, as torch
    documents): no rank leaves early, with and without ``wait_all_ranks``."""
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    try:
        _prove_synchronises(
            lambda: dist.monitored_barrier(group=group, timeout=MONITOR_TIMEOUT, wait_all_ranks=wait_all_ranks),
            f"monitored_barrier(wait_all_ranks={wait_all_ranks})",
            rank,
            world_size,
        )
    finally:
        destroy_groups([group])
