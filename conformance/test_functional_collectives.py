"""Functional collectives, the path DTensor, tensor parallelism and torch.compile take.

``torch.distributed._functional_collectives`` returns a new tensor instead of writing in
place, and returns it before the communication is done (an ``AsyncCollectiveTensor``):
the wait happens at ``wait_tensor`` or implicitly at the result's first use. DTensor's
redistributions (shard <-> replicate along any tensor dimension) and compiled graphs call
these ops, not the in-place c10d API the other modules check, and they run through a
different dispatcher path (``_c10d_functional`` ops). So the same exactness is demanded
here: every op, both wait styles, gathers and scatters along dim 0 and dim 1, uneven
all-to-all, a group given as a ProcessGroup and as a group name, and the autograd variants
whose backward is the dual collective (all_gather's gradient is a reduce_scatter).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pytest_gpuconform.checks import integer_values, value_range

from ._collective_cases import ELEMENT_TYPES, WORLD_SIZES, routed_block, split_size, verify_every_size

BLOCKING_ONLY = (False,)


def _funcol():
    try:
        import torch.distributed._functional_collectives as funcol
    except ImportError as exc:  # pragma: no cover - every torch the plugin supports has it
        pytest.skip(f"torch.distributed._functional_collectives unavailable: {exc}")
    return funcol


def _op(funcol, new: str, old: str):
    """The non-deprecated name where this torch has it (2.13 renamed *_tensor to *_single)."""
    return getattr(funcol, new, None) or getattr(funcol, old)


def _values(shape, dtype, source, salt, device, divisor=1):
    low, high = value_range(dtype, divisor)
    count = 1
    for n in shape:
        count *= n
    return integer_values(count, low, high, source=source, salt=salt, device=device).to(dtype).reshape(shape)


def _matrix(count: int) -> tuple[int, int]:
    """A 2-D shape of about ``count`` elements, for collectives along dim 1."""
    rows = 4 if count >= 4 else 1
    return rows, count // rows


def _waited(funcol, result, explicit: bool):
    """The collective's value, awaited either way user code does: ``wait_tensor``, or
    simply using the result (its first use waits)."""
    return funcol.wait_tensor(result) if explicit else result + 0


def _reductions(funcol, group, dtype, rank, world_size, count, salt, device):
    inputs = [_values((count,), dtype, r, salt, device, world_size) for r in range(world_size)]
    expected = {
        "sum": sum(i.to(torch.int64) for i in inputs).to(dtype),
        "max": torch.stack(inputs).amax(dim=0),
        "min": torch.stack(inputs).amin(dim=0),
    }
    for op, want in expected.items():
        for explicit in (True, False):
            got = _waited(funcol, funcol.all_reduce(inputs[rank], op, group), explicit)
            yield got, want, f".all_reduce({op}, {'wait_tensor' if explicit else 'first use waits'})"
    by_name = funcol.all_reduce(inputs[rank], "sum", dist.group.WORLD.group_name)
    yield funcol.wait_tensor(by_name), expected["sum"], ".all_reduce(sum, group given by name)"
    pair = funcol.all_reduce_coalesced([inputs[rank], inputs[rank][:1]], "sum", group)
    yield funcol.wait_tensor(pair[0]), expected["sum"], ".all_reduce_coalesced tensor 0"
    yield funcol.wait_tensor(pair[1]), expected["sum"][:1], ".all_reduce_coalesced tensor 1"


def _gathers_and_scatters(funcol, group, dtype, rank, world_size, count, salt, device):
    all_gather = _op(funcol, "all_gather_single", "all_gather_tensor")
    reduce_scatter = _op(funcol, "reduce_scatter_single", "reduce_scatter_tensor")
    shape = _matrix(count)
    for dim in (0, 1):
        blocks = [_values(shape, dtype, r, salt + dim, device) for r in range(world_size)]
        got = funcol.wait_tensor(all_gather(blocks[rank], dim, group))
        yield got, torch.cat(blocks, dim=dim), f".all_gather_single(gather_dim={dim})"
        wide = (shape[0] * world_size, shape[1]) if dim == 0 else (shape[0], shape[1] * world_size)
        inputs = [_values(wide, dtype, 100 + r, salt + dim, device, world_size) for r in range(world_size)]
        total = sum(i.to(torch.int64) for i in inputs).to(dtype)
        got = funcol.wait_tensor(reduce_scatter(inputs[rank], "sum", dim, group))
        yield got, total.chunk(world_size, dim=dim)[rank], f".reduce_scatter_single(sum, scatter_dim={dim})"
    root = world_size - 1
    sent = _values((count,), dtype, root, salt, device)
    mine = sent if rank == root else _values((count,), dtype, world_size + rank, salt, device)
    yield funcol.wait_tensor(funcol.broadcast(mine, root, group)), sent, f".broadcast(src={root})"
    for splits in ("even", "uneven"):
        sends = [routed_block(count, rank, p, world_size, dtype, salt, device, splits) for p in range(world_size)]
        want = torch.cat(
            [routed_block(count, p, rank, world_size, dtype, salt, device, splits) for p in range(world_size)]
        )
        outs = [split_size(count, p, rank, splits) for p in range(world_size)]
        got = funcol.all_to_all_single(torch.cat(sends), outs, [s.numel() for s in sends], group)
        yield funcol.wait_tensor(got), want, f".all_to_all_single({splits} splits)"


def _autograd(funcol, group, dtype, rank, world_size, count, salt, device):
    """Gradients through the collectives: loss = sum(output * w_r) on rank r, so the
    input's gradient is the dual collective over every rank's w, exact on integers."""
    all_gather = _op(funcol, "all_gather_single_autograd", "all_gather_tensor_autograd")
    reduce_scatter = _op(funcol, "reduce_scatter_single_autograd", "reduce_scatter_tensor_autograd")
    x = _values((count,), dtype, rank, salt, device, world_size).requires_grad_()
    weights = [_values((world_size * count,), dtype, 200 + r, salt, device, world_size) for r in range(world_size)]
    (funcol.wait_tensor(all_gather(x, 0, group)) * weights[rank]).sum().backward()
    summed = sum(w.to(torch.int64) for w in weights).to(dtype)
    yield x.grad, summed[rank * count : (rank + 1) * count], ".all_gather_single_autograd backward (reduce_scatter)"
    x = _values((world_size * count,), dtype, rank, salt, device, world_size).requires_grad_()
    scattered_weights = [w[:count] for w in weights]
    (funcol.wait_tensor(reduce_scatter(x, "sum", 0, group)) * scattered_weights[rank]).sum().backward()
    yield x.grad, torch.cat(scattered_weights), ".reduce_scatter_single_autograd backward (all_gather)"


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_functional_collectives(element_type, rank, world_size, device, record):
    """Every functional collective DTensor uses, exact at every size; for floating dtypes
    also the autograd variants' gradients."""
    funcol = _funcol()
    dtype = ELEMENT_TYPES[element_type]
    record("dtype", element_type)
    group = dist.group.WORLD

    def run_once(count, salt, async_op):
        yield from _reductions(funcol, group, dtype, rank, world_size, count, salt, device)
        yield from _gathers_and_scatters(funcol, group, dtype, rank, world_size, count, salt, device)
        if dtype.is_floating_point:
            yield from _autograd(funcol, group, dtype, rank, world_size, count, salt, device)

    verify_every_size(
        "functional collectives",
        run_once,
        element_type,
        rank,
        world_size,
        device,
        record,
        modes=BLOCKING_ONLY,
        described_as="funcol",
    )
