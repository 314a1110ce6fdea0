"""Throughput measurements: dense GEMM per precision and all_reduce bus bandwidth.

Run inside a process that may use CUDA (a rank of the engine), never in the controller.
Both follow the same protocol so numbers are comparable run to run:

* warm-up first, by count *and* by time (``WARMUP_SECONDS``): the first calls pay for
  cuBLAS heuristics, lazy module loading and NCCL channel set-up, and an idle GPU needs
  tens of milliseconds to ramp its clocks, longer than a few 8192^3 bf16 GEMMs (1.4 ms
  each on an H100) take;
* the device is synchronised before the timed region and after it; on CUDA every repeat
  is bracketed by CUDA events recorded on the *measured device's* current stream (with
  that device made current: events recorded on another GPU's stream would time nothing
  and report an impossible throughput), on CPU by a wall clock;
* the MEDIAN of the repeats is reported, which ignores the odd slow repeat without
  rewarding a lucky one.

Sizes: GEMMs are 8192^3 (large enough for cuBLAS to reach steady tensor-core throughput on
A100 through B200: 1.1 TFLOP per call); all_reduce moves 1 GiB, where nccl-tests' bus
bandwidth has plateaued on NVLink nodes (smaller messages are latency-bound and read low).

Precisions: ``fp32`` is true fp32 (TF32 off), ``tf32`` is fp32 tensors with TF32 tensor
cores allowed, ``fp16`` and ``bf16`` are half-precision inputs (fp32 accumulation).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

GEMM_SIZE = 8192  # 8192^3: large enough to reach steady tensor-core throughput on A100..B200
ALL_REDUCE_BYTES = 2**30  # 1 GiB: nccl-tests' busbw plateau on NVLink nodes
WARMUP_SECONDS = 0.3  # clocks ramp from idle in tens of ms; this is a comfortable margin
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
        """The NVML device with this UUID in any prefix form (CUDA prints it bare)."""
        from ..node.identity import find

        return find(self.gpus, uuid)


def gemm_tflops(n: int, milliseconds: float) -> float:
    """Throughput of one n x n x n matmul (2 n^3 floating-point operations)."""
    return 2.0 * n**3 / (milliseconds * 1e-3) / 1e12


def _ring(n: int) -> float:
    return (n - 1) / n


# nccl-tests' busbw / algbw factors (doc/PERFORMANCE.md): what each link carried, so bus
# bandwidth compares across world sizes and with the hardware's peak.
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


def bus_bandwidth_gbps(nbytes: int, milliseconds: float, world_size: int) -> float:
    """nccl-tests' all_reduce bus bandwidth: algbw x 2(n-1)/n, comparable across world sizes."""
    algbw = nbytes / (milliseconds * 1e-3) / 1e9
    return algbw * bus_factor("all_reduce", world_size)


@contextmanager
def _on_device(torch, device):
    """Make ``device`` current for the block, so streams and events are that GPU's."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        yield


def _warm_up(torch, device, step, count: int, seconds: float) -> None:
    """At least ``count`` runs and at least ``seconds`` of them, waited for on the device."""
    began = time.perf_counter()
    done = 0
    while done < count or time.perf_counter() - began < seconds:
        step()
        done += 1
        if device.type == "cuda" and done >= count:
            torch.cuda.synchronize(device)  # measure time the GPU spent, not time to queue
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(
    torch, device, step, warmup: int, repeats: int, while_loaded=None, warmup_seconds: float = 0.0
) -> Timing:
    """Warm up (``warmup`` runs and ``warmup_seconds``), then time each of ``repeats`` runs;
    median in ms.

    ``while_loaded`` (optional) is called once after every timed run has been queued on
    the GPU and before waiting for them: a moment when the device is known to be busy.
    """
    with _on_device(torch, device):
        _warm_up(torch, device, step, warmup, warmup_seconds)
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            for start, end in zip(starts, ends, strict=True):
                start.record(stream)
                step()
                end.record(stream)
            if while_loaded is not None:
                while_loaded()
            torch.cuda.synchronize(device)
            times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
            return Timing(statistics.median(times), tuple(times))
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            step()
            times.append((time.perf_counter() - began) * 1e3)
        if while_loaded is not None:
            while_loaded()
    return Timing(statistics.median(times), tuple(times))


def measure_gemm(
    device,
    precision: str,
    n: int = GEMM_SIZE,
    warmup: int = 3,
    repeats: int = 10,
    while_loaded=None,
    warmup_seconds: float | None = None,
) -> GemmResult:
    """TF32 is set for exactly this precision (on for ``tf32``, off for the others), with
    the API torch has (checks/numerics.py), and restored afterwards."""
    import torch

    from ..checks.numerics import tf32_allowed

    dtype = getattr(torch, _DTYPES[precision])
    if warmup_seconds is None:
        warmup_seconds = WARMUP_SECONDS if device.type == "cuda" else 0.0
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    out = torch.empty(n, n, device=device, dtype=dtype)
    with tf32_allowed(device, precision == "tf32"):
        timing = time_repeats(
            torch, device, lambda: torch.matmul(a, b, out=out), warmup, repeats, while_loaded, warmup_seconds
        )
    return GemmResult(precision, n, timing.median_ms, gemm_tflops(n, timing.median_ms))


def cuda_devices() -> list[tuple[int, str]]:
    """(CUDA ordinal, UUID as CUDA prints it: bare hex) of every device this process sees.

    Match it to NVML with ``NodeGpus.find`` / ``PerfSetup.gpu``, which accept any prefix
    form: NVML writes ``GPU-`` for boards and ``MIG-`` for MIG devices.
    """
    import torch

    return [(i, str(torch.cuda.get_device_properties(i).uuid)) for i in range(torch.cuda.device_count())]


def measure_all_reduce(device, world_size: int, numel: int, warmup: int = 10, repeats: int = 20) -> tuple[float, float]:
    """(median ms, bus bandwidth GB/s) of all_reduce(SUM) on ``numel`` fp32 elements.

    Warm-up is by count only: every rank must issue the same number of collectives, and a
    time-based warm-up would let ranks disagree and hang. Each repeat's time is the slowest
    rank's (a MAX all_reduce of the times), so every rank computes the same number and
    reaches the same verdict. The data is zeros, so the sums stay finite however many
    repeats run.
    """
    import torch
    import torch.distributed as dist

    tensor = torch.zeros(numel, dtype=torch.float32, device=device)
    timing = time_repeats(torch, device, lambda: dist.all_reduce(tensor), warmup, repeats)
    times = torch.tensor(timing.times_ms, dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    median_ms = statistics.median(times.tolist())
    return median_ms, bus_bandwidth_gbps(numel * 4, median_ms, world_size)
