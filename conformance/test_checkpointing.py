"""Activation checkpointing conformance: recompute must give what the forward gave.

Checkpointing trades memory for a second forward during backward. That is only sound if
the second forward reproduces the first bit for bit (same kernels, same RNG draws, same
autocast state) and if the memory is really given back. Each check runs the plain model
and the checkpointed one on the same device in the same process and compares:

* outputs, input and parameter gradients bitwise (on CUDA with deterministic algorithms,
  cuDNN benchmarking off and a deterministic cuBLAS workspace, since recompute and forward
  must pick the same kernels; recorded as ``cuda_determinism``), for ``checkpoint``
  reentrant and non-reentrant, ``checkpoint_sequential`` and selective checkpointing. TF32
  needs no setting here: both sides run the same ops under the same switches;
* dropout inside the region: equal to the plain run only if the RNG state is replayed, and
  a reference-free self-check that backward used forward's mask;
* the same under autocast (the recompute must re-enter forward's autocast state);
* the activation memory kept after forward, as a ratio to the plain model, against the
  analytic size of each variant (see _models.py);
* documented structure and errors: ``checkpoint_sequential`` recomputes all chunks but the
  last, and a recompute that changes shapes raises ``CheckpointError``.
"""

from __future__ import annotations

import functools

import pytest

from pytest_gpuconform.checks import bitwise_reproducible

N_BLOCKS = 8
WIDTH = 64
BATCH = 32
SEGMENTS = 3  # 8 blocks in chunks of 2: blocks 0-3 recomputed, blocks 4-7 (last chunk) not
DROPOUT = 0.5
# Bookkeeping tensors a checkpoint may create besides activations (RNG states: 16 B on CUDA),
# as a share of the plain model's activation bytes. Activations per unit here are 8 KiB.
MEMORY_SLACK = 0.01

VARIANTS = ("non_reentrant", "reentrant", "sequential_non_reentrant", "sequential_reentrant", "selective")
MEMORY_VARIANTS = ("non_reentrant", "reentrant", "sequential_2", "sequential_4", "selective")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# -- how each variant runs a Sequential of blocks ---------------------------------------------


def _selective_context_fn():
    import torch
    from torch.utils import checkpoint as ckpt

    if not hasattr(ckpt, "create_selective_checkpoint_contexts"):
        pytest.skip(
            f"torch {torch.__version__} has no selective activation checkpointing "
            "(create_selective_checkpoint_contexts, added in 2.4)"
        )
    saved_ops = [torch.ops.aten.addmm.default, torch.ops.aten.mm.default]
    return functools.partial(ckpt.create_selective_checkpoint_contexts, saved_ops)


def _runner(variant: str):
    """fn(model, x) -> output, running ``model`` (a Sequential) the way ``variant`` says."""
    from torch.utils import checkpoint as ckpt

    def per_block(**kwargs):
        def run(model, x):
            for block in model:
                x = ckpt.checkpoint(block, x, **kwargs)
            return x

        return run

    def sequential(segments, use_reentrant):
        return lambda model, x: ckpt.checkpoint_sequential(model, segments, x, use_reentrant=use_reentrant)

    if variant == "plain":
        return lambda model, x: model(x)
    if variant == "non_reentrant":
        return per_block(use_reentrant=False)
    if variant == "reentrant":
        return per_block(use_reentrant=True)
    if variant == "sequential_non_reentrant":
        return sequential(SEGMENTS, False)
    if variant == "sequential_reentrant":
        return sequential(SEGMENTS, True)
    if variant.startswith("sequential_"):
        return sequential(int(variant.rsplit("_", 1)[1]), False)
    if variant == "selective":
        return per_block(use_reentrant=False, context_fn=_selective_context_fn())
    raise ValueError(variant)


def _model_and_input(device, dtype, dropout=0.0):
    import torch

    from ._models import mlp_blocks

    torch.manual_seed(1234)
    model = mlp_blocks(N_BLOCKS, WIDTH, dropout=dropout).to(device=device, dtype=dtype)
    x = torch.randn(BATCH, WIDTH, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(BATCH, WIDTH, device=device, dtype=dtype)
    return model, x, grad_out


def _forward_backward(model, x, grad_out, run, seed=None) -> dict:
    """Output, input gradient and every parameter gradient of one forward+backward."""
    import torch

    model.zero_grad(set_to_none=True)
    x.grad = None
    if seed is not None:
        torch.manual_seed(seed)
    out = run(model, x)
    out.backward(grad_out)
    result = {"output": out.detach(), "input grad": x.grad}
    result.update({f"grad of {name}": p.grad for name, p in model.named_parameters()})
    return result


def _checkpointed_run(where: str, *args, **kwargs) -> dict:
    """_forward_backward of a checkpointed variant; an error in it (CheckpointError and other
    recompute failures are RuntimeErrors) is the finding, reported in one line."""
    try:
        return _forward_backward(*args, **kwargs)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:600]
        pytest.fail(
            f"{where}: forward+backward raised {type(exc).__name__}: {first} (expected: the plain "
            f"model's outputs and gradients)",
            pytrace=False,
        )


def _compare_bitwise(where: str, got: dict, want: dict, record) -> None:
    """Every tensor of ``want`` bitwise equal in ``got``; one line naming those that are not."""
    from pytest_gpuconform.checks import mismatch

    worst = 0.0
    problems = []
    for name, reference in want.items():
        value = got[name]
        if value is None or reference is None:
            if (value is None) != (reference is None):
                problems.append(
                    f"{name}: {'missing' if value is None else 'present'} (reference: "
                    f"{'none' if reference is None else 'present'})"
                )
            continue
        if value.dtype != reference.dtype:
            problems.append(f"{name}: dtype {value.dtype} != reference {reference.dtype}")
            continue
        problem = mismatch(value, reference, name)
        if problem:
            problems.append(problem)
            if value.shape == reference.shape:
                worst = max(worst, float((value.double() - reference.double()).abs().max()))
    record("tensors_compared", len(want))
    record("max_abs_diff", worst)
    record("max_abs_diff_bound", 0.0)
    assert not problems, f"{where}: {len(problems)} of {len(want)} tensors differ: " + "; ".join(problems[:4])


# -- numerics ------------------------------------------------------------------------------


@pytest.mark.dtype("fp32", "bf16", "fp16")
@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_matches_plain(device, dtype, variant, record):
    """Outputs and gradients of the checkpointed model equal the plain model's, bitwise."""
    model, x, grad_out = _model_and_input(device, dtype)
    where = f"{variant} checkpoint vs plain ({dtype}, {device})"
    with bitwise_reproducible(device, record):
        want = _forward_backward(model, x, grad_out, _runner("plain"))
        got = _checkpointed_run(where, model, x, grad_out, _runner(variant))
    _compare_bitwise(where, got, want, record)


DROPOUT_VARIANTS = ("non_reentrant", "reentrant", "sequential_non_reentrant", "selective")


@pytest.mark.parametrize("variant", DROPOUT_VARIANTS)
def test_checkpoint_dropout_matches_plain(device, variant, record):
    """With dropout inside the region, recompute must replay forward's RNG draws: gradients
    and the RNG stream afterwards equal a plain run from the same seed."""
    import torch

    model, x, grad_out = _model_and_input(device, torch.float32, dropout=DROPOUT)
    where = f"{variant} checkpoint with dropout p={DROPOUT} vs plain ({device})"
    with bitwise_reproducible(device, record):
        want = _forward_backward(model, x, grad_out, _runner("plain"), seed=7)
        want["next random numbers"] = torch.rand(8, device=device)
        got = _checkpointed_run(where, model, x, grad_out, _runner(variant), seed=7)
        got["next random numbers"] = torch.rand(8, device=device)
    _compare_bitwise(where, got, want, record)


def _dropout_region(variant: str, device):
    """fn(x) = dropout(2x) run through ``variant``'s checkpoint."""
    from torch import nn
    from torch.utils import checkpoint as ckpt

    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    region = nn.Sequential(Double(), nn.Dropout(DROPOUT), nn.Identity(), nn.Identity()).to(device)
    if variant.startswith("sequential"):
        # 4 modules in 2 chunks: [Double, Dropout] is checkpointed, [Identity, Identity] is not.
        return lambda x: ckpt.checkpoint_sequential(region, 2, x, use_reentrant=False)
    kwargs = {"use_reentrant": variant == "reentrant"}
    if variant == "selective":
        kwargs["context_fn"] = _selective_context_fn()
    return lambda x: ckpt.checkpoint(region, x, **kwargs)


@pytest.mark.parametrize("variant", DROPOUT_VARIANTS)
def test_checkpoint_dropout_mask_self_consistent(device, variant, tolerance, record):
    """Reference-free: for d = dropout(2x) and loss = sum(sin d), backward must use forward's
    mask, so x.grad = 2 cos(d) / (1 - p) exactly where d != 0 and 0 elsewhere."""
    import torch

    torch.manual_seed(11)
    x = (torch.rand(64, 64, device=device) + 0.5).requires_grad_()  # no element is 0
    d = _dropout_region(variant, device)(x)
    d.sin().sum().backward()
    kept = d.detach() != 0
    grad = x.grad
    wrong_mask = int(((grad != 0) != kept).sum())
    expected = 2 * torch.cos(d.detach()) * kept / (1 - DROPOUT)
    rel_err = ((grad - expected).abs() / expected.abs().clamp_min(1e-30))[kept]
    worst = float(rel_err.max()) if rel_err.numel() else 0.0
    record("kept_fraction", float(kept.float().mean()))
    record("mask_mismatches", wrong_mask)
    record("mask_mismatches_max", 0)
    record("max_rel_err_kept", worst)
    record("max_rel_err_kept_bound", tolerance.rtol)
    assert wrong_mask == 0, (
        f"{variant} checkpoint dropout p={DROPOUT} ({device}): {wrong_mask} of {x.numel()} elements have a gradient "
        f"that disagrees with forward's mask (bound: 0): recompute drew a different mask"
    )
    assert worst <= tolerance.rtol, (
        f"{variant} checkpoint dropout ({device}): kept elements' gradient differs from 2cos(d)/(1-p) by "
        f"relative {worst:.3g} (bound: rtol {tolerance.rtol:g})"
    )


@pytest.mark.dtype("fp16", "bf16")
@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_under_autocast_matches_plain(device, dtype, variant, record):
    """Under autocast, the checkpointed model equals the plain model under the same autocast,
    bitwise: the recompute re-enters forward's autocast state."""
    import torch

    model, x, grad_out = _model_and_input(device, torch.float32)
    run_plain, run_variant = _runner("plain"), _runner(variant)

    def under_autocast(run):
        def wrapped(model, x):
            with torch.autocast(device.type, dtype=dtype):
                return run(model, x)

        return wrapped

    where = f"{variant} checkpoint vs plain under autocast({device.type}, {dtype})"
    with bitwise_reproducible(device, record):
        want = _forward_backward(model, x, grad_out, under_autocast(run_plain))
        got = _checkpointed_run(where, model, x, grad_out, under_autocast(run_variant))
    _compare_bitwise(where, got, want, record)


# -- memory --------------------------------------------------------------------------------


def _analytic_units(variant: str) -> int:
    from . import _models

    if variant in ("non_reentrant", "reentrant"):
        return _models.per_block_checkpoint_units(N_BLOCKS)
    if variant.startswith("sequential_"):
        return _models.sequential_checkpoint_units(N_BLOCKS, int(variant.rsplit("_", 1)[1]))
    if variant == "selective":
        return _models.selective_linear_units(N_BLOCKS)
    raise ValueError(variant)


def _activation_bytes(meter, device, model, x, grad_out, run):
    """(bytes alive after forward, peak bytes over forward+backward, CUDA allocator bytes
    after forward or None off CUDA); parameter grads are preallocated so that backward's peak
    is activations and temporaries, not the first gradient allocation."""
    for p in model.parameters():
        p.grad = p.grad.zero_() if p.grad is not None else p.detach().new_zeros(p.shape)
    x.grad = None
    with meter.track(device) as reading:
        out = run(model, x)
        after_forward = reading.live_bytes
        cuda_after_forward = reading.cuda_allocated_bytes
        out.backward(grad_out)
        del out
    return after_forward, reading.peak_bytes, cuda_after_forward


@pytest.mark.parametrize("variant", MEMORY_VARIANTS)
def test_checkpoint_activation_memory(device, variant, memory_meter, record):
    """Activation bytes kept after forward, checkpointed / plain, measured in this process,
    are at most the analytic ratio of the variant (plus a little bookkeeping slack)."""
    import torch

    from . import _models

    model, x, grad_out = _model_and_input(device, torch.float32)
    _forward_backward(model, x, grad_out, _runner(variant))  # warm-up: workspaces, lazy init
    plain, plain_peak, cuda_plain = _activation_bytes(memory_meter, device, model, x, grad_out, _runner("plain"))
    ckpt, ckpt_peak, cuda_ckpt = _activation_bytes(memory_meter, device, model, x, grad_out, _runner(variant))

    unit = BATCH * WIDTH * 4
    analytic = _analytic_units(variant) / _models.plain_units(N_BLOCKS)
    bound = analytic + MEMORY_SLACK
    ratio = ckpt / plain
    record("plain_activation_bytes", plain)
    record("checkpointed_activation_bytes", ckpt)
    record("activation_ratio", ratio)
    record("activation_ratio_bound", bound)
    record("peak_ratio", ckpt_peak / plain_peak)
    assert plain == _models.plain_units(N_BLOCKS) * unit, (
        f"plain model ({device}) kept {plain} B after forward, analytic {_models.plain_units(N_BLOCKS) * unit} B "
        f"({_models.plain_units(N_BLOCKS)} activations of {unit} B): the meter or the model is off"
    )
    assert ratio <= bound, (
        f"{variant} checkpoint ({device}): activation ratio checkpointed/plain {ratio:.4f} "
        f"({ckpt} B / {plain} B after forward) > bound {bound:.4f} (analytic {analytic:.4f} + {MEMORY_SLACK})"
    )
    if cuda_plain is not None:
        cuda_ratio = cuda_ckpt / cuda_plain
        record("cuda_activation_ratio", cuda_ratio)
        assert cuda_ratio <= bound, (
            f"{variant} checkpoint ({device}): CUDA allocator ratio checkpointed/plain {cuda_ratio:.4f} "
            f"({cuda_ckpt} B / {cuda_plain} B allocated after forward) > bound {bound:.4f}"
        )


# -- documented structure and errors --------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpoint_sequential_recomputes_all_but_last_chunk(device, use_reentrant, record):
    """checkpoint_sequential(segments=k) checkpoints the first k-1 chunks of n // k modules;
    the last chunk (the rest) runs once, unchecked. Counted by forward pre-hooks."""
    import torch
    from torch.utils import checkpoint as ckpt

    model, x, grad_out = _model_and_input(device, torch.float32)
    calls = [0] * len(model)
    for index, block in enumerate(model):
        block.register_forward_pre_hook(lambda _m, _a, index=index: calls.__setitem__(index, calls[index] + 1))
    ckpt.checkpoint_sequential(model, SEGMENTS, x, use_reentrant=use_reentrant).backward(grad_out)

    checkpointed = (N_BLOCKS // SEGMENTS) * (SEGMENTS - 1)
    expected = [2] * checkpointed + [1] * (N_BLOCKS - checkpointed)
    record("blocks_recomputed", sum(c - 1 for c in calls))
    wrong = [
        f"block {i} ran {c}x, expected {e}x" for i, (c, e) in enumerate(zip(calls, expected, strict=True)) if c != e
    ]
    assert not wrong, (
        f"checkpoint_sequential({N_BLOCKS} blocks, segments={SEGMENTS}, use_reentrant={use_reentrant}) ({device}): "
        f"{'; '.join(wrong)} (blocks 0-{checkpointed - 1} recomputed once, last chunk "
        f"{checkpointed}-{N_BLOCKS - 1} not)"
    )


def test_checkpoint_recompute_shape_change_raises(device, record):
    """A recompute whose saved tensors change shape must raise CheckpointError (documented
    determinism_check="default"), not fail later or silently use wrong tensors."""
    import torch
    from torch.utils import checkpoint as ckpt

    width = [5]

    def region(x):
        width[0] += 1  # forward sees 6 columns, the recompute 7
        return (x[:, : width[0]] * 2).sin()

    x = torch.randn(4, 10, device=device, requires_grad=True)
    out = ckpt.checkpoint(region, x, use_reentrant=False)
    try:
        out.sum().backward()
    except ckpt.CheckpointError:
        record("raised", "CheckpointError")
        return
    except Exception as exc:  # noqa: BLE001 - the wrong exception is the finding
        record("raised", type(exc).__name__)
        first = " ".join(str(exc).split())[:200]
        pytest.fail(
            f"recompute changed a saved tensor's shape (4, 6) -> (4, 7) ({device}): raised "
            f"{type(exc).__name__}: {first} (expected: CheckpointError)",
            pytrace=False,
        )
    record("raised", "nothing")
    pytest.fail(
        f"recompute changed a saved tensor's shape (4, 6) -> (4, 7) ({device}): backward raised nothing "
        f"(expected: CheckpointError)",
        pytrace=False,
    )
