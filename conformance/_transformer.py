"""A tiny decoder-only transformer for the FSDP2, tensor-parallel, compile and DCP checks.

The layout is that of the models these features exist for (Llama, torchtitan): pre-norm
blocks of causal attention with separate q/k/v/o projections and a GELU feed-forward,
residual adds, a final norm and a linear head. Separate projections matter for tensor
parallelism: ColwiseParallel splits each projection's output features, i.e. whole heads,
so a block must take its head count from the width it receives, not from a constant.

It is tiny (width 32, 4 heads, 8 positions) because the checks are about how sharding,
compilation and checkpoint files combine the numbers, which shows at this size as well as
at any other, and CI runs them on two CPU cores. Weights and data come from explicit seeds,
so every rank and the single-process reference build the same model and the same batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

WIDTH = 32
HEAD_DIM = 8  # 4 heads at WIDTH 32: two per rank at world size 2
SEQ = 8
OUTPUTS = 8
BLOCKS = 3
MODEL_SEED = 1234
# Activations a Block keeps for backward, in units of one batch x SEQ x WIDTH tensor: the
# attention norm's output, q, k, v, the attention output, the residual sum, the MLP norm's
# output (1 each), the up projection's and GELU's outputs (4 each), and the block's output
# (the next block's input): 16. Checkpointed, a block keeps only its output.
KEPT_UNITS = {"plain": 16, "checkpointed": 1}


class Attention(nn.Module):
    """Causal multi-head self-attention through ``scaled_dot_product_attention``.

    The projections have no bias, as in Llama: a key bias b shifts every score of a query
    by the same q.b, which softmax ignores, so its gradient is zero in exact arithmetic
    and pure rounding noise in practice, which no relative bound can judge."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(width, width, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1: the heads this rank holds (all of them unless wq/wk/wv are column-sharded).
        q, k, v = (proj(x).view(batch, seq, -1, HEAD_DIM).transpose(1, 2) for proj in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm attention and feed-forward with residuals; ``recompute`` runs the block under
    non-reentrant activation checkpointing (what torchtitan applies per block before FSDP)."""

    def __init__(self, width: int = WIDTH, recompute: bool = False) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(width)
        self.attn = Attention(width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = FeedForward(width)
        self.recompute = recompute

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class TinyLM(nn.Module):
    """``BLOCKS`` blocks, a final norm and a head: the unit FSDP2 shards is a block, the root
    holds the rest."""

    def __init__(self, n_blocks: int = BLOCKS, width: int = WIDTH, recompute: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(width, recompute) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


class FeedForwardStack(nn.Module):
    """Residual feed-forward layers and a head: the smallest model with layers to shard or
    bucket, for the compiled-under-DDP/FSDP checks, where every distinct graph costs
    seconds of compilation on a small CPU."""

    def __init__(self, n_layers: int = 2, width: int = WIDTH) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FeedForward(width) for _ in range(n_layers))
        self.head = nn.Linear(width, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def seeded(factory, device, seed: int = MODEL_SEED) -> nn.Module:
    """The same initial weights in every rank and in the reference, whatever the RNG state.
    LayerNorm starts at weight 1, bias 0; they are randomised too, so that a gradient or a
    shard swapped between them and another parameter cannot go unnoticed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, mean=1.0, std=0.1)
                nn.init.normal_(module.bias, std=0.1)
    return model.to(device)


def tiny_lm(device, n_blocks: int = BLOCKS, recompute: bool = False) -> TinyLM:
    return seeded(lambda: TinyLM(n_blocks, recompute=recompute), device)


def lm_batches(steps: int, global_batch: int, device, seed: int = 99) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` (input, target) pairs of the whole global batch, identical in every rank."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        x = torch.randn(global_batch, SEQ, WIDTH, generator=generator)
        y = torch.randn(global_batch, SEQ, OUTPUTS, generator=generator)
        batches.append((x.to(device), y.to(device)))
    return batches


def lm_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output.float(), target)
