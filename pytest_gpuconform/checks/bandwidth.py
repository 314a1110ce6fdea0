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

from .rank_verdicts import gather_float


def _ring(n: int) -> float:
    return (n - 1) / n


BUS_FACTORS: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": _ring,
    "reduce_scatter": _ring,
    "all_to_all": _ring,
    "gather": _ring,
    "scatter": _ring,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
    "send_recv": lambda n: 1.0,
}


def bus_factor(collective: str, world_size: int) -> float:
    """nccl-tests' busbw / algbw factor for ``collective`` (a key of ``BUS_FACTORS``)."""
    return BUS_FACTORS[collective](world_size)


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
