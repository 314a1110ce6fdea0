"""SyncBatchNorm on per-rank slices is BatchNorm on the whole batch.

With small per-GPU batches (detection, segmentation, video) plain BatchNorm normalises
each rank's slice by its own statistics; SyncBatchNorm all-reduces the statistics so every
rank normalises by the global batch's, in forward and in backward. The check trains a
converted model under DDP on slices and a plain BatchNorm model on the whole batch in one
process: outputs (this rank's slice of the full output), running mean and variance,
gradients and parameters must agree within the fp32 table tolerance at every step, and
parameters and running statistics must be bitwise equal across ranks.

SyncBatchNorm exists for GPUs only (torch has no CPU kernels for ``batch_norm_stats`` and
friends), so the check is GPU-only and CPU nodes do not list it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_gpuconform.checks import raise_if_any, same_on_all_ranks, summarize_problems, true_fp32

from ._ddp_training import LEARNING_RATE, PROBLEM_KINDS, batches, ddp, fp32_judge, record_tolerance_used, slicer
from ._dist_models import FEATURES, HIDDEN, OUTPUTS, seeded_model

STEPS = 3


class NormalisedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, HIDDEN)
        self.norm = nn.BatchNorm1d(HIDDEN)
        self.head = nn.Linear(HIDDEN, OUTPUTS)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.embed(x))))


def _compare_state(problems, judge, mine, reference, step, rank, world_size):
    for name, tensor in reference.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        got = mine.state_dict()[name]
        found = judge(got, tensor, f"step {step} {name!r} vs single process")
        across = same_on_all_ranks(got.detach().clone(), f"step {step} {name!r}", rank, world_size)
        problems.extend(f for f in (found, across) if f)


@pytest.mark.gpu
@pytest.mark.world_size(2, 4)
def test_sync_batchnorm_matches_full_batch(rank, world_size, device, tolerance, record):
    """SyncBatchNorm + DDP on slices == BatchNorm on the full batch in one process:
    outputs, running statistics, gradients and parameters at every step."""
    judge = fp32_judge(tolerance)
    take = slicer(rank, world_size)
    problems = []
    with true_fp32(device):
        reference = seeded_model(NormalisedMLP, device=device)
        synced = ddp(nn.SyncBatchNorm.convert_sync_batchnorm(seeded_model(NormalisedMLP, device=device)), device)
        optimizers = [torch.optim.SGD(m.parameters(), lr=LEARNING_RATE) for m in (reference, synced)]
        for step, (x, y) in enumerate(batches(world_size, device, steps=STEPS), start=1):
            full = reference(x)
            F.mse_loss(full, y).backward()
            out = synced(take(x))
            F.mse_loss(out, take(y)).backward()
            found = judge(out, take(full), f"step {step} output (this rank's slice) vs single process")
            problems.extend([found] if found else [])
            for (name, p), want in zip(synced.module.named_parameters(), reference.parameters(), strict=True):
                found = judge(p.grad, want.grad, f"step {step} grad {name!r} vs single process")
                problems.extend([found] if found else [])
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
            _compare_state(problems, judge, synced.module, reference, step, rank, world_size)
    record_tolerance_used(judge, world_size, record)
    raise_if_any(
        summarize_problems(problems, kinds=PROBLEM_KINDS), rank, world_size, "SyncBatchNorm vs full-batch BatchNorm"
    )
