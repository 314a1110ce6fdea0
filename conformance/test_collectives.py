"""Collectives every rank takes part in and gets a result from: exact, as nccl-tests demands.

Every element of every result is compared with the answer computed from the closed-form
inputs (``#wrong == 0``), for each dtype the backend carries, at every size from one
element up, blocking and with ``async_op=True`` then ``wait()``. nccl-tests checks the same
way; silent corruption has been reported exactly there: a few wrong elements at 1 MiB
(nccl#2001), results differing run to run (pytorch#138811 / nccl#1497).

Covered here: all_reduce with every ReduceOp, broadcast from every root, all_gather and
reduce_scatter in their list and tensor forms. Rooted collectives, all-to-all and
point-to-point have their own modules. Bus bandwidth is recorded as nccl-tests computes it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from pytest_gpuconform.checks import (
    bit_patterns,
    exact_integer_bound,
    integer_values,
    is_unsigned,
    value_range,
)

from ._collective_cases import (
    ELEMENT_TYPES,
    WORLD_SIZES,
    all_gather_single,
    finish,
    record_bandwidth,
    reduce_scatter_single,
    verify_every_size,
)

FLOATING = ("fp32", "fp16", "bf16")
INTEGER = ("int32", "int64", "uint8")
BITWISE = ("band", "bor", "bxor")
PREMUL_FACTOR = 2.0  # a power of two: the pre-multiplied sum stays exact

# PREMUL_SUM pre-multiplies by a floating factor (FSDP divides gradients with it); torch
# defines it for floating dtypes only. Bitwise reductions exist only for integers.
REDUCTION_CASES = [(e, op) for e in FLOATING for op in ("sum", "avg", "product", "min", "max", "premul_sum")] + [
    (e, op) for e in INTEGER for op in ("sum", "avg", "product", "min", "max", *BITWISE)
]


def _reduce_op(op: str):
    if op == "premul_sum":
        return dist._make_nccl_premul_sum(PREMUL_FACTOR)
    return getattr(dist.ReduceOp, op.upper())


def _backend_lacks(op: str, element_type: str) -> str | None:
    """Why the backend cannot run this reduction, from what it documents; None when it
    must. A table, not a probe: a broken stack that refuses an op it supports fails."""
    backend = dist.get_backend()
    integer = element_type in INTEGER
    if backend == "gloo" and op == "premul_sum":
        return "backend gloo has no ReduceOp.PREMUL_SUM (torch: 'Cannot use ReduceOp.PREMUL_SUM with Gloo')"
    if backend == "gloo" and op == "avg" and integer:
        # torch's gloo path divides after the sum in floating point and cannot store the
        # result back; the failure happens inside the work and has been seen to abort the
        # process at the next collective, so it is not probed.
        return f"backend gloo has no integer ReduceOp.AVG ({element_type}): torch divides in floating point"
    if backend == "nccl" and op in BITWISE:
        return "backend nccl has no bitwise reductions (ProcessGroupNCCL maps SUM, PRODUCT, MIN, MAX, AVG, PREMUL_SUM)"
    return None


def _skip_if_gloo_refuses_float_average(element_type: str, device) -> None:
    """gloo builds before torch 2.6 refuse floating AVG up front, before any communication;
    one element tells which build this is. From 2.6 on gloo has AVG, so nothing is probed
    there: an error then is a broken stack and fails the check."""
    if dist.get_backend() != "gloo" or torch.__version__ >= "2.6":
        return
    probe = torch.ones(1, dtype=ELEMENT_TYPES[element_type], device=device)
    try:
        dist.all_reduce(probe, op=dist.ReduceOp.AVG)
    except (RuntimeError, ValueError, TypeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        pytest.skip(f"backend gloo has no ReduceOp.AVG for {element_type}: {message}")


def _largest_root(bound: int, n: int) -> int:
    """The largest a with a**n <= bound: products of n values in [-a, a] stay exact."""
    a = int(round(bound ** (1.0 / n)))
    while a**n > bound:
        a -= 1
    while (a + 1) ** n <= bound:
        a += 1
    return a


def _reduction_inputs(op: str, dtype, world_size: int, count: int, salt: int, device) -> list[torch.Tensor]:
    """Every rank's input for ``op``, chosen so that the reduction is exact in ``dtype``:
    sums within bound / n, products within the n-th root of the bound, averages of
    multiples of n, minima and maxima over the whole exact range, bitwise ops over all bits."""
    if op in BITWISE:
        return [bit_patterns(count, dtype, source=r, salt=salt, device=device) for r in range(world_size)]
    if op == "product":
        a = _largest_root(exact_integer_bound(dtype), world_size)
        low, high = (0 if is_unsigned(dtype) else -a), a
    elif op in ("min", "max"):
        low, high = value_range(dtype)
    elif op == "premul_sum":
        low, high = value_range(dtype, int(PREMUL_FACTOR) * world_size)
    else:
        low, high = value_range(dtype, world_size)
    if op == "avg":  # multiples of n: the mean is an integer however the backend divides
        low, high = -(-low // world_size), high // world_size
    values = [integer_values(count, low, high, source=r, salt=salt, device=device) for r in range(world_size)]
    return [v * world_size for v in values] if op == "avg" else values


def _reduced(op: str, inputs: list[torch.Tensor], world_size: int) -> torch.Tensor:
    stacked = torch.stack(inputs)
    if op in BITWISE:
        combine = {"band": torch.bitwise_and, "bor": torch.bitwise_or, "bxor": torch.bitwise_xor}[op]
        result = inputs[0]
        for other in inputs[1:]:
            result = combine(result, other)
        return result
    if op == "product":
        return math.prod(inputs)
    if op == "min":
        return stacked.amin(dim=0)
    if op == "max":
        return stacked.amax(dim=0)
    total = stacked.sum(dim=0)
    if op == "avg":
        return total // world_size
    return total * int(PREMUL_FACTOR) if op == "premul_sum" else total


def _element_type_param(element_type: str, record) -> torch.dtype:
    record("dtype", element_type)  # integer dtypes are outside the dtype marker: the plugin cannot attach them
    return ELEMENT_TYPES[element_type]


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize(("element_type", "op"), REDUCTION_CASES, ids=[f"{e}-{o}" for e, o in REDUCTION_CASES])
def test_all_reduce(element_type, op, rank, world_size, device, record):
    """all_reduce with every ReduceOp the backend supports (SUM, AVG, PRODUCT, MIN, MAX,
    PREMUL_SUM; BAND, BOR, BXOR on integers): #wrong == 0 on every rank at every size."""
    lacking = _backend_lacks(op, element_type)
    if lacking:
        pytest.skip(lacking)
    if op == "avg" and element_type in FLOATING:
        _skip_if_gloo_refuses_float_average(element_type, device)
    dtype = _element_type_param(element_type, record)

    def run_once(count, salt, async_op):
        inputs = _reduction_inputs(op, dtype, world_size, count, salt, device)
        buffer = inputs[rank].to(dtype, copy=True)  # int64 and bitwise inputs are already dtype
        finish(dist.all_reduce(buffer, op=_reduce_op(op), async_op=async_op), async_op)
        yield buffer, _reduced(op, inputs, world_size).to(dtype), ""

    verify_every_size(f"all_reduce({op})", run_once, element_type, rank, world_size, device, record)
    if op == "sum":

        def make_run(count):
            scratch = torch.zeros(count, dtype=dtype, device=device)
            return (lambda: dist.all_reduce(scratch)), count * dtype.itemsize

        record_bandwidth(make_run, "all_reduce", element_type, device, world_size, record)


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_broadcast(element_type, rank, world_size, device, record):
    """broadcast from every root in turn: receivers start with their own different data, so
    a rank that never received is caught."""
    dtype = _element_type_param(element_type, record)
    low, high = value_range(dtype)

    def run_once(count, salt, async_op):
        for root in range(world_size):
            sent = integer_values(count, low, high, source=root, salt=salt, device=device).to(dtype)
            buffer = (
                sent.clone()
                if rank == root
                else integer_values(count, low, high, source=world_size + rank, salt=salt, device=device).to(dtype)
            )
            finish(dist.broadcast(buffer, src=root, async_op=async_op), async_op)
            yield buffer, sent, f"(root={root})"

    verify_every_size("broadcast", run_once, element_type, rank, world_size, device, record)

    def make_run(count):
        scratch = torch.zeros(count, dtype=dtype, device=device)
        return (lambda: dist.broadcast(scratch, src=0)), count * dtype.itemsize

    record_bandwidth(make_run, "broadcast", element_type, device, world_size, record)


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_all_gather(element_type, rank, world_size, device, record):
    """all_gather into one tensor and into a list of tensors: every rank gets every rank's
    block, in rank order."""
    dtype = _element_type_param(element_type, record)
    low, high = value_range(dtype)
    gather = all_gather_single()

    def run_once(count, salt, async_op):
        blocks = [
            integer_values(count, low, high, source=r, salt=salt, device=device).to(dtype) for r in range(world_size)
        ]
        output = torch.empty(world_size * count, dtype=dtype, device=device)
        finish(gather(output, blocks[rank], async_op=async_op), async_op)
        yield output, torch.cat(blocks), " (tensor form)"
        slots = [torch.empty(count, dtype=dtype, device=device) for _ in range(world_size)]
        finish(dist.all_gather(slots, blocks[rank], async_op=async_op), async_op)
        yield torch.cat(slots), torch.cat(blocks), " (list form)"

    verify_every_size("all_gather", run_once, element_type, rank, world_size, device, record)

    def make_run(count):
        mine = torch.zeros(count, dtype=dtype, device=device)
        output = torch.empty(world_size * count, dtype=dtype, device=device)
        return (lambda: gather(output, mine)), output.numel() * dtype.itemsize

    record_bandwidth(make_run, "all_gather", element_type, device, world_size, record)


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_reduce_scatter(element_type, rank, world_size, device, record):
    """reduce_scatter(sum) from one tensor and from a list: rank r gets the sum of every
    rank's r-th block."""
    dtype = _element_type_param(element_type, record)
    low, high = value_range(dtype, world_size)
    scatter = reduce_scatter_single()

    def run_once(count, salt, async_op):
        inputs = [
            integer_values(world_size * count, low, high, source=r, salt=salt, device=device) for r in range(world_size)
        ]
        expected = sum(inputs)[rank * count : (rank + 1) * count].to(dtype)
        mine = inputs[rank].to(dtype, copy=True)
        output = torch.empty(count, dtype=dtype, device=device)
        finish(scatter(output, mine, async_op=async_op), async_op)
        yield output, expected, "(sum, tensor form)"
        output = torch.empty(count, dtype=dtype, device=device)
        finish(dist.reduce_scatter(output, list(mine.chunk(world_size)), async_op=async_op), async_op)
        yield output, expected, "(sum, list form)"

    verify_every_size(
        "reduce_scatter(sum)", run_once, element_type, rank, world_size, device, record, described_as="reduce_scatter"
    )

    def make_run(count):
        source = torch.zeros(world_size * count, dtype=dtype, device=device)
        output = torch.empty(count, dtype=dtype, device=device)
        return (lambda: scatter(output, source)), source.numel() * dtype.itemsize

    record_bandwidth(make_run, "reduce_scatter", element_type, device, world_size, record)
