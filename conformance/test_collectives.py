"""Collectives conformance: every element of every collective exact, on every rank, every time.

Silent collective corruption is real and size-dependent (nccl#2001: wrong all_reduce sums
mostly at 1 MiB; pytorch#138811: run-to-run different all_reduce on H20; nccl#1199: wrong
results with P2P/PXN disabled). nccl-tests catches it by comparing every element with the
known answer and counting the wrong ones (``#wrong``); this module does the same through
torch.distributed, so the stack a training job uses (torch + NCCL or gloo) is what is tested.

Inputs are integers small enough that every partial sum is exactly representable in the
element type, so the right answer is the same in any reduction order (ring, tree, NVLS...)
and the comparison is bitwise. The result must also be bitwise identical on all ranks and
between two runs of the same collective. The bus bandwidth of the largest size is recorded
with nccl-tests' formulas (their PERFORMANCE.md): it is a measurement, not a verdict.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from pytest_gpuconform.checks import gather_float, mismatch, raise_if_any, same_on_all_ranks

ELEMENT_TYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int32": torch.int32}

# Largest integer n such that every integer in [-n, n] is exact in the type: 2**(mantissa bits + 1).
EXACT_INTEGER_LIMIT = {"fp32": 2**24, "fp16": 2**11, "bf16": 2**8, "int32": 2**31 - 1}

# Per-rank buffer sizes: a single element, an odd count (tails of vectorised kernels), 1 MiB
# (where nccl#2001 showed), and a larger one whose timing gives the recorded bandwidth. On
# GPUs the largest is bigger so that bandwidth is not dominated by latency.
ODD_COUNT = 1031
LARGE_SIZES_BYTES = {"cpu": (1 << 20, 4 << 20), "cuda": (1 << 20, 64 << 20)}
TIMED_ITERATIONS = {"cpu": 5, "cuda": 20}

WORLD_SIZES = (2, 4, 8)


def _counts(element_type: str, device: torch.device) -> list[int]:
    size = ELEMENT_TYPES[element_type].itemsize
    return [1, ODD_COUNT] + [nbytes // size for nbytes in LARGE_SIZES_BYTES[device.type]]


def _pattern(source_rank: int, count: int, amplitude: int, salt: int, device) -> torch.Tensor:
    """Integer-valued data in [-amplitude, amplitude], different per rank and per salt.

    A closed form rather than an RNG, so every rank can rebuild every other rank's input
    (and so the expected answer) on any device without communicating.
    """
    modulus = 2 * amplitude + 1
    index = torch.arange(count, dtype=torch.int64, device=device)
    return (index * 7919 + source_rank * 104729 + salt * 15485863) % modulus - amplitude


def _describe(what: str, element_type: str, count: int) -> str:
    nbytes = count * ELEMENT_TYPES[element_type].itemsize
    return f"{what} {element_type} x{count} ({nbytes} B)"


def _check_all_sizes(
    run_once, element_type, rank, world_size, device, check: str, identical_across_ranks: bool
) -> tuple[list[str], int]:
    """Run ``run_once(count, salt) -> (result, expected)`` twice per size and compare:
    exact against the expected answer, against the first run, and (where the collective
    gives every rank the same result) against rank 0.
    Returns the problems and this rank's ``#wrong`` summed over the sizes."""
    problems, wrong = [], 0
    for count in _counts(element_type, device):
        what = _describe(check, element_type, count)
        first, expected = run_once(count, salt=count)
        second, _ = run_once(count, salt=count)
        wrong += int((first != expected).sum()) if first.shape == expected.shape else first.numel()
        found = mismatch(first, expected, what)
        if found is None:
            found = mismatch(second, first, what + " run 2 vs run 1")
            found = found and found.replace("(bound: exact)", "(bound: run-to-run bitwise identical)")
        across = same_on_all_ranks(first, what, rank, world_size) if identical_across_ranks else None
        problems.extend(p for p in (found, across) if p)
    return problems, wrong


def _verdict(checked: list[tuple[list[str], int]], element_type, rank, world_size, check, record) -> None:
    """Record ``#wrong`` (the worst rank's) and fail every rank if any rank saw a problem."""
    problems = [p for found, _ in checked for p in found]
    wrong = sum(n for _, n in checked)
    record("dtype", element_type)  # int32 is outside the dtype marker, so the plugin cannot attach it
    record("wrong_elements", int(max(gather_float(float(wrong), world_size))))
    record("wrong_elements_bound", 0)
    raise_if_any("; ".join(problems) or None, rank, world_size, check)


def _record_bus_bandwidth(collective, nbytes_algorithm: int, bus_factor: float, device, world_size, record):
    """Time the collective on a scratch buffer and record algbw / busbw as nccl-tests does:
    algbw = S / t, busbw = algbw * factor, t the slowest rank's mean time per iteration."""
    for _ in range(2):  # warm-up: connection set-up and allocator growth are not bandwidth
        collective()
    _synchronize(device)
    dist.barrier()
    iterations = TIMED_ITERATIONS[device.type]
    start = time.perf_counter()
    for _ in range(iterations):
        collective()
    _synchronize(device)
    mine = (time.perf_counter() - start) / iterations
    slowest = max(gather_float(mine, world_size))
    algbw = nbytes_algorithm / slowest / 1e9
    record("size_bytes", nbytes_algorithm)
    record("time_us", slowest * 1e6)
    record("algbw_GBps", algbw)
    record("busbw_GBps", algbw * bus_factor)


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _largest(element_type, device) -> int:
    return _counts(element_type, device)[-1]


def _all_gather_single():
    # all_gather_into_tensor is deprecated in 2.13 in favour of all_gather_single (absent in 2.11).
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_single():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _skip_unless_backend_averages(element_type: str, device) -> None:
    """AVG is optional per backend and dtype: skip, saying why, where it is absent.

    Integer AVG on gloo is known absent: torch's gloo path divides after the sum in floating
    point and cannot store the result back ("result type Float can't be cast to ... Int");
    probing it is unsafe, since that failure happens inside the work and has been seen to
    abort the process at the next collective. Floating AVG is probed with one element
    (older gloo builds refuse it up front, before any communication)."""
    dtype = ELEMENT_TYPES[element_type]
    backend = dist.get_backend()
    if backend == "gloo" and not dtype.is_floating_point:
        pytest.skip(f"backend gloo has no integer ReduceOp.AVG ({element_type}): torch divides in floating point")
    probe = torch.ones(1, dtype=dtype, device=device)
    try:
        dist.all_reduce(probe, op=dist.ReduceOp.AVG)
    except (RuntimeError, ValueError, TypeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        pytest.skip(f"backend {backend} has no ReduceOp.AVG for {element_type}: {message}")


REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX}


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("op", list(REDUCE_OPS))
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_all_reduce(element_type, op, rank, world_size, device, record):
    """all_reduce(sum/avg/max): #wrong == 0 at every size, identical on all ranks and run to run.

    For avg, inputs are multiples of the world size so the mean is an integer whatever way
    the backend averages (sum then divide, or pre-multiply by 1/n)."""
    if op == "avg":
        _skip_unless_backend_averages(element_type, device)
    dtype = ELEMENT_TYPES[element_type]
    amplitude = EXACT_INTEGER_LIMIT[element_type] // world_size
    scale = world_size if op == "avg" else 1

    def run_once(count, salt):
        inputs = [_pattern(r, count, amplitude // scale, salt, device) * scale for r in range(world_size)]
        if op == "max":
            expected = torch.stack(inputs).amax(dim=0)
        else:
            expected = sum(inputs) // scale
        buffer = inputs[rank].to(dtype)
        dist.all_reduce(buffer, op=REDUCE_OPS[op])
        return buffer, expected.to(dtype)

    checked = _check_all_sizes(run_once, element_type, rank, world_size, device, f"all_reduce({op})", True)
    _verdict([checked], element_type, rank, world_size, f"all_reduce({op})", record)
    if op == "sum":
        count = _largest(element_type, device)
        scratch = torch.zeros(count, dtype=dtype, device=device)
        _record_bus_bandwidth(
            lambda: dist.all_reduce(scratch),
            scratch.numel() * dtype.itemsize,
            2 * (world_size - 1) / world_size,
            device,
            world_size,
            record,
        )


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_all_gather(element_type, rank, world_size, device, record):
    """all_gather into one tensor: every rank gets every rank's block, in rank order."""
    dtype = ELEMENT_TYPES[element_type]
    amplitude = EXACT_INTEGER_LIMIT[element_type]
    gather = _all_gather_single()

    def run_once(count, salt):
        inputs = [_pattern(r, count, amplitude, salt, device) for r in range(world_size)]
        output = torch.empty(world_size * count, dtype=dtype, device=device)
        gather(output, inputs[rank].to(dtype))
        return output, torch.cat(inputs).to(dtype)

    checked = _check_all_sizes(run_once, element_type, rank, world_size, device, "all_gather", True)
    _verdict([checked], element_type, rank, world_size, "all_gather", record)
    count = _largest(element_type, device)
    mine = torch.zeros(count, dtype=dtype, device=device)
    output = torch.empty(world_size * count, dtype=dtype, device=device)
    _record_bus_bandwidth(
        lambda: gather(output, mine),
        output.numel() * dtype.itemsize,
        (world_size - 1) / world_size,
        device,
        world_size,
        record,
    )


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_reduce_scatter(element_type, rank, world_size, device, record):
    """reduce_scatter(sum) from one tensor: rank r gets the sum of every rank's r-th block."""
    dtype = ELEMENT_TYPES[element_type]
    amplitude = EXACT_INTEGER_LIMIT[element_type] // world_size
    scatter = _reduce_scatter_single()

    def run_once(count, salt):
        inputs = [_pattern(r, world_size * count, amplitude, salt, device) for r in range(world_size)]
        expected = sum(inputs)[rank * count : (rank + 1) * count]
        output = torch.empty(count, dtype=dtype, device=device)
        scatter(output, inputs[rank].to(dtype))
        return output, expected.to(dtype)

    try:
        checked = _check_all_sizes(run_once, element_type, rank, world_size, device, "reduce_scatter(sum)", False)
    except (RuntimeError, NotImplementedError) as exc:
        if "not supported" in str(exc).lower() or "unimplemented" in str(exc).lower():
            pytest.skip(f"backend {dist.get_backend()} has no reduce_scatter for {element_type}: {exc}")
        raise
    _verdict([checked], element_type, rank, world_size, "reduce_scatter(sum)", record)
    count = _largest(element_type, device)
    source = torch.zeros(world_size * count, dtype=dtype, device=device)
    output = torch.empty(count, dtype=dtype, device=device)
    _record_bus_bandwidth(
        lambda: scatter(output, source),
        source.numel() * dtype.itemsize,
        (world_size - 1) / world_size,
        device,
        world_size,
        record,
    )


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_broadcast(element_type, rank, world_size, device, record):
    """broadcast from every rank in turn: receivers start with their own different data, so
    a rank that never received is caught."""
    dtype = ELEMENT_TYPES[element_type]
    amplitude = EXACT_INTEGER_LIMIT[element_type]

    checked = []
    for root in range(world_size):

        def run_once(count, salt, root=root):
            buffer = _pattern(rank, count, amplitude, salt + 1 + rank, device).to(dtype)
            if rank == root:
                buffer = _pattern(root, count, amplitude, salt, device).to(dtype)
            dist.broadcast(buffer, src=root)
            return buffer, _pattern(root, count, amplitude, salt, device).to(dtype)

        check = f"broadcast(root={root})"
        checked.append(_check_all_sizes(run_once, element_type, rank, world_size, device, check, True))
    _verdict(checked, element_type, rank, world_size, "broadcast", record)
    count = _largest(element_type, device)
    scratch = torch.zeros(count, dtype=dtype, device=device)
    _record_bus_bandwidth(
        lambda: dist.broadcast(scratch, src=0), scratch.numel() * dtype.itemsize, 1.0, device, world_size, record
    )


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_send_recv(element_type, rank, world_size, device, record):
    """Point-to-point around a ring (rank r sends to r+1): what arrives is what was sent,
    bit for bit. Pipeline parallelism is built on exactly these calls."""
    dtype = ELEMENT_TYPES[element_type]
    amplitude = EXACT_INTEGER_LIMIT[element_type]
    successor, predecessor = (rank + 1) % world_size, (rank - 1) % world_size

    def exchange(outgoing, incoming):
        ops = [dist.P2POp(dist.isend, outgoing, successor), dist.P2POp(dist.irecv, incoming, predecessor)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def run_once(count, salt):
        outgoing = _pattern(rank, count, amplitude, salt, device).to(dtype)
        incoming = _pattern(rank, count, amplitude, salt + 1, device).to(dtype)  # not what will arrive
        exchange(outgoing, incoming)
        return incoming, _pattern(predecessor, count, amplitude, salt, device).to(dtype)

    checked = _check_all_sizes(
        run_once, element_type, rank, world_size, device, f"send/recv ring ({predecessor}->{rank})", False
    )
    _verdict([checked], element_type, rank, world_size, "send/recv", record)
    count = _largest(element_type, device)
    outgoing = torch.zeros(count, dtype=dtype, device=device)
    incoming = torch.empty(count, dtype=dtype, device=device)
    _record_bus_bandwidth(
        lambda: exchange(outgoing, incoming), outgoing.numel() * dtype.itemsize, 1.0, device, world_size, record
    )
