"""DDP with uneven inputs under ``join()``: training finishes, and finishes right.

When ranks get different numbers of batches (the last, short shard of a dataset), a rank
that runs out stops calling backward and the others would wait for it forever. Inside
``model.join()`` a finished rank keeps shadowing the others' all_reduces with zeros, so the
averaged gradient of step i is the sum over the ranks that still have data, divided by the
initial world size (``divide_by_initial_world_size=True``, the default) or by the number of
ranks still active (False); when the last rank is done, its model is broadcast to all.

Rank r gets 2 + r batches. The single-process reference trains on exactly that: at step i,
the mean losses of the active ranks' slices, summed and divided as DDP divides. Every rank
must end with the reference's parameters (fp32 table tolerance), bitwise equal to rank 0's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pytest_gpuconform.checks import raise_if_any, same_on_all_ranks, summarize_problems

from ._ddp_training import LEARNING_RATE, PROBLEM_KINDS, batches, ddp, fp32_judge, model, record_tolerance_used, slicer
from ._dist_models import rank_slice

BASE_BATCHES = 2


def _batch_count(rank: int) -> int:
    return BASE_BATCHES + rank


def _reference(world_size, data, divide_by_initial, device):
    """The single process on what every rank trains on, step by step; returns the
    parameters after every step."""
    reference = model(device)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LEARNING_RATE)
    after = []
    for step, (x, y) in enumerate(data):
        active = [r for r in range(world_size) if step < _batch_count(r)]
        divisor = world_size if divide_by_initial else len(active)
        loss = sum(F.mse_loss(reference(rank_slice(x, r, world_size)), rank_slice(y, r, world_size)) for r in active)
        (loss / divisor).backward()
        optimizer.step()
        optimizer.zero_grad()
        after.append({n: p.detach().clone() for n, p in reference.named_parameters()})
    return after


@pytest.mark.world_size(2, 4)
@pytest.mark.parametrize("divide_by", ["initial_world_size", "active_ranks"])
def test_ddp_join_uneven_inputs(divide_by, rank, world_size, device, tolerance, record):
    """Rank r trains on 2 + r batches inside ``join()``: while it has data its parameters
    follow the reference step by step; after join every rank holds the reference's final
    parameters, bitwise equal across ranks."""
    divide_by_initial = divide_by == "initial_world_size"
    data = batches(world_size, device, steps=_batch_count(world_size - 1))
    expected = _reference(world_size, data, divide_by_initial, device)
    judge = fp32_judge(tolerance)
    wrapped = ddp(model(device), device)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=LEARNING_RATE)
    take = slicer(rank, world_size)
    problems = []
    with wrapped.join(divide_by_initial_world_size=divide_by_initial):
        for step, (x, y) in enumerate(data[: _batch_count(rank)]):
            F.mse_loss(wrapped(take(x)), take(y)).backward()
            optimizer.step()
            optimizer.zero_grad()
            for name, p in wrapped.module.named_parameters():
                found = judge(p, expected[step][name], f"step {step + 1} param {name!r} vs single process")
                problems.extend([found] if found else [])
    for name, p in wrapped.module.named_parameters():
        found = judge(p, expected[-1][name], f"param {name!r} after join vs single process's final")
        across = same_on_all_ranks(p.detach(), f"param {name!r} after join", rank, world_size)
        problems.extend(f for f in (found, across) if f)
    record_tolerance_used(judge, world_size, record)
    raise_if_any(
        summarize_problems(problems, kinds=PROBLEM_KINDS),
        rank,
        world_size,
        f"DDP join (divide by {divide_by.replace('_', ' ')})",
    )
