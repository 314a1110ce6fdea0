"""Turn markers and parameters into "can this node run this test?" answers.

Every answer is a human-readable reason (or None), so skips always say what is missing.
The facts come from NVML and the options, never from CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from . import dtypes
from .nvml import NodeGpus


class MarkerError(pytest.Collector.CollectError):
    """A marker used wrongly: a collection error that names the test, shown without a
    traceback of pytest's internals."""


@dataclass(frozen=True)
class GpuNeed:
    n: int = 1
    bf16: bool = False
    min_compute_capability: tuple[int, int] | None = None
    min_memory_gib: float | None = None


def gpu_need(marker: pytest.Mark | None, nodeid: str) -> GpuNeed | None:
    if marker is None:
        return None
    kwargs = dict(marker.kwargs)
    if marker.args:
        kwargs.setdefault("n", marker.args[0])
    n = kwargs.pop("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MarkerError(f"{nodeid}: gpu(n={n!r}): n must be a whole number >= 1")
    cc = kwargs.pop("min_compute_capability", None)
    if cc is not None:
        try:
            cc = tuple(int(p) for p in (cc if isinstance(cc, tuple) else str(cc).split(".")))
        except ValueError:
            raise MarkerError(f"{nodeid}: gpu(min_compute_capability={cc!r}): expected e.g. '8.0' or (8, 0)") from None
    memory = kwargs.pop("min_memory_gib", None)
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0):
        raise MarkerError(f"{nodeid}: gpu(min_memory_gib={memory!r}): expected a number of GiB > 0")
    need = GpuNeed(n=n, bf16=bool(kwargs.pop("bf16", False)), min_compute_capability=cc, min_memory_gib=memory)
    if kwargs:
        raise MarkerError(f"{nodeid}: gpu() got unknown keywords {sorted(kwargs)}; "
                                "accepted: n, bf16, min_compute_capability, min_memory_gib")
    return need


def node_description(node: NodeGpus) -> str:
    if node.status == "ok":
        return f"node has {node.count} visible GPU(s)"
    if node.status == "absent":
        return f"node has no GPU ({node.message})"
    return f"NVML is broken ({node.message})"


def gpu_count_shortfall(node: NodeGpus, n: int, leasable: int | None = None) -> str | None:
    """``leasable``: GPUs of the whole node a multi-rank test may lease under xdist."""
    if node.count >= n or (leasable is not None and leasable >= n):
        return None
    if leasable is not None:
        return f"needs {n} GPU(s), node has {leasable} (leased per test under -n)"
    return f"needs {n} GPU(s), {node_description(node)}"


def gpu_capability_shortfall(node: NodeGpus, need: GpuNeed) -> str | None:
    gpus = node.visible[: need.n]
    for gpu in gpus:
        if need.bf16 and not gpu.has_bf16:
            return f"needs bf16 (compute capability >= 8.0); GPU {gpu.label()}"
        if need.min_compute_capability and gpu.compute_capability < tuple(need.min_compute_capability):
            want = ".".join(map(str, need.min_compute_capability))
            return f"needs compute capability >= {want}; GPU {gpu.label()}"
        if need.min_memory_gib and gpu.memory_gib < need.min_memory_gib:
            return f"needs >= {need.min_memory_gib} GiB GPU memory; GPU {gpu.label()}"
    return None


def dtype_shortfall(node: NodeGpus, dtype: str, device: str, n: int) -> str | None:
    if device != "cuda":
        return dtypes.unsupported_reason(dtype, device, gpu_bf16=True)
    for gpu in node.visible[:n]:
        reason = dtypes.unsupported_reason(dtype, "cuda", gpu.has_bf16)
        if reason:
            return f"{reason}; GPU {gpu.label()}"
    return None
