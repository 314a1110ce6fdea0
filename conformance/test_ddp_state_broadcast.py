"""DDP makes every rank start from rank 0's model and keeps buffers in step as documented.

The parity checks seed every rank identically, so they cannot see DDP's own guarantee for
the usual case, where each rank initialises its model on its own: wrapping broadcasts rank
0's parameters and buffers to every rank, and with ``broadcast_buffers=True`` (the default)
each forward starts by broadcasting rank 0's buffers (BatchNorm running statistics, its
step counter), while ``broadcast_buffers=False`` leaves every rank its own buffers, at
construction too. A rank that missed the broadcast trains a different model from the
first step, with no error.

The BatchNorm here has ``momentum=0``: its forward leaves the running statistics as they
were (only the counter ticks), so what a rank holds after a forward is exactly what the
broadcast gave it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_gpuconform.checks import ExactTally

from ._ddp_training import ddp
from ._dist_models import FEATURES, HIDDEN, OUTPUTS, seeded_model

WORLD_SIZES = (2, 4)


class BatchNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, HIDDEN)
        self.norm = nn.BatchNorm1d(HIDDEN, momentum=0.0)
        self.head = nn.Linear(HIDDEN, OUTPUTS)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.embed(x))))


def _own_model(source: int, device) -> BatchNormMLP:
    """The model rank ``source`` builds on its own: its own seed and its own statistics."""
    built = seeded_model(BatchNormMLP, seed=1000 + source, device=device)
    with torch.no_grad():
        built.norm.running_mean.copy_(torch.arange(HIDDEN, dtype=torch.float32) * 0.25 + source)
        built.norm.running_var.fill_(1.0 + source)
        built.norm.num_batches_tracked.fill_(7 + source)
    return built


def _drift(module: BatchNormMLP, source: int) -> None:
    """What a rank's buffers look like after it trained on its own data for a while."""
    with torch.no_grad():
        module.norm.running_mean.add_(source + 1)
        module.norm.running_var.mul_(source + 2)
        module.norm.num_batches_tracked.fill_(100 * (source + 1))


def _state(module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.mark.world_size(*WORLD_SIZES)
def test_ddp_initial_broadcast(rank, world_size, device, record):
    """Ranks built with different weights and BatchNorm statistics hold exactly rank 0's
    parameters and buffers once wrapped in DDP."""
    tally = ExactTally()
    mine = _own_model(rank, device)
    if rank != 0 and all(
        torch.equal(a, b) for a, b in zip(_state(mine).values(), _state(_own_model(0, device)).values(), strict=True)
    ):
        tally.note(f"rank {rank} built rank 0's model: the check would prove nothing")
    wrapped = ddp(mine, device)
    expected = _state(_own_model(0, device))
    for name, tensor in _state(wrapped.module).items():
        tally.expect(tensor, expected[name], f"{name} after wrapping vs rank 0's initial")
    tally.verdict("DDP initial broadcast", rank, world_size, record)


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("broadcast_buffers", [True, False])
def test_ddp_buffers_at_forward(broadcast_buffers, rank, world_size, device, record):
    """After every rank's buffers drifted apart, a training forward starts from rank 0's
    buffers with ``broadcast_buffers=True``; with False each rank keeps its own (never
    broadcast, not even when wrapped)."""
    tally = ExactTally()
    wrapped = ddp(_own_model(rank, device), device, broadcast_buffers=broadcast_buffers)
    _drift(wrapped.module, rank)
    owner = 0 if broadcast_buffers else rank
    expected = _own_model(owner, device)  # without broadcast_buffers not even wrapping sends buffers
    _drift(expected, owner)
    generator = torch.Generator().manual_seed(rank)
    wrapped(torch.randn(4, FEATURES, generator=generator).to(device)).sum().backward()
    expected.norm.num_batches_tracked.add_(1)  # the forward's own tick
    for name, tensor in expected.named_buffers():
        got = dict(wrapped.module.named_buffers())[name]
        tally.expect(
            got,
            tensor,
            f"{name} after forward (broadcast_buffers={broadcast_buffers}) vs rank {owner}'s drifted buffer",
        )
    tally.verdict(f"DDP buffers at forward (broadcast_buffers={broadcast_buffers})", rank, world_size, record)
