"""Throughput measurements: dense GEMM per precision and all_reduce bus bandwidth.

Run inside a process that may use CUDA (a rank of the engine), never in the controller.
Both follow the same protocol so numbers are comparable run to run: warm-up first (cuBLAS
heuristics, clocks ramping up, NCCL channel setup), then every repeat timed on its own
(CUDA events on GPUs, a wall clock on CPU) and the MEDIAN reported, which ignores the odd
slow repeat without rewarding a lucky one.

Precisions: ``fp32`` is true fp32 (TF32 off), ``tf32`` is fp32 tensors with TF32 tensor
cores allowed, ``fp16`` and ``bf16`` are half-precision inputs (fp32 accumulation).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

GEMM_SIZE = 8192  # 8192^3: large enough to reach steady tensor-core throughput on H100/A100
_DTYPES = {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Timing:
    median_ms: float
    times_ms: tuple


@dataclass(frozen=True)
class GemmResult:
    precision: str
    n: int
    median_ms: float
    tflops: float


@dataclass(frozen=True)
class PerfSetup:
    """What a performance test body needs, resolved in the controller and sent to the rank."""

    gpus: tuple  # nvml.GpuInfo of every GPU on the node (to name a GPU found by UUID)
    visible: tuple  # the GPUs this run may use, in CUDA ordinal order
    floor_table: object  # floors.FloorTable
    peer_fraction: float

    def gpu(self, uuid: str):
        return next((g for g in self.gpus if g.uuid == uuid), None)


def gemm_tflops(n: int, milliseconds: float) -> float:
    """Throughput of one n x n x n matmul (2 n^3 floating-point operations)."""
    return 2.0 * n**3 / (milliseconds * 1e-3) / 1e12


def bus_bandwidth_gbps(nbytes: int, milliseconds: float, world_size: int) -> float:
    """nccl-tests' all_reduce bus bandwidth: algbw x 2(n-1)/n, comparable across world sizes."""
    algbw = nbytes / (milliseconds * 1e-3) / 1e9
    return algbw * 2.0 * (world_size - 1) / world_size


@contextmanager
def tf32_allowed(torch, allowed: bool):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def time_repeats(torch, device, step, warmup: int, repeats: int, while_loaded=None) -> Timing:
    """Run ``step`` warm-up times, then time each of ``repeats`` runs; median in ms.

    ``while_loaded`` (optional) is called once after every timed run has been queued on
    the GPU and before waiting for them: a moment when the device is known to be busy.
    """
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start, end in zip(starts, ends, strict=True):
            start.record()
            step()
            end.record()
        if while_loaded is not None:
            while_loaded()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    else:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            step()
            times.append((time.perf_counter() - began) * 1e3)
        if while_loaded is not None:
            while_loaded()
    return Timing(statistics.median(times), tuple(times))


def measure_gemm(
    device, precision: str, n: int = GEMM_SIZE, warmup: int = 3, repeats: int = 10, while_loaded=None
) -> GemmResult:
    import torch

    dtype = getattr(torch, _DTYPES[precision])
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    out = torch.empty(n, n, device=device, dtype=dtype)
    with tf32_allowed(torch, precision == "tf32"):
        timing = time_repeats(torch, device, lambda: torch.matmul(a, b, out=out), warmup, repeats, while_loaded)
    return GemmResult(precision, n, timing.median_ms, gemm_tflops(n, timing.median_ms))


def cuda_devices() -> list[tuple[int, str]]:
    """(CUDA ordinal, NVML-style UUID) of every GPU this process sees."""
    import torch

    return [(i, "GPU-" + str(torch.cuda.get_device_properties(i).uuid)) for i in range(torch.cuda.device_count())]


def measure_all_reduce(device, world_size: int, numel: int, warmup: int = 5, repeats: int = 20) -> tuple[float, float]:
    """(median ms, bus bandwidth GB/s) of all_reduce(SUM) on ``numel`` fp32 elements.

    Each repeat's time is the slowest rank's (a MAX all_reduce of the times), so every
    rank computes the same number and reaches the same verdict.
    """
    import torch
    import torch.distributed as dist

    tensor = torch.ones(numel, dtype=torch.float32, device=device)
    timing = time_repeats(torch, device, lambda: dist.all_reduce(tensor), warmup, repeats)
    times = torch.tensor(timing.times_ms, dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    median_ms = statistics.median(times.tolist())
    return median_ms, bus_bandwidth_gbps(numel * 4, median_ms, world_size)
