"""Activation checkpointing composed with a parallelism: the same gradients, less kept.

Under FSDP2 the recompute all-gathers a block's parameters again; under tensor parallelism
it re-runs the sharded matmuls and their collectives. Either way the recomputed forward
must equal the first one bit for bit (gradients bitwise equal to the same parallel model
without checkpointing; on CUDA with deterministic algorithms), and the activations must
really be dropped: the bytes kept after forward, as a ratio to the run without
checkpointing in the same process, stay within twice the analytic ratio.
"""

from __future__ import annotations

from pytest_gpuconform.checks import bitwise_reproducible, gather_float, mismatch, raise_if_any, summarize_problems

from ._sharded import local
from ._transformer import BLOCKS, KEPT_UNITS, lm_loss

TAIL_UNITS = 2  # final norm output and head output, kept with and without checkpointing


def kept_ratio_bound(plain_units_per_block: float, n_blocks: int = BLOCKS) -> float:
    """Twice (n x 1 + tail) / (n x plain + tail): a checkpointed block keeps one activation
    unit (its output), a plain one ``plain_units_per_block`` (see _transformer.KEPT_UNITS).
    With one block of three left uncheckpointed the ratio is already ~2x over."""
    checkpointed = n_blocks * KEPT_UNITS["checkpointed"] + TAIL_UNITS
    return 2 * checkpointed / (n_blocks * plain_units_per_block + TAIL_UNITS)


def check_checkpointing_composes(
    build, x, y, bound: float, *, device, memory_meter, rank, world_size, record, check: str
) -> None:
    """``build(recompute)`` gives the parallel model; fail in every rank if gradients differ
    with recompute or the kept-bytes ratio exceeds ``bound``."""
    grads, kept = {}, {}
    with bitwise_reproducible(device):
        for recompute in (False, True):
            model = build(recompute)
            with memory_meter.track(device) as m:
                out = model(x)
                kept[recompute] = m.settled_live_bytes()
                lm_loss(out, y).backward()
            grads[recompute] = {n: local(p.grad).clone() for n, p in model.named_parameters()}
    problems = [
        found
        for name in grads[False]
        if (found := mismatch(grads[True][name], grads[False][name], f"grad {name!r} with checkpointing"))
    ]
    ratio = kept[True] / kept[False]
    record("kept_after_forward_ratio", max(gather_float(ratio, world_size)))
    record("kept_after_forward_ratio_max", bound)
    if ratio > bound:
        problems.append(
            f"checkpointed model keeps {kept[True]} B after forward vs {kept[False]} B without: "
            f"ratio {ratio:.3g} > bound {bound:.3g}"
        )
    raise_if_any(summarize_problems(problems), rank, world_size, check)
