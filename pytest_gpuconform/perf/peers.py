"""Peer comparison: the GPUs of one node should be equally fast.

A board that is healthy enough to clear its model's floor can still be much slower than
its neighbours (power brake, a bad VRM, a downclocked HBM stack), and one slow GPU paces a
whole synchronous training job. DCGM's diagnostic compares each GPU with the node's mean;
the median is used here so that the slow GPU does not drag the reference down with it.
Pure function over numbers, so it is tested without a GPU.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class SlowPeer:
    label: str
    value: float
    median: float
    bound: float

    def line(self, metric: str, unit: str, fraction: float) -> str:
        return (
            f"{self.label}: {metric} = {self.value:.4g} {unit}, {1 - self.value / self.median:.1%} below the node "
            f"median {self.median:.4g}; bound >= {self.bound:.4g} (--gpuconform-peer-fraction {fraction:g})"
        )


def slow_peers(values: dict[str, float], fraction: float) -> list[SlowPeer]:
    """GPUs (label -> higher-is-better number) more than ``fraction`` below the median."""
    if len(values) < 2:
        return []
    median = statistics.median(values.values())
    bound = median * (1 - fraction)
    return [SlowPeer(label, value, median, bound) for label, value in values.items() if value < bound]
