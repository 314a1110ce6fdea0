"""Small models and data for the DDP and pipeline checks, identical in every rank.

Everything is built from explicit seeds (not the process's RNG state), so each rank can
construct the same initial model and the same global batch, and the single-process
reference can run inside every rank without communication. The models are tiny on
purpose: the checks are about how the distributed machinery combines gradients, which
shows as clearly at 16 features as at 16k, and CI runs them on two CPU cores.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

FEATURES = 16
HIDDEN = 32
OUTPUTS = 8


class CheckpointableMLP(nn.Module):
    """input -> Linear -> [Linear, Tanh, Linear] -> ReLU -> head.

    The middle block can be recomputed with activation checkpointing (``reentrant`` or
    ``non_reentrant``); its input already requires grad, which the reentrant variant needs.
    """

    def __init__(self, recompute: str | None = None) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, HIDDEN)
        self.block = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN))
        self.head = nn.Linear(HIDDEN, OUTPUTS)
        self.recompute = recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.recompute is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.recompute == "reentrant")
        return self.head(torch.relu(h))


class TiedMLP(nn.Module):
    """input -> Linear -> mix -> Tanh -> mix_again -> head, where ``mix_again`` shares its
    weight with ``mix`` (module-level tying, as language models tie embedding and head):
    one parameter, two modules, two gradient contributions that DDP must reduce once."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, HIDDEN)
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        self.mix_again = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.mix_again.weight = self.mix.weight
        self.head = nn.Linear(HIDDEN, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix_again(torch.tanh(self.mix(self.embed(x))))))


def seeded_model(factory, seed: int = 1234, device="cpu") -> nn.Module:
    """The same initial weights in every rank and in the reference."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    return model.to(device)


def global_batches(steps: int, global_batch: int, features: int, outputs: int, seed: int, device):
    """``steps`` (input, target) pairs of the full global batch, the same in every rank."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        x = torch.randn(global_batch, features, generator=generator)
        y = torch.randn(global_batch, outputs, generator=generator)
        batches.append((x.to(device), y.to(device)))
    return batches


def rank_slice(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of the global batch (equal shares: DDP's mean of
    per-rank mean losses is then the full batch's mean loss)."""
    share = tensor.shape[0] // world_size
    return tensor[rank * share : (rank + 1) * share]


class SharedWeightChain(nn.Module):
    """x -> x @ W -> tanh -> @ W: one parameter used twice along one path.

    Backward must add both contributions to W's gradient exactly once each; the split
    dW/dX backward of the zero-bubble schedules double-counted one of them
    (pytorch#180952, wrong in 2.11, fixed by 2.13).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight) @ self.weight


class LinearStage(nn.Module):
    """Linear + ReLU: one pipeline stage of a layered model."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


class PipelineBlock(nn.Module):
    """One pipeline stage of the parity checks: Linear + ReLU, then a shared-weight chain,
    so that every stage, under every schedule, has a weight used twice."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = LinearStage(width)
        self.shared = SharedWeightChain(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.layer(x))


def pipeline_blocks(n_blocks: int, width: int, block=PipelineBlock, seed: int = 4321) -> nn.Sequential:
    """The whole model as ``nn.Sequential`` of ``n_blocks`` blocks; stage i is block i."""
    return seeded_model(lambda: nn.Sequential(*[block(width) for _ in range(n_blocks)]), seed=seed)
