"""DDP's built-in communication hooks, each within the bound its design implies.

A hook replaces DDP's gradient all_reduce, so a broken one trains silently wrong. Bounds:

* ``allreduce_hook`` averages exactly as DDP does: the fp32 row (rtol/atol), like DDP itself.
* ``fp16_compress_hook`` / ``bf16_compress_hook`` round gradients to the wire dtype: the
  rel_l2 of that dtype's row. bf16 is refused by CPU-only builds (the hook checks the
  build's CUDA and NCCL, not the backend; research section 4.2), which is a skip.
* ``powerSGD_hook`` approximates each gradient matrix M by P Q^T, P an orthonormal basis
  of M Q. A linear layer's weight gradient over a batch of B samples has rank <= B, so
  with ``matrix_approximation_rank`` = the global batch P spans M's columns and P P^T M = M:
  the approximation is exact and only fp32 rounding remains, bounded by the fp32 row's
  rel_l2 (measured ~2e-6 on gloo). The first ``start_powerSGD_iter`` steps are plain
  all_reduce (documented), held to the fp32 rtol/atol like allreduce_hook. Only the first
  compressed step is compared: after it the power iteration's conditioning, not DDP,
  sets the error. Gradients stay bitwise equal across ranks throughout.
"""

from __future__ import annotations

import pytest
from torch import nn

from pytest_gpuconform.checks import gather_float, raise_if_any, relative_l2, summarize_problems, too_far

from ._ddp_training import PROBLEM_KINDS, compare_with_reference, ddp, fp32_judge, model, record_tolerance_used
from ._dist_models import FEATURES, OUTPUTS, seeded_model

HOOKS = ("allreduce", "fp16", "bf16", "powerSGD")
COMPRESSION_HOOKS = {"fp16": "fp16_compress_hook", "bf16": "bf16_compress_hook"}

# PowerSGD: a fixed global batch whose size is the approximation rank; layers wide enough
# that rank-8 factors are smaller than the matrices they replace (so they are compressed).
POWERSGD_GLOBAL_BATCH = 8
POWERSGD_WIDTH = 64
POWERSGD_VANILLA_STEPS = 2


def _register(ddp_model, hook: str):
    """Register ``hook``; returns the step from which its compression applies (None: never)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if hook == "allreduce":
        ddp_model.register_comm_hook(None, default_hooks.allreduce_hook)
    elif hook == "powerSGD":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=POWERSGD_GLOBAL_BATCH,
            start_powerSGD_iter=POWERSGD_VANILLA_STEPS,
            min_compression_rate=1,
            use_error_feedback=True,
            warm_start=False,
            random_seed=0,
        )
        ddp_model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    else:
        try:
            ddp_model.register_comm_hook(None, getattr(default_hooks, COMPRESSION_HOOKS[hook]))
        except (TypeError, RuntimeError) as exc:
            pytest.skip(f"{COMPRESSION_HOOKS[hook]} refused by this build: {str(exc).splitlines()[0]}")


def _powersgd_model(device):
    """Tanh layers (no exact zeros, so every sample adds a rank to the gradient)."""
    return seeded_model(
        lambda: nn.Sequential(
            nn.Linear(FEATURES, POWERSGD_WIDTH),
            nn.Tanh(),
            nn.Linear(POWERSGD_WIDTH, POWERSGD_WIDTH),
            nn.Tanh(),
            nn.Linear(POWERSGD_WIDTH, OUTPUTS),
        ),
        device=device,
    )


class _StepJudge:
    """Tolerance by step: the fp32 rtol/atol before ``switch_step``, rel_l2 from it on."""

    def __init__(self, tolerance, rel_l2_bound: float, switch_step: int | None) -> None:
        self.exact_phase = fp32_judge(tolerance)
        self.bound, self.switch_step = rel_l2_bound, switch_step
        self.worst_rel_l2 = 0.0

    def __call__(self, got, want, what):
        step = int(what.split()[1])
        if self.switch_step is None or step < self.switch_step:
            return self.exact_phase(got, want, what)
        self.worst_rel_l2 = max(self.worst_rel_l2, relative_l2(got, want))
        return too_far(got, want, self.bound, what)


@pytest.mark.world_size(2, 4)
@pytest.mark.parametrize("hook", HOOKS)
def test_ddp_comm_hook(hook, rank, world_size, device, tolerance_table, record):
    """DDP with the hook vs the uncompressed single process: within the hook's bound (see
    the module docstring) and parameters bitwise equal across ranks after every step."""
    fp32 = tolerance_table["fp32"]
    if hook == "powerSGD":
        build, steps = _powersgd_model, POWERSGD_VANILLA_STEPS + 1
        judge = _StepJudge(fp32, fp32.rel_l2, POWERSGD_VANILLA_STEPS + 1)
        local_batch = POWERSGD_GLOBAL_BATCH // world_size
    else:
        build, steps, local_batch = model, None, None
        bound = tolerance_table[hook].rel_l2 if hook in COMPRESSION_HOOKS else None
        judge = _StepJudge(fp32, bound, None if bound is None else 1)
    ddp_model = ddp(build(device), device)
    _register(ddp_model, hook)
    problems, largest, _ = compare_with_reference(
        ddp_model, build(device), judge, rank, world_size, device, steps=steps, local_batch=local_batch, record=record
    )
    record("max_abs_diff_vs_single_process", max(gather_float(largest, world_size)))
    if judge.switch_step is None or hook == "powerSGD":
        record_tolerance_used(judge.exact_phase, world_size, record)
    if judge.switch_step is not None:
        record("max_rel_l2_vs_uncompressed", max(gather_float(judge.worst_rel_l2, world_size)))
        record("bound_rel_l2", judge.bound)
    raise_if_any(summarize_problems(problems, kinds=PROBLEM_KINDS), rank, world_size, f"DDP comm hook {hook}")
