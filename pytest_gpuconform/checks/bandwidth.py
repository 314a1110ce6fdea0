"""Collective bandwidth as nccl-tests reports it, so numbers compare with theirs.

nccl-tests (doc/PERFORMANCE.md) times a collective of S bytes and reports
``algbw = S / t`` and ``busbw = algbw * factor``, where the factor turns the algorithm's
traffic into what each link carried, so busbw is comparable across world sizes and with
the hardware's peak. S is the buffer for all_reduce, broadcast, reduce and send/recv, and
the whole (n x block) buffer for all_gather, reduce_scatter, all_to_all, gather and
scatter. ``t`` is the slowest rank's mean time per iteration: a collective is done when
its last rank is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..perf.measure import BUS_FACTORS, bus_factor
from .rank_verdicts import gather_float

__all__ = ["BUS_FACTORS", "Bandwidth", "bus_factor", "measure_bandwidth"]


@dataclass(frozen=True)
class Bandwidth:
    nbytes: int  # nccl-tests' S
    seconds: float  # slowest rank, mean per iteration
    algbw_GBps: float
    busbw_GBps: float


def measure_bandwidth(
    run: Callable[[], object],
    nbytes: int,
    collective: str,
    world_size: int,
    device: torch.device,
    iterations: int,
    warmup: int = 2,
) -> Bandwidth:
    """Time ``run()`` (one collective on every rank of the default group) ``iterations``
    times after ``warmup`` untimed calls (connection set-up and allocator growth are not
    bandwidth). Every rank must call this with the same arguments."""
    for _ in range(warmup):
        run()
    _synchronize(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        run()
    _synchronize(device)
    mine = (time.perf_counter() - start) / iterations
    slowest = max(gather_float(mine, world_size))
    algbw = nbytes / slowest / 1e9
    return Bandwidth(nbytes, slowest, algbw, algbw * bus_factor(collective, world_size))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
