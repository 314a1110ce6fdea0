"""Why this node cannot run a test: the skip reasons of the collection policy.

Every answer is a human-readable reason (or None), so skips always say what is missing.
The facts come from NVML and the options, never from CUDA.
"""

from __future__ import annotations

from ..node.nvml import NodeGpus
from . import dtypes
from .markers import GpuNeed


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
            return f"needs bf16 (compute capability >= 8.0); {gpu.describe()}"
        if need.min_compute_capability and gpu.compute_capability < tuple(need.min_compute_capability):
            want = ".".join(map(str, need.min_compute_capability))
            return f"needs compute capability >= {want}; {gpu.describe()}"
        if need.min_memory_gib and gpu.memory_gib < need.min_memory_gib:
            return f"needs >= {need.min_memory_gib} GiB GPU memory; {gpu.describe()}"
    return None


def dtype_shortfall(node: NodeGpus, dtype: str, device: str, n: int) -> str | None:
    if device != "cuda":
        return dtypes.unsupported_reason(dtype, device, gpu_bf16=True)
    for gpu in node.visible[:n]:
        reason = dtypes.unsupported_reason(dtype, "cuda", gpu.has_bf16)
        if reason:
            return f"{reason}; {gpu.describe()}"
    return None
