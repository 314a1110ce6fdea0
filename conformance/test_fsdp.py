"""FSDP2 conformance: ``fully_shard`` trains the model one process would, in 1/N of the memory.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps every parameter, gradient and
optimizer state as a dim-0 shard (a DTensor) and all-gathers a block's parameters just for
its forward and backward. Its promise is twofold, and both halves can silently break:

* numerics: per-rank shares of the batch, with gradients reduce-scattered and averaged,
  give the single process's full-batch step. Each rank's shards of the gradients and of
  the parameters after every step are compared with the same shares of the reference's
  full tensors (``_sharded.py``), the loss with the reference's loss. Summation order
  differs, so the fp32 row of the tolerance table bounds it (on gloo ~1% of it is used).
  Under ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` the reference is
  the same recipe in one process (bf16 compute, fp32 master weights and gradients, as
  upstream's ``test_fully_shard_mixed_precision`` does), judged by the bf16 row; and the
  recipe must really be applied: every matmul runs in bf16, and the reduced gradients are
  not bf16-rounded (a reduction in bf16 would be within the bf16 row too).
* memory: parameter + gradient + optimizer-state bytes per rank are 1/N of the full
  model's, and resharding after forward frees the all-gathered parameters (measured in one
  process as bytes kept, against the analytic size of the unsharded parameters).

``reshard_after_forward`` True and False at any world size; an int (resharding to a
smaller group) and HSDP (a 2-D replicate x shard mesh) need 4 ranks. Gradient clipping
over sharded gradients must compute the full model's norm; activation checkpointing per
block must leave gradients bitwise unchanged and keep less memory.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from pytest_gpuconform.checks import (
    WithinTolerance,
    gather_float,
    raise_if_any,
    recorded_ops,
    relative_l2,
    summarize_problems,
    too_far,
    true_fp32,
)

from ._composed_checkpointing import check_checkpointing_composes, kept_ratio_bound
from ._dist_models import rank_slice
from ._sharded import compare_sharded, full_tensors, local
from ._transformer import KEPT_UNITS, lm_batches, lm_loss, tiny_lm

STEPS = 3
LOCAL_BATCH = 2
LEARNING_RATE = 0.1
CLIP_NORM = 0.05  # far below this model's gradient norms (~1.3): clipping acts on every step
# Bytes FSDP may keep besides what the analytic sizes count, as a share of them.
MEMORY_SLACK = 0.05
# Share of gradient elements an fp32 reduction leaves off the bf16 grid at least (an fp32
# sum of two bf16 values needs more than bf16's 8 significant bits about half the time;
# measured ~0.6-0.9 here); a reduction in bf16 leaves none.
NOT_ROUNDED_MIN = 0.1


def _fsdp_api():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no public FSDP2 (torch.distributed.fsdp.fully_shard, 2.6+)")
    return fully_shard, MixedPrecisionPolicy


def _mesh(device, world_size, shape=None, names=None):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, shape or (world_size,), mesh_dim_names=names)


def sharded_lm(device, mesh, recompute: bool = False, **options):
    """``tiny_lm`` with ``fully_shard`` on every block and on the root (torchtitan's layout)."""
    fully_shard, _ = _fsdp_api()
    model = tiny_lm(device, recompute=recompute)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return model


def _batches(world_size, device, steps=STEPS):
    return lm_batches(steps, LOCAL_BATCH * world_size, device)


def _take(rank, world_size):
    return lambda t: rank_slice(t, rank, world_size)


def _fp32_reference_step(reference, x, y) -> float:
    loss = lm_loss(reference(x), y)
    loss.backward()
    return loss.item()


def _as_float(norm) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _train_against_reference(
    model,
    reference,
    batches,
    take,
    judge,
    reference_step=_fp32_reference_step,
    clip=None,
    around_model=contextlib.nullcontext,
    after_backward=None,
):
    """SGD on the sharded model (this rank's batch share) and on the reference (the whole
    batch). After every backward the gradient shards, after every step the parameter
    shards are judged against the reference's. Returns (problems, [(loss, reference
    loss)], [(clip norm, reference clip norm)])."""
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LEARNING_RATE)
    problems, losses, norms = [], [], []
    for step, (x, y) in enumerate(batches, start=1):
        with around_model():
            loss = lm_loss(model(take(x)), take(y))
            loss.backward()
        losses.append((loss.item(), reference_step(reference, x, y)))
        if after_backward is not None:
            after_backward(model)
        if clip is not None:
            norms.append(
                (
                    _as_float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)),
                    _as_float(torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)),
                )
            )
            found = judge(
                torch.tensor([norms[-1][0]]),
                torch.tensor([norms[-1][1]]),
                f"step {step} total grad norm of clip_grad_norm_",
            )
            problems.extend([found] if found else [])
        problems += compare_sharded(model, full_tensors(reference, "grad"), "grad", judge, f"step {step}")
        for optimizer in (opt, ref_opt):
            optimizer.step()
            optimizer.zero_grad()
        problems += compare_sharded(model, full_tensors(reference, "param"), "param", judge, f"after step {step}")
    return problems, losses, norms


def _loss_problems(losses, judge, world_size) -> list[str]:
    """The mean of the ranks' local losses must be the reference's full-batch loss."""
    problems = []
    for step, (mine, ref) in enumerate(losses, start=1):
        mean = sum(gather_float(mine, world_size)) / world_size
        found = judge(torch.tensor([mean]), torch.tensor([ref]), f"step {step} loss (mean over ranks)")
        problems.extend([found] if found else [])
    return problems


def _fp32_parity(model, device, rank, world_size, tolerance, record, where, **train) -> list:
    """Train ``model`` against the fp32 single-process reference, record how much of the
    fp32 row was used, fail in every rank with the first problems if any."""
    judge = WithinTolerance(tolerance.rtol, tolerance.atol)
    with true_fp32(device):
        problems, losses, norms = _train_against_reference(
            model, tiny_lm(device), _batches(world_size, device), _take(rank, world_size), judge, **train
        )
    problems += _loss_problems(losses, judge, world_size)
    record("tolerance_used", max(gather_float(judge.used, world_size)))
    record("tolerance_used_bound", 1.0)
    raise_if_any(summarize_problems(problems), rank, world_size, where)
    return norms


@pytest.mark.world_size(2, 4)
@pytest.mark.parametrize("reshard_after_forward", [True, False], ids=["reshard", "no_reshard"])
def test_fsdp_matches_single_process(reshard_after_forward, rank, world_size, device, tolerance, record):
    """fully_shard per block and root: loss, gradient shards and parameter shards after each
    of k SGD steps equal the single process on the full batch (fp32 row)."""
    with true_fp32(device):
        model = sharded_lm(device, _mesh(device, world_size), reshard_after_forward=reshard_after_forward)
    _fp32_parity(
        model,
        device,
        rank,
        world_size,
        tolerance,
        record,
        f"FSDP2(reshard_after_forward={reshard_after_forward}) vs single process",
    )


@pytest.mark.world_size(4)
def test_fsdp_reshard_to_smaller_group(rank, world_size, device, tolerance, record, memory_meter):
    """reshard_after_forward=2 at world size 4: after forward every block keeps its
    parameters sharded over 2 ranks, i.e. half of the unsharded bytes more than resharding
    fully; backward all-gathers within that group and the step equals the single process."""
    mesh = _mesh(device, world_size)
    x = rank_slice(_batches(world_size, device, steps=1)[0][0], rank, world_size)
    kept = {}
    for option in (True, 2):
        model = sharded_lm(device, mesh, reshard_after_forward=option)
        with memory_meter.track(device) as m:
            out = model(x)
            kept[option] = m.settled_live_bytes()
        out.sum().backward()
    expected = _unsharded_bytes(tiny_lm("meta")) / 2
    extra = kept[2] - kept[True]
    # Every rank's reading, not rank 0's: the report shows the rank furthest from the bound.
    extras = gather_float(extra, world_size)
    worst = max(extras, key=lambda e: abs(e - expected))
    record("kept_after_forward_extra_bytes", worst)
    record("kept_after_forward_extra_bytes_min", (1 - MEMORY_SLACK) * expected)
    record("kept_after_forward_extra_bytes_max", (1 + MEMORY_SLACK) * expected)
    # Called on every rank (a collective): a rank whose reading is in bounds still takes part.
    within = (1 - MEMORY_SLACK) * expected <= extra <= (1 + MEMORY_SLACK) * expected
    raise_if_any(
        None
        if within
        else f"reshard_after_forward=2 keeps {extra} B more after forward than True, expected half the "
        f"unsharded parameters: {expected:.0f} B (+-{MEMORY_SLACK:.0%})",
        rank,
        world_size,
        "FSDP2 reshard_after_forward=2 memory",
    )
    with true_fp32(device):
        model = sharded_lm(device, mesh, reshard_after_forward=2)
    _fp32_parity(model, device, rank, world_size, tolerance, record, "FSDP2(reshard_after_forward=2) vs single process")


@pytest.mark.world_size(4)
def test_hsdp_matches_single_process(rank, world_size, device, tolerance, record):
    """HSDP: a 2 x 2 (replicate, shard) mesh, parameters Shard(0) within a replica group and
    replicated across groups; each of the 4 ranks trains on its own batch share and the
    step equals the single process (fp32 row)."""
    mesh = _mesh(device, world_size, shape=(2, world_size // 2), names=("replicate", "shard"))
    with true_fp32(device):
        model = sharded_lm(device, mesh)
    from torch.distributed.tensor import Replicate, Shard

    expected = (Replicate(), Shard(0))
    wrong = sorted({f"{name}: {p.placements}" for name, p in model.named_parameters() if p.placements != expected})
    raise_if_any(
        summarize_problems(wrong)
        and f"parameters not (Replicate(), Shard(0)) on the 2-D mesh: {summarize_problems(wrong)}",
        rank,
        world_size,
        "HSDP layout",
    )
    _fp32_parity(model, device, rank, world_size, tolerance, record, "HSDP(2x2) vs single process")


@pytest.mark.world_size(2)
def test_fsdp_clip_grad_norm_matches_full_model(rank, world_size, device, tolerance, record):
    """clip_grad_norm_ over sharded gradients: the total norm is the full model's (shards'
    squares summed across ranks), and the clipped gradient shards and each step equal the
    single process clipping its full gradients (fp32 row)."""
    with true_fp32(device):
        model = sharded_lm(device, _mesh(device, world_size))
    norms = _fp32_parity(
        model,
        device,
        rank,
        world_size,
        tolerance,
        record,
        f"FSDP2 clip_grad_norm_(max_norm={CLIP_NORM}) vs single process",
        clip=CLIP_NORM,
    )
    smallest = min(want for _, want in norms)
    record("reference_grad_norm_over_max_norm", smallest / CLIP_NORM)
    record("reference_grad_norm_over_max_norm_min", 1.0)
    assert smallest > CLIP_NORM, f"reference grad norms {norms} do not exceed max_norm {CLIP_NORM}: nothing was clipped"


# -- mixed precision -------------------------------------------------------------------------

# ops whose floating-point inputs show the compute dtype: matmuls and fused attention
COMPUTE_OPS = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
}


def _low_precision_reference_step(low_dtype, shares: int):
    """The mixed-precision recipe in one process: a ``low_dtype`` copy of the fp32 master
    computes forward and backward on each rank's share of the batch, and the shares'
    gradients, cast to fp32, are averaged in fp32 onto the master. This is what FSDP2 does
    minus the communication; a full-batch bf16 backward instead would differ from it by
    bf16 rounding under cancellation (~1.5e-2 rel_l2 on the LayerNorm gradients here)."""

    def step(master, x, y):
        low = copy.deepcopy(master).to(low_dtype)
        total = [torch.zeros_like(p) for p in master.parameters()]
        losses = []
        for share in range(shares):
            low.zero_grad(set_to_none=True)
            loss = lm_loss(low(rank_slice(x, share, shares).to(low_dtype)), rank_slice(y, share, shares))
            loss.backward()
            losses.append(loss.item())
            for acc, q in zip(total, low.parameters(), strict=True):
                acc += q.grad.float()
        for p, acc in zip(master.parameters(), total, strict=True):
            p.grad = acc / shares
        return sum(losses) / shares

    return step


def _not_rounded_fraction(tensors, low_dtype) -> float:
    """Share of elements not representable in ``low_dtype``."""
    total = sum(t.numel() for t in tensors)
    off = sum(int((t != t.to(low_dtype).to(t.dtype)).sum()) for t in tensors)
    return off / total if total else 0.0


@pytest.mark.world_size(2)
@pytest.mark.dtype("bf16")
def test_fsdp_mixed_precision_matches_reference(dtype, rank, world_size, device, tolerance, record):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): gradient and parameter
    shards after each step within the bf16 row's rel_l2 of the same recipe in one process
    (bf16 compute per batch share, fp32 average and master weights),
    the loss within its loss_rel; every matmul and attention op ran in bf16; gradients are
    fp32 and were reduced in fp32 (not all on the bf16 grid)."""
    _, MixedPrecisionPolicy = _fsdp_api()
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    model = sharded_lm(device, _mesh(device, world_size), mp_policy=policy)
    worst, compute, not_rounded = [0.0], [], []

    def judge(got, want, what):
        if got.dtype != torch.float32:
            return f"{what}: dtype {got.dtype}, expected torch.float32 (fp32 master copy)"
        if "loss" in what:
            rel = abs(float(got) - float(want)) / max(abs(float(want)), 1e-30)
            return (
                None
                if rel <= tolerance.loss_rel
                else f"{what}: relative diff {rel:.3g} > bound loss_rel {tolerance.loss_rel:g}"
            )
        worst[0] = max(worst[0], relative_l2(got, want))
        return too_far(got, want, tolerance.rel_l2, what)

    @contextlib.contextmanager
    def recording_compute():
        with recorded_ops() as ops:
            yield
        compute.append({name: dtypes for name, dtypes in ops.items() if name in COMPUTE_OPS})

    problems, losses, _ = _train_against_reference(
        model,
        tiny_lm(device),
        _batches(world_size, device),
        _take(rank, world_size),
        judge,
        reference_step=_low_precision_reference_step(dtype, world_size),
        around_model=recording_compute,
        after_backward=lambda m: not_rounded.append(
            _not_rounded_fraction([local(p.grad) for p in m.parameters()], dtype)
        ),
    )
    problems += _loss_problems(losses, judge, world_size)
    ran = {op: dts for seen in compute for op, dts in seen.items()}
    problems += [
        f"{op} ran with inputs in {sorted(map(str, dts))}, expected only {dtype} (param_dtype)"
        for op, dts in sorted(ran.items())
        if dts != {dtype}
    ]
    problems += [] if ran else ["no matmul ran in forward and backward (the dtype recorder saw none)"]
    least = min(not_rounded)
    if least < NOT_ROUNDED_MIN:
        problems.append(
            f"only {least:.3g} of the reduced gradient elements are off the {dtype} grid (min "
            f"{NOT_ROUNDED_MIN}): the gradients were reduced in {dtype}, not in reduce_dtype=fp32"
        )
    record("grad_off_low_precision_grid_fraction", min(gather_float(least, world_size)))
    record("grad_off_low_precision_grid_fraction_min", NOT_ROUNDED_MIN)
    record("max_rel_l2_vs_reference", max(gather_float(worst[0], world_size)))
    record("bound_rel_l2", tolerance.rel_l2)
    raise_if_any(summarize_problems(problems), rank, world_size, f"FSDP2 MixedPrecisionPolicy(param_dtype={dtype})")


# -- memory ----------------------------------------------------------------------------------


def _unsharded_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _state_bytes(model, optimizer) -> int:
    """Bytes of the distinct storages behind this rank's parameters, gradients and optimizer
    state (storage sizes, not numel: a "shard" that is a view of a full tensor counts full)."""
    tensors = [local(p) for p in model.parameters()] + [local(p.grad) for p in model.parameters()]
    tensors += [local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {}
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _adam_step(model, x, y):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    lm_loss(model(x), y).backward()
    optimizer.step()
    return optimizer


@pytest.mark.world_size(2, 4)
def test_fsdp_state_bytes_are_one_nth(rank, world_size, device, record, memory_meter):
    """After an Adam step, this rank's parameter + gradient + optimizer-state bytes are 1/N
    of the unsharded model's (every dimension 0 here divides by 2 and 4: no padding), both
    counted from the storages behind the state and as bytes the whole step left alive."""
    x, y = _batches(world_size, device, steps=1)[0]
    take = _take(rank, world_size)
    with memory_meter.track(device) as m:
        full = tiny_lm(device)
        full_optimizer = _adam_step(full, x, y)
        full_state, full_kept = _state_bytes(full, full_optimizer), m.settled_live_bytes()
    with memory_meter.track(device) as m:
        model = sharded_lm(device, _mesh(device, world_size))
        optimizer = _adam_step(model, take(x), take(y))
        sharded_state, sharded_kept = _state_bytes(model, optimizer), m.settled_live_bytes()
    low, high = (1 - MEMORY_SLACK) / world_size, (1 + MEMORY_SLACK) / world_size
    problems = []
    for name, sharded, unsharded in (
        ("state_bytes_ratio", sharded_state, full_state),
        ("kept_bytes_ratio", sharded_kept, full_kept),
    ):
        ratio = sharded / unsharded
        record(name, max(gather_float(ratio, world_size)))
        record(f"{name}_max", high)
        if not low <= ratio <= high:
            problems.append(
                f"{name}={ratio:.4g} (sharded {sharded} B vs unsharded {unsharded} B), expected "
                f"1/{world_size} within [{low:.4g}, {high:.4g}]"
            )
    raise_if_any("; ".join(problems) or None, rank, world_size, "FSDP2 per-rank state bytes")


@pytest.mark.world_size(2)
def test_fsdp_resharding_frees_parameters_after_forward(rank, world_size, device, record, memory_meter):
    """With reshard_after_forward=True the all-gathered parameters are freed after each
    block's forward: the bytes kept after forward are lower than with False by the analytic
    size of the unsharded parameters, and the forward's peak is lower."""
    mesh = _mesh(device, world_size)
    x = rank_slice(_batches(world_size, device, steps=1)[0][0], rank, world_size)
    kept, peak = {}, {}
    for option in (True, False):
        model = sharded_lm(device, mesh, reshard_after_forward=option)
        with memory_meter.track(device) as m:
            out = model(x)
            kept[option], peak[option] = m.settled_live_bytes(), m.peak_bytes
        out.sum().backward()
    expected = _unsharded_bytes(tiny_lm("meta"))
    saved = kept[False] - kept[True]
    # The worst rank's numbers (a lower bound: the smallest saving; an upper one: the largest ratio).
    record("saved_after_forward_bytes", min(gather_float(saved, world_size)))
    record("saved_after_forward_bytes_min", (1 - MEMORY_SLACK) * expected)
    record("forward_peak_ratio", max(gather_float(peak[True] / peak[False], world_size)))
    record("forward_peak_ratio_max", 1.0)
    problems = []
    if saved < (1 - MEMORY_SLACK) * expected:
        problems.append(
            f"resharding saves {saved} B after forward (kept {kept[True]} B vs {kept[False]} B without), "
            f"expected the unsharded parameters: {expected} B (-{MEMORY_SLACK:.0%})"
        )
    if peak[True] >= peak[False]:
        problems.append(f"forward peak with resharding {peak[True]} B >= without {peak[False]} B")
    raise_if_any("; ".join(problems) or None, rank, world_size, "FSDP2 reshard_after_forward memory")


# -- activation checkpointing ----------------------------------------------------------------


@pytest.mark.world_size(2)
def test_fsdp_with_activation_checkpointing(rank, world_size, device, record, memory_meter):
    """Per-block activation checkpointing under FSDP2 (the recompute all-gathers the block's
    parameters again): gradient shards bitwise equal to FSDP2 without it, and fewer bytes
    kept after forward (each block keeps its output instead of its activations)."""
    mesh = _mesh(device, world_size)
    x, y = (rank_slice(t, rank, world_size) for t in _batches(world_size, device, steps=1)[0])
    check_checkpointing_composes(
        lambda recompute: sharded_lm(device, mesh, recompute=recompute),
        x,
        y,
        kept_ratio_bound(KEPT_UNITS["plain"]),
        device=device,
        memory_meter=memory_meter,
        rank=rank,
        world_size=world_size,
        record=record,
        check="FSDP2 + activation checkpointing",
    )
