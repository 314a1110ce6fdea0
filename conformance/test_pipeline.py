"""Pipeline-parallel conformance: every schedule computes the sequential model's step.

A pipeline schedule only reorders work: microbatch forwards and backwards interleave across
stages, weight gradients may be split from input gradients (zero-bubble), stages may sit
on ranks in a loop or a V. The loss, the output and every gradient must still be those of
the unsplit model on the same batch. Upstream checks this only on NCCL with 4+ GPUs
(test_schedule_multiproc.py); here every schedule the installed torch has runs on this
node's backend.

Every stage uses one weight twice (``SharedWeightChain``): the zero-bubble dW/dX split
double-counted such a weight's gradient (pytorch#180952, wrong in 2.11: rel. error 0.72),
so the parity check doubles as the regression test for it.

Losses are means and schedules keep ``scale_grads=True`` (the default users get), so the
reference is the full-batch mean loss. Differences come only from summation order and
are bounded by the fp32 row of the tolerance table (observed on gloo: ~2e-9). On CUDA
both sides run with TF32 off (``true_fp32``, recorded as ``tf32``): microbatches and the
full batch are different GEMM shapes, and with TF32 each would carry a 10-bit-mantissa
error far above that row, whatever a site's default.

Memory: a rank holds only its stages (its peak while stepping is below one process's
peak for the whole model), and 1F1B keeps at most about (stages - rank) microbatches of
activations alive where GPipe keeps all of them, so its peak must be lower.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pytest_gpuconform.checks import WithinTolerance, gather_float, raise_if_any, true_fp32

from ._dist_models import LinearStage, global_batches, pipeline_blocks

WIDTH = 16
MICROBATCH = 2
STEPS = 2
DATA_SEED = 7

# schedule -> (class name in torch.distributed.pipelining, stage placement)
# single: rank r holds stage r. loop: rank r holds stages r, r+W (interleaved schedules).
# v: rank r holds stages r and 2W-1-r (the first and last stage both on rank 0).
SCHEDULES = {
    "GPipe": ("ScheduleGPipe", "single"),
    "1F1B": ("Schedule1F1B", "single"),
    "Interleaved1F1B": ("ScheduleInterleaved1F1B", "loop"),
    "LoopedBFS": ("ScheduleLoopedBFS", "loop"),
    "InterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", "loop"),
    "ZBVZeroBubble": ("ScheduleZBVZeroBubble", "v"),
    "DualPipeV": ("ScheduleDualPipeV", "v"),
}


def _schedule_class(name: str):
    import torch.distributed.pipelining as pipelining

    cls = getattr(pipelining, SCHEDULES[name][0], None)
    if cls is None:
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.pipelining.{SCHEDULES[name][0]}")
    return cls


def _placement(name: str, rank: int, world_size: int) -> tuple[list[int], int]:
    """(stage indices this rank holds, total number of stages)."""
    kind = SCHEDULES[name][1]
    if kind == "single":
        return [rank], world_size
    if kind == "loop":
        return [rank, rank + world_size], 2 * world_size
    return [rank, 2 * world_size - 1 - rank], 2 * world_size


def _microbatches(n_stages: int) -> int:
    # >= the number of stages (1F1B, DualPipeV) and a multiple of the rank count
    # (interleaved schedules: n_mb % max(1, n_mb // pp) == 0).
    return 2 * n_stages


def _data(batch: int, width: int, device):
    return global_batches(STEPS, batch, width, width, DATA_SEED, device)


def _step(schedule, x, y, first: bool, last: bool):
    """One schedule step: inputs only where the first stage lives, targets where the last does."""
    losses: list = []
    args = (x,) if first else ()
    kwargs = {"target": y, "losses": losses} if last else {}
    out = schedule.step(*args, **kwargs)
    return out, losses


def _reference_step(model, x, y):
    model.zero_grad()
    out = model(x)
    loss = F.mse_loss(out, y)
    loss.backward()
    return out.detach(), loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _compare_step(step, out, losses, stage_modules, ref, first_last, close: WithinTolerance) -> list[str]:
    """Output and loss (where the last stage lives) and every gradient this rank holds,
    against the reference. ``stage_modules`` maps the reference's module prefix to the
    stage module holding those parameters."""
    ref_out, ref_loss, ref_grads = ref
    problems = []
    if first_last[1]:
        problems.append(close(out, ref_out, f"step {step} pipeline output"))
        pipe_loss = torch.stack([loss.detach() for loss in losses]).mean()
        problems.append(close(pipe_loss, ref_loss, f"step {step} loss (mean of {len(losses)} microbatch losses)"))
    for prefix, module in stage_modules.items():
        for name, p in module.named_parameters():
            full = f"{prefix}{name}"
            if full not in ref_grads:
                problems.append(f"step {step} parameter {full!r}: not in the model, yet held by this stage")
                continue
            if p.grad is None:
                problems.append(f"step {step} grad {full!r}: None (the whole model's is not)")
                continue
            problems.append(close(p.grad, ref_grads[full], f"step {step} grad {full!r}"))
    return [p for p in problems if p]


def _max_grad_diff(stage_modules, ref_grads) -> float:
    worst = 0.0
    for prefix, module in stage_modules.items():
        for name, p in module.named_parameters():
            if p.grad is not None and f"{prefix}{name}" in ref_grads:
                worst = max(worst, (p.grad - ref_grads[f"{prefix}{name}"]).abs().max().item())
    return worst


@pytest.mark.world_size(2, 4)
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_schedule_matches_sequential(schedule_name, rank, world_size, device, tolerance, record):
    """Hand-built stages (PipelineStage) under each schedule: output, loss and every
    gradient equal the whole model's on the same batch, over two steps."""
    from torch.distributed.pipelining import PipelineStage

    schedule_cls = _schedule_class(schedule_name)
    indices, n_stages = _placement(schedule_name, rank, world_size)
    n_mb = _microbatches(n_stages)
    reference = pipeline_blocks(n_stages, WIDTH).to(device)
    modules = {i: copy.deepcopy(reference[i]) for i in indices}
    stages = [PipelineStage(modules[i], i, n_stages, device) for i in indices]
    if SCHEDULES[schedule_name][1] == "single":
        schedule = schedule_cls(stages[0], n_mb, loss_fn=F.mse_loss)
    else:
        schedule = schedule_cls(stages, n_mb, loss_fn=F.mse_loss)
    first_last = (0 in indices, n_stages - 1 in indices)
    stage_modules = {f"{i}.": modules[i] for i in indices}

    problems, worst, close = [], 0.0, WithinTolerance(tolerance.rtol, tolerance.atol)
    with true_fp32(device, record):
        for step, (x, y) in enumerate(_data(n_mb * MICROBATCH, WIDTH, device), start=1):
            for module in modules.values():
                module.zero_grad()
            out, losses = _step(schedule, x, y, *first_last)
            ref = _reference_step(reference, x, y)
            problems += _compare_step(step, out, losses, stage_modules, ref, first_last, close)
            worst = max(worst, _max_grad_diff(stage_modules, ref[2]))
    record("max_abs_grad_diff_vs_sequential", max(gather_float(worst, world_size)))
    record("tolerance_used", max(gather_float(close.used, world_size)))
    record("tolerance_used_bound", 1.0)
    record("microbatches", n_mb)
    raise_if_any("; ".join(problems[:3]) or None, rank, world_size, f"pipeline {schedule_name}")


@pytest.mark.world_size(2)
@pytest.mark.parametrize("schedule_name", ["GPipe", "1F1B"])
def test_traced_pipeline_matches_sequential(schedule_name, rank, world_size, device, tolerance, record):
    """Stages cut by the tracer (``pipeline`` + ``SplitPoint``): each rank's stage holds
    exactly its slice of the parameters (no more: per-stage memory below the whole model's),
    and the step equals the whole model's."""
    from torch.distributed.pipelining import SplitPoint, pipeline

    schedule_cls = _schedule_class(schedule_name)
    n_stages, n_mb = world_size, _microbatches(world_size)
    reference = pipeline_blocks(n_stages, WIDTH).to(device)
    data = _data(n_mb * MICROBATCH, WIDTH, device)
    split_spec = {str(i): SplitPoint.BEGINNING for i in range(1, n_stages)}
    pipe = pipeline(copy.deepcopy(reference), mb_args=(data[0][0].chunk(n_mb)[0],), split_spec=split_spec)
    stage = pipe.build_stage(rank, device)
    stage_module = pipe.get_stage_module(rank)
    schedule = schedule_cls(stage, n_mb, loss_fn=F.mse_loss)

    held = sum(p.numel() for p in stage_module.parameters())
    slice_numel = sum(p.numel() for p in reference[rank].parameters())
    whole = sum(p.numel() for p in reference.parameters())
    problems = []
    if held != slice_numel or held >= whole:
        problems.append(f"stage {rank} holds {held} parameters; its slice has {slice_numel}, the whole model {whole}")
    first_last = (rank == 0, rank == n_stages - 1)
    worst, close = 0.0, WithinTolerance(tolerance.rtol, tolerance.atol)
    with true_fp32(device, record):
        for step, (x, y) in enumerate(data, start=1):
            stage_module.zero_grad()
            out, losses = _step(schedule, x, y, *first_last)
            ref = _reference_step(reference, x, y)
            # The traced stage keeps the full names ("1.linear.weight"): no prefix needed.
            problems += _compare_step(step, out, losses, {"": stage_module}, ref, first_last, close)
            worst = max(worst, _max_grad_diff({"": stage_module}, ref[2]))
    record("stage_param_ratio", held / whole)
    record("max_abs_grad_diff_vs_sequential", max(gather_float(worst, world_size)))
    record("tolerance_used", max(gather_float(close.used, world_size)))
    record("tolerance_used_bound", 1.0)
    raise_if_any("; ".join(problems[:3]) or None, rank, world_size, f"traced pipeline {schedule_name}")


MEMORY_WIDTH = 128
MEMORY_LAYERS_PER_STAGE = 2
MEMORY_MICROBATCH = 32
MEMORY_MICROBATCHES = 8


def _layered_stage(rank: int, reference) -> torch.nn.Module:
    layers = reference[rank * MEMORY_LAYERS_PER_STAGE : (rank + 1) * MEMORY_LAYERS_PER_STAGE]
    return copy.deepcopy(layers)


@pytest.mark.world_size(2)
def test_pipeline_memory(rank, world_size, device, memory_meter, record):
    """Peak bytes newly allocated while stepping, per rank: GPipe below one process
    stepping the whole model on the same batch, and 1F1B below GPipe (n_mb > stages)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    reference = pipeline_blocks(world_size * MEMORY_LAYERS_PER_STAGE, MEMORY_WIDTH, block=LinearStage).to(device)
    generator = torch.Generator().manual_seed(DATA_SEED)
    batch = MEMORY_MICROBATCH * MEMORY_MICROBATCHES
    x = torch.randn(batch, MEMORY_WIDTH, generator=generator).to(device)
    y = torch.randn(batch, MEMORY_WIDTH, generator=generator).to(device)
    first_last = (rank == 0, rank == world_size - 1)

    peaks = {}
    for name, cls in (("GPipe", ScheduleGPipe), ("1F1B", Schedule1F1B)):
        module = _layered_stage(rank, reference)
        stage = PipelineStage(module, rank, world_size, device)
        schedule = cls(stage, MEMORY_MICROBATCHES, loss_fn=F.mse_loss)
        _step(schedule, x, y, *first_last)  # warm-up: buffers and shapes are set up once
        module.zero_grad(set_to_none=True)
        dist.barrier()
        with memory_meter.track(device) as reading:
            _step(schedule, x, y, *first_last)
        peaks[name] = reading.peak_bytes
    reference.zero_grad(set_to_none=True)
    with memory_meter.track(device) as reading:
        F.mse_loss(reference(x), y).backward()
    peaks["whole"] = reading.peak_bytes

    for key, value in peaks.items():
        record(f"peak_bytes_{key}_rank0", value)
    # Worst rank's ratios; both must stay below 1 (recorded bound; the check is strict <).
    record("peak_1f1b_over_gpipe_ratio", max(gather_float(peaks["1F1B"] / peaks["GPipe"], world_size)))
    record("peak_1f1b_over_gpipe_ratio_bound", 1.0)
    record("peak_stage_over_whole_model_ratio", max(gather_float(peaks["GPipe"] / peaks["whole"], world_size)))
    record("peak_stage_over_whole_model_ratio_bound", 1.0)
    problems = []
    if not peaks["1F1B"] < peaks["GPipe"]:
        problems.append(
            f"1F1B peak {peaks['1F1B']} B >= GPipe peak {peaks['GPipe']} B "
            f"(ratio {peaks['1F1B'] / peaks['GPipe']:.3f}, bound < 1) "
            f"at {MEMORY_MICROBATCHES} microbatches"
        )
    if not peaks["GPipe"] < peaks["whole"]:
        problems.append(
            f"stage peak {peaks['GPipe']} B >= whole-model peak {peaks['whole']} B "
            f"(ratio {peaks['GPipe'] / peaks['whole']:.3f}, bound < 1)"
        )
    raise_if_any("; ".join(problems) or None, rank, world_size, "pipeline memory")
