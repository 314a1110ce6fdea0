"""Tensor and sequence parallelism conformance: a sharded block computes the whole block.

``parallelize_module`` splits a block's weights over ranks (Megatron-style): ColwiseParallel
splits a projection's output features (for attention: whole heads), RowwiseParallel its
input features and sums the partial outputs with an all_reduce (or a reduce_scatter along
the sequence under sequence parallelism, where norms and residuals work on sequence shards
and an all_gather restores the full sequence before attention and the MLP). Each rank gets
the same input; outputs, input gradients and every parameter's gradient shard must equal
the single-process block's (upstream's ``test_tp_examples._check_module``). The partial
sums are added in another order than one matmul adds them, so the fp32 row of the
tolerance table bounds the difference (observed on gloo: ~2e-7 on outputs).

Under all of it is DTensor's ``redistribute`` between Shard, Replicate and Partial
placements: on integer-valued data every transition is exact, including uneven shards
(dimension sizes that the world size does not divide).
"""

from __future__ import annotations

import pytest
import torch

from pytest_gpuconform.checks import (
    WithinTolerance,
    gather_float,
    mismatch,
    raise_if_any,
    summarize_problems,
    true_fp32,
)

from ._composed_checkpointing import check_checkpointing_composes, kept_ratio_bound
from ._sharded import compare_sharded, full_tensors, local
from ._transformer import KEPT_UNITS, SEQ, WIDTH, Attention, Block, FeedForward, lm_batches, seeded, tiny_lm

BATCH = 2
DATA_SEED = 5


def _tp():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    return init_device_mesh, parallelize_module, ColwiseParallel, RowwiseParallel, SequenceParallel, PrepareModuleInput


def _plan(kind: str) -> dict:
    """The parallelize_module plan for each module under test, Megatron's layout."""
    from torch.distributed.tensor import Replicate, Shard

    _, _, Colwise, Rowwise, SequenceParallel, PrepareModuleInput = _tp()
    if kind == "mlp":
        return {"up": Colwise(), "down": Rowwise()}
    if kind == "attention":
        return {"wq": Colwise(), "wk": Colwise(), "wv": Colwise(), "wo": Rowwise()}
    if kind == "block":
        return {
            **{f"attn.{k}": v for k, v in _plan("attention").items()},
            **{f"mlp.{k}": v for k, v in _plan("mlp").items()},
        }
    if kind == "sequence_parallel_block":
        # The gathered input stays a DTensor (use_local_output=False): its gradient is a
        # partial sum over the heads (features) each rank computed, which DTensor then
        # reduce-scatters back to sequence shards. Handed on as a plain tensor, that
        # gradient would be taken for replicated and the norms' gradients would be wrong.
        gather = lambda: PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))  # noqa: E731
        return {
            "attn_norm": SequenceParallel(),
            "attn": gather(),
            "attn.wq": Colwise(),
            "attn.wk": Colwise(),
            "attn.wv": Colwise(),
            "attn.wo": Rowwise(output_layouts=Shard(1)),
            "mlp_norm": SequenceParallel(),
            "mlp": gather(),
            "mlp.up": Colwise(),
            "mlp.down": Rowwise(output_layouts=Shard(1)),
        }
    raise ValueError(kind)


MODULES = {"mlp": FeedForward, "attention": Attention, "sequence_parallel_block": Block}


def _seq_share(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of the sequence (dim 1), as SequenceParallel cuts it."""
    return t.chunk(world_size, dim=1)[rank]


@pytest.mark.world_size(2)
@pytest.mark.parametrize("kind", list(MODULES))
def test_tensor_parallel_matches_single_process(kind, rank, world_size, device, tolerance, record):
    """The parallelized module (MLP: colwise up, rowwise down; attention: colwise q/k/v,
    rowwise o, heads split; block with sequence parallel norms) gives the single-process
    output, input gradient and parameter gradients (as this rank's shards), fp32 row."""
    init_device_mesh, parallelize_module, *_ = _tp()
    mesh = init_device_mesh(device.type, (world_size,))
    generator = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(BATCH, SEQ, WIDTH, generator=generator).to(device)
    grad_out = torch.randn(BATCH, SEQ, WIDTH, generator=generator).to(device)
    sequence_parallel = kind == "sequence_parallel_block"
    cut = (lambda t: _seq_share(t, rank, world_size)) if sequence_parallel else (lambda t: t)
    judge = WithinTolerance(tolerance.rtol, tolerance.atol)
    with true_fp32(device):
        reference = seeded(MODULES[kind], device)
        ref_x = x.clone().requires_grad_()
        ref_out = reference(ref_x)
        ref_out.backward(grad_out)
        model = parallelize_module(seeded(MODULES[kind], device), mesh, _plan(kind))
        my_x = cut(x).clone().requires_grad_()
        out = model(my_x)
        local(out).backward(cut(grad_out))
    problems = [
        found
        for found in (
            judge(local(out), cut(ref_out), f"{kind} output"),
            judge(my_x.grad, cut(ref_x.grad), f"{kind} input grad"),
        )
        if found
    ]
    problems += compare_sharded(model, full_tensors(reference, "grad"), "grad", judge, kind)
    sharded = sum(
        1 for p in model.parameters() if hasattr(p, "placements") and any(pl.is_shard() for pl in p.placements)
    )
    if sharded == 0:
        problems.append(f"{kind}: no parameter is sharded after parallelize_module")
    record("tolerance_used", max(gather_float(judge.used, world_size)))
    record("tolerance_used_bound", 1.0)
    raise_if_any(summarize_problems(problems), rank, world_size, f"tensor parallel {kind} vs single process")


@pytest.mark.world_size(2)
def test_tensor_parallel_with_activation_checkpointing(rank, world_size, device, record, memory_meter):
    """Every block tensor-parallel and checkpointed (the recompute re-runs the sharded
    matmuls and their collectives): gradients bitwise equal to TP without checkpointing, and
    fewer bytes kept after forward. Under TP a rank keeps only its share of q, k, v, the
    attention output and the MLP's up/GELU outputs: 4 + 12/N units per plain block."""
    init_device_mesh, parallelize_module, *_ = _tp()
    mesh = init_device_mesh(device.type, (world_size,))
    x, y = lm_batches(1, BATCH, device, seed=DATA_SEED)[0]

    def build(recompute):
        model = tiny_lm(device, recompute=recompute)
        for layer in model.layers:
            parallelize_module(layer, mesh, _plan("block"))
        return model

    sharded_units = 12  # of KEPT_UNITS["plain"]: q, k, v, attention output, up and GELU outputs
    plain = KEPT_UNITS["plain"] - sharded_units + sharded_units / world_size
    check_checkpointing_composes(
        build,
        x,
        y,
        kept_ratio_bound(plain),
        device=device,
        memory_meter=memory_meter,
        rank=rank,
        world_size=world_size,
        record=record,
        check="tensor parallel + activation checkpointing",
    )


# -- DTensor redistribute ----------------------------------------------------------------------

SHAPE = (7, 6)  # 7 rows: uneven shards at world size 2 and 4

# name -> (source placement, target placement); Partial sources hold rank-dependent values
TRANSITIONS = {
    "shard0_to_replicate": ("S0", "R"),  # all_gather
    "shard1_to_replicate": ("S1", "R"),  # all_gather along a non-leading dim
    "replicate_to_shard0": ("R", "S0"),  # local chunk, no communication
    "shard0_to_shard1": ("S0", "S1"),  # all_to_all
    "partial_to_replicate": ("P", "R"),  # all_reduce
    "partial_to_shard0": ("P", "S0"),  # reduce_scatter
    "partial_max_to_replicate": ("Pmax", "R"),  # all_reduce(MAX)
    "shard1_to_shard0": ("S1", "S0"),  # all_to_all the other way
}


def _placement(code: str):
    from torch.distributed.tensor import Partial, Replicate, Shard

    return {"S0": Shard(0), "S1": Shard(1), "R": Replicate(), "P": Partial(), "Pmax": Partial("max")}[code]


def _full_value(world_size: int) -> torch.Tensor:
    """Integer-valued data in [-64, 64), identical in every rank."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    return torch.randint(-64, 64, SHAPE, generator=generator).float()


def _partial_part(full: torch.Tensor, rank: int, world_size: int, op: str) -> torch.Tensor:
    """Rank ``rank``'s addend of a Partial DTensor whose reduction over ranks is ``full``:
    for sum, integer parts that add up to it; for max, ``full`` on one rank per element and
    smaller values elsewhere."""
    if op == "sum":
        parts = [(full * (r + 1) - 3 * r).round() for r in range(world_size - 1)]
        parts.append(full - sum(parts))
        return parts[rank]
    owner = torch.arange(full.numel()).reshape(full.shape) % world_size
    return torch.where(owner == rank, full, full - 1 - rank)


def _expected_local(full: torch.Tensor, code: str, rank: int, world_size: int) -> torch.Tensor:
    """What this rank must hold for placement ``code`` (torch.chunk's split for Shard)."""
    if code in ("S0", "S1"):
        chunks = full.chunk(world_size, dim=int(code[1]))
        return chunks[rank] if rank < len(chunks) else full.narrow(int(code[1]), 0, 0)
    return full


@pytest.mark.world_size(2, 4)
@pytest.mark.parametrize("transition", list(TRANSITIONS))
def test_dtensor_redistribute_exact(transition, rank, world_size, device, record):
    """Redistributing an integer-valued DTensor between placements gives every element
    exactly, on every rank, and has the placement asked for. (Redistributing to Partial is
    internal to DTensor; a Partial source here is built with from_local.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    source, target = TRANSITIONS[transition]
    mesh = init_device_mesh(device.type, (world_size,))
    full = _full_value(world_size).to(device)
    if source.startswith("P"):
        op = "max" if source == "Pmax" else "sum"
        mine = _partial_part(full, rank, world_size, op)
    else:
        mine = _expected_local(full, source, rank, world_size)
    start = DTensor.from_local(
        mine.contiguous(), mesh, [_placement(source)], run_check=False, shape=full.shape, stride=full.stride()
    )
    result = start.redistribute(mesh, [_placement(target)])
    problems = []
    if result.placements != (_placement(target),):
        problems.append(f"placements {result.placements}, expected ({_placement(target)},)")
    got, want = result.to_local(), _expected_local(full, target, rank, world_size)
    found = mismatch(got, want, f"{transition}: local part")
    problems.extend([found] if found else [])
    wrong = int((got != want).sum()) if got.shape == want.shape else got.numel() + want.numel()
    record("elements", full.numel())
    record("wrong_elements", max(gather_float(wrong, world_size)))
    record("wrong_elements_max", 0)
    raise_if_any(summarize_problems(problems), rank, world_size, f"DTensor redistribute {source} -> {target}")
