"""DDP conformance: data-parallel training is the single-process training it claims to be.

PyTorch's own test (distributed_test.py ``_test_DDP_niter``) checks it on PyTorch's CI;
here it is checked on this node's stack, in every bucket and graph configuration, with
tied weights, with gradient accumulation under ``no_sync``, with gradient clipping after
the averaging, under autocast and over checkpointed blocks. How the comparison works is in
_ddp_training.py; DDP's other promises (initial state, buffers, uneven inputs, comm hooks,
SyncBatchNorm) have modules of their own.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from pytest_gpuconform.checks import (
    gather_float,
    not_close,
    raise_if_any,
    relative_l2,
    same_on_all_ranks,
    summarize_problems,
    too_far,
    true_fp32,
)

from ._ddp_training import (
    LEARNING_RATE,
    PROBLEM_KINDS,
    batches,
    compare_with_reference,
    ddp,
    fp32_judge,
    model,
    record_tolerance_used,
    slicer,
    train,
)
from ._dist_models import TiedMLP, seeded_model

# name: (DDP options, model factory)
CONFIGS = {
    "default": ({}, None),
    "tiny_buckets": ({"bucket_cap_mb": 0.001}, None),  # ~1 KiB: a bucket per parameter, many all_reduces
    "grad_as_bucket_view": ({"gradient_as_bucket_view": True}, None),
    "static_graph": ({"static_graph": True}, None),
    "find_unused_parameters": ({"find_unused_parameters": True}, None),
    "tied_weights": ({}, TiedMLP),
}


def _config_model(config, device):
    factory = CONFIGS[config][1]
    return model(device) if factory is None else seeded_model(factory, device=device)


@pytest.mark.world_size(2, 4)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_ddp_matches_single_process(config, rank, world_size, device, tolerance, record):
    """k SGD steps of DDP on per-rank slices == one process on the full batch (fp32 table
    tolerance), params bitwise equal across ranks after every step, and every bucket /
    graph option gives the default configuration's result."""
    options, factory = CONFIGS[config]
    ddp_model = ddp(_config_model(config, device), device, **options)
    judge = fp32_judge(tolerance)
    problems, largest, ours = compare_with_reference(
        ddp_model, _config_model(config, device), judge, rank, world_size, device, record=record
    )
    if config != "default" and factory is None:
        theirs = list(train(ddp(model(device), device), batches(world_size, device), slicer(rank, world_size), device))[
            -1
        ][1]
        for name in theirs:
            found = not_close(
                ours[name],
                theirs[name],
                tolerance.rtol,
                tolerance.atol,
                f"final param {name!r} with {config} vs default DDP",
            )
            if found:
                problems.append(found)
    record("max_abs_diff_vs_single_process", max(gather_float(largest, world_size)))
    record_tolerance_used(judge, world_size, record)
    raise_if_any(summarize_problems(problems, kinds=PROBLEM_KINDS), rank, world_size, f"DDP({config})")


def _grads(module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.world_size(2)
def test_ddp_no_sync_accumulates(rank, world_size, device, tolerance, record):
    """Gradient accumulation with ``no_sync``: after the local backward the gradients are
    this rank's own (no communication happened); after the next synced backward they equal
    the single process's gradients accumulated over both full batches; the optimizer step
    that follows gives the single process's parameters, bitwise equal on every rank."""
    judge = fp32_judge(tolerance)
    with true_fp32(device, record):  # TF32 off on both sides (recorded as tf32)
        (xa, ya), (xb, yb) = batches(world_size, device)[:2]
        take = slicer(rank, world_size)

        reference = model(device)
        F.mse_loss(reference(take(xa)), take(ya)).backward()
        local_only = _grads(reference)
        reference.zero_grad()
        F.mse_loss(reference(xa), ya).backward()
        F.mse_loss(reference(xb), yb).backward()
        accumulated = _grads(reference)
        torch.optim.SGD(reference.parameters(), lr=LEARNING_RATE).step()

        ddp_model = ddp(model(device), device)
        with ddp_model.no_sync():
            F.mse_loss(ddp_model(take(xa)), take(ya)).backward()
        problems, largest = [], 0.0
        for name, p in ddp_model.module.named_parameters():
            found = judge(p.grad, local_only[name], f"grad {name!r} after no_sync backward vs this rank's local grad")
            problems.extend([found] if found else [])
        F.mse_loss(ddp_model(take(xb)), take(yb)).backward()
        for name, p in ddp_model.module.named_parameters():
            largest = max(largest, (p.grad - accumulated[name]).abs().max().item())
            found = judge(p.grad, accumulated[name], f"grad {name!r} after synced backward vs full-batch accumulated")
            across = same_on_all_ranks(p.grad, f"accumulated grad {name!r}", rank, world_size)
            problems.extend(f for f in (found, across) if f)
        torch.optim.SGD(ddp_model.parameters(), lr=LEARNING_RATE).step()
        for (name, p), want in zip(ddp_model.module.named_parameters(), reference.parameters(), strict=True):
            found = judge(p, want, f"param {name!r} after the synced step vs single process")
            across = same_on_all_ranks(p.detach(), f"param {name!r} after the synced step", rank, world_size)
            problems.extend(f for f in (found, across) if f)
    record("max_abs_diff_vs_single_process", max(gather_float(largest, world_size)))
    record_tolerance_used(judge, world_size, record)
    raise_if_any(summarize_problems(problems, kinds=PROBLEM_KINDS), rank, world_size, "DDP no_sync accumulation")


MAX_NORM = 0.05  # below every step's gradient norm of the check's model: clipping always acts


@pytest.mark.world_size(2, 4)
@pytest.mark.parametrize("foreach", [False, True], ids=["for_loop", "foreach"])
def test_ddp_clip_grad_norm(foreach, rank, world_size, device, tolerance, record):
    """clip_grad_norm_ after DDP's averaging (for-loop and foreach implementations): the
    total norm it returns is bitwise the same on every rank and equals the single process's
    (fp32 table tolerance); the clipped gradients and the parameters after each step equal
    the single process's and are bitwise equal across ranks."""
    norms: dict[bool, list] = {False: [], True: []}

    def clip(trained):
        total = torch.nn.utils.clip_grad_norm_(trained.parameters(), MAX_NORM, foreach=foreach)
        norms[isinstance(trained, DistributedDataParallel)].append(total.detach().clone())

    judge = fp32_judge(tolerance)
    problems, largest, _ = compare_with_reference(
        ddp(model(device), device), model(device), judge, rank, world_size, device, before_step=clip, record=record
    )
    norm_problems = []  # shown first: the norm is what this check adds to DDP's parity
    for step, (mine, reference) in enumerate(zip(norms[True], norms[False], strict=True), start=1):
        if not reference.item() > MAX_NORM:
            norm_problems.append(
                f"step {step}: reference total norm {reference.item():.4g} <= max_norm {MAX_NORM}: "
                "clipping did not act, the check proves nothing"
            )
        found = judge(mine, reference, f"step {step} total norm vs single process")
        across = same_on_all_ranks(mine, f"step {step} total norm", rank, world_size)
        norm_problems.extend(f for f in (found, across) if f)
    problems = norm_problems + problems
    record("total_norm_step1", norms[True][0].item() if norms[True] else float("nan"))
    record("max_abs_diff_vs_single_process", max(gather_float(largest, world_size)))
    record_tolerance_used(judge, world_size, record)
    raise_if_any(
        summarize_problems(problems, kinds=PROBLEM_KINDS), rank, world_size, f"DDP + clip_grad_norm_(foreach={foreach})"
    )


@pytest.mark.world_size(2)
@pytest.mark.dtype("bf16", "fp16")
def test_ddp_with_autocast(dtype, rank, world_size, device, tolerance, record):
    """DDP + autocast == one process + autocast on the full batch, within the rel_l2 of
    the autocast dtype's row (the low-precision matmuls see different batch shapes)."""
    worst = [0.0]

    def judge(got, want, what):
        worst[0] = max(worst[0], relative_l2(got, want))
        return too_far(got, want, tolerance.rel_l2, what)

    problems, _, _ = compare_with_reference(
        ddp(model(device), device), model(device), judge, rank, world_size, device, autocast_dtype=dtype, record=record
    )
    record("max_rel_l2_vs_single_process", max(gather_float(worst[0], world_size)))
    record("bound_rel_l2", tolerance.rel_l2)
    raise_if_any(summarize_problems(problems, kinds=PROBLEM_KINDS), rank, world_size, f"DDP + autocast({dtype})")


@pytest.mark.world_size(2)
@pytest.mark.parametrize("recompute", ["non_reentrant", "reentrant"])
def test_ddp_with_checkpointing(recompute, rank, world_size, device, tolerance, record):
    """DDP over a model with an activation-checkpointed block == the same model in one
    process (fp32 table tolerance); the recomputation must not add or lose gradient
    contributions in DDP's reducer."""
    judge = fp32_judge(tolerance)
    problems, largest, _ = compare_with_reference(
        ddp(model(device, recompute), device), model(device, recompute), judge, rank, world_size, device, record=record
    )
    record("max_abs_diff_vs_single_process", max(gather_float(largest, world_size)))
    record_tolerance_used(judge, world_size, record)
    raise_if_any(summarize_problems(problems, kinds=PROBLEM_KINDS), rank, world_size, f"DDP + checkpoint({recompute})")
