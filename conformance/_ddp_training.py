"""Training DDP and its single-process reference side by side, for the DDP checks.

DDP's promise is that training on per-rank slices of a batch, with gradients averaged by
all_reduce, equals training one model on the whole batch. Each check builds both from the
same seed, trains them on the same global batches (the DDP model on this rank's slice),
and compares gradients and parameters step by step: against the reference with the fp32
row of the tolerance table (the summation order differs; observed on gloo ~1e-8, research
section 4.2), and bitwise against rank 0 (a rank that silently stops syncing drifts apart
without any error: verl#7493, the static_graph + no_sync regression of pytorch#143580).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from pytest_gpuconform.checks import WithinTolerance, gather_float, same_on_all_ranks, true_fp32

from ._dist_models import FEATURES, OUTPUTS, CheckpointableMLP, global_batches, rank_slice, seeded_model

STEPS = 3
LOCAL_BATCH = 4
LEARNING_RATE = 0.1
DATA_SEED = 99


def ddp(model, device, **options) -> DistributedDataParallel:
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **options)


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def train(model, batches, take, device, autocast_dtype=None, before_step=None):
    """SGD on ``take(batch)`` for each batch; yields (grads, params) after every step,
    cloned, keyed by the parameter names of the underlying module. ``before_step(model)``
    runs between backward and the optimizer step (gradient clipping)."""
    module = unwrap(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for x, y in batches:
        with autocast(device, autocast_dtype):
            out = model(take(x))
        F.mse_loss(out.float(), take(y)).backward()
        if before_step is not None:
            before_step(model)
        grads = {n: p.grad.detach().clone() for n, p in module.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        yield grads, {n: p.detach().clone() for n, p in module.named_parameters()}


def batches(world_size, device, steps=STEPS, local_batch=LOCAL_BATCH):
    return global_batches(steps, local_batch * world_size, FEATURES, OUTPUTS, DATA_SEED, device)


def slicer(rank, world_size):
    return lambda t: rank_slice(t, rank, world_size)


def compare_with_reference(
    ddp_model,
    reference_model,
    judge,
    rank,
    world_size,
    device,
    autocast_dtype=None,
    steps=None,
    before_step=None,
    local_batch=None,
    record=None,
) -> tuple[list[str], float, dict]:
    """Train both, compare grads and params step by step with ``judge(got, want, what)``,
    and check parameters are bitwise equal across ranks after every step. Both train with
    TF32 off (``true_fp32``, recorded as ``tf32``): on CUDA an "fp32" run would otherwise
    use TF32 convolutions and put its own error near the bounds it is judged by.
    Returns the problems found, the largest absolute difference seen and the final params."""
    data = batches(world_size, device, steps or STEPS, local_batch or LOCAL_BATCH)
    with true_fp32(device, record):
        reference = list(train(reference_model, data, lambda t: t, device, autocast_dtype, before_step))
        mine = list(train(ddp_model, data, slicer(rank, world_size), device, autocast_dtype, before_step))
    problems, largest, params = [], 0.0, {}
    for step, ((grads, params), (ref_grads, ref_params)) in enumerate(zip(mine, reference, strict=True), start=1):
        for name in ref_grads:
            for kind, got, want in (("grad", grads[name], ref_grads[name]), ("param", params[name], ref_params[name])):
                largest = max(largest, (got.double() - want.double()).abs().max().item())
                found = judge(got, want, f"step {step} {kind} {name!r} vs single process")
                if found:
                    problems.append(found)
            across = same_on_all_ranks(params[name], f"step {step} param {name!r}", rank, world_size)
            if across:
                problems.append(across)
    return problems, largest, params


# The comparisons a DDP check makes; a failure shows the first problem of each, so that
# one loud symptom (every grad off) does not hide a second one (ranks drifting apart).
PROBLEM_KINDS = (
    "total norm",
    "vs default DDP",
    "after no_sync backward",
    "after synced backward",
    "after the synced step",
    "after join",
    "vs single process",
    "bitwise equal to rank 0",
)


def fp32_judge(tolerance) -> WithinTolerance:
    return WithinTolerance(tolerance.rtol, tolerance.atol)


def record_tolerance_used(judge: WithinTolerance, world_size, record) -> None:
    record("tolerance_used", max(gather_float(judge.used, world_size)))
    record("tolerance_used_bound", 1.0)


def model(device, recompute=None):
    return seeded_model(lambda: CheckpointableMLP(recompute), device=device)
