"""The small models the checkpointing and AMP checks run, and what each must keep alive.

The models are tiny so the checks take milliseconds, but shaped so that every saved tensor
is known: a block is ``Linear -> GELU -> Linear -> GELU`` on a ``batch x width`` input, and
each of its four ops creates one ``batch x width`` tensor that autograd keeps for backward
(the Linear outputs are saved by the GELUs, the GELU outputs by the next Linear or returned
as the output). Counting in units of that one activation, the analytic sizes below are
exact, which is what lets the memory checks assert bounds rather than "less than".
"""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS_PER_BLOCK = 4


def mlp_block(width: int) -> nn.Sequential:
    block = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
    for linear in (block[0], block[2]):
        # He init keeps activations and gradients at unit scale through many blocks; with
        # nn.Linear's default they shrink ~10x per block and fp16 gradients underflow to 0,
        # where any recompute would compare "equal".
        nn.init.normal_(linear.weight, std=(2.0 / width) ** 0.5)
        nn.init.normal_(linear.bias, std=0.1)
    return block


def mlp_blocks(n_blocks: int, width: int, *, dropout: float = 0.0) -> nn.Sequential:
    """``n_blocks`` blocks in a Sequential (checkpoint_sequential wants one)."""
    blocks = []
    for _ in range(n_blocks):
        block = mlp_block(width)
        if dropout:
            block.insert(2, nn.Dropout(dropout))
        blocks.append(block)
    return nn.Sequential(*blocks)


# -- activation sizes after forward, in units of one batch x width activation -----------------


def plain_units(n_blocks: int) -> int:
    """No checkpointing: every op's output stays alive."""
    return ACTIVATIONS_PER_BLOCK * n_blocks


def per_block_checkpoint_units(n_blocks: int) -> int:
    """Each block checkpointed: only block outputs (the next block's input) stay."""
    return n_blocks


def sequential_checkpoint_units(n_blocks: int, segments: int) -> int:
    """checkpoint_sequential: the first ``segments - 1`` chunks of ``n // segments`` blocks keep
    only their output; the last chunk (all remaining blocks) is not checkpointed."""
    chunk = n_blocks // segments
    last_chunk_blocks = n_blocks - chunk * (segments - 1)
    return (segments - 1) + ACTIVATIONS_PER_BLOCK * last_chunk_blocks


def selective_linear_units(n_blocks: int) -> int:
    """Per-block selective checkpointing that saves the Linear (addmm) outputs: per block the
    two Linear outputs plus the block output; the GELU outputs inside are recomputed."""
    return 3 * n_blocks


def autocast_bytes(n_blocks: int, batch: int, width: int, low_itemsize: int) -> int:
    """Bytes an ``mlp_blocks`` forward keeps under autocast to a 2-byte dtype, from fp32 input.

    Activations are stored in the low dtype; each Linear also keeps its low-precision copy of
    weight and bias (autocast casts them once, and autograd saves the cast weight); the fp32
    input is cast once, by the first Linear.
    """
    activations = ACTIVATIONS_PER_BLOCK * n_blocks * batch * width * low_itemsize
    weight_copies = 2 * n_blocks * (width * width + width) * low_itemsize
    input_copy = batch * width * low_itemsize
    return activations + weight_copies + input_copy


# -- a transformer-like block for autocast numerics ------------------------------------------


class TinyTransformerBlock(nn.Module):
    """Pre-norm attention + MLP with residuals: the op mix (layer_norm, linear, attention with
    softmax, GELU, residual adds in fp32) whose autocast error the tolerance table bounds."""

    def __init__(self, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(w // self.heads)
        attn = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, s, w)
        x = x + self.proj(attn)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyRegressor(nn.Module):
    """TinyTransformerBlock plus a linear head, for a short training run with an MSE loss."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.block = TinyTransformerBlock(width)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x)).squeeze(-1)
