"""all_to_all and all_to_all_single: every rank sends a different block to every rank.

Mixture-of-experts layers route tokens with exactly these calls, and the number of tokens
a rank sends to an expert changes every step, including none at all. So besides equal
splits the check uses uneven ones with empty blocks: a backend that mixes up the offsets of
uneven splits, or mishandles an empty one, delivers other ranks' tokens to the wrong place.
Each block's content names its sender and receiver, so a misrouted block is caught.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ._collective_cases import (
    ELEMENT_TYPES,
    WORLD_SIZES,
    finish,
    record_bandwidth,
    routed_block,
    split_size,
    verify_every_size,
)

SPLITS = ("even", "uneven")


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_all_to_all_single(element_type, splits, rank, world_size, device, record):
    """all_to_all_single with equal splits and with uneven ones (empty blocks included):
    rank r's output is every rank's block for r, in sender order."""
    dtype = ELEMENT_TYPES[element_type]
    record("dtype", element_type)

    def run_once(count, salt, async_op):
        sends = [routed_block(count, rank, peer, world_size, dtype, salt, device, splits) for peer in range(world_size)]
        expected = torch.cat(
            [routed_block(count, peer, rank, world_size, dtype, salt, device, splits) for peer in range(world_size)]
        )
        output = torch.empty(expected.numel(), dtype=dtype, device=device)
        sizes = (
            {}
            if splits == "even"
            else {
                "input_split_sizes": [b.numel() for b in sends],
                "output_split_sizes": [split_size(count, peer, rank, splits) for peer in range(world_size)],
            }
        )
        finish(dist.all_to_all_single(output, torch.cat(sends), async_op=async_op, **sizes), async_op)
        yield output, expected, f"({splits} splits)"

    verify_every_size(
        f"all_to_all_single({splits})",
        run_once,
        element_type,
        rank,
        world_size,
        device,
        record,
        described_as="all_to_all_single",
    )
    if splits == "even":

        def make_run(count):
            source = torch.zeros(world_size * count, dtype=dtype, device=device)
            output = torch.empty_like(source)
            return (lambda: dist.all_to_all_single(output, source)), source.numel() * dtype.itemsize

        record_bandwidth(make_run, "all_to_all", element_type, device, world_size, record)


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("element_type", list(ELEMENT_TYPES))
def test_all_to_all(element_type, splits, rank, world_size, device, record):
    """all_to_all over lists of tensors, of equal lengths and of different ones (empty
    ones included): slot p of rank r's output list is exactly what rank p put in slot r."""
    if splits == "uneven" and dist.get_backend() == "gloo":
        pytest.skip(
            "backend gloo's all_to_all takes equal-sized tensors only (ProcessGroupGloo::alltoall); "
            "uneven splits on gloo are checked through all_to_all_single"
        )
    dtype = ELEMENT_TYPES[element_type]
    record("dtype", element_type)

    def run_once(count, salt, async_op):
        sends = [routed_block(count, rank, peer, world_size, dtype, salt, device, splits) for peer in range(world_size)]
        expected = [
            routed_block(count, peer, rank, world_size, dtype, salt, device, splits) for peer in range(world_size)
        ]
        slots = [torch.empty_like(e) for e in expected]
        finish(dist.all_to_all(slots, sends, async_op=async_op), async_op)
        for peer, (got, want) in enumerate(zip(slots, expected, strict=True)):
            yield got, want, f"(list form, {splits} splits, slot {peer})"

    verify_every_size(
        f"all_to_all({splits})", run_once, element_type, rank, world_size, device, record, described_as="all_to_all"
    )
