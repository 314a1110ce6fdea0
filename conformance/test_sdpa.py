"""scaled_dot_product_attention conformance: every backend computes attention.

``F.scaled_dot_product_attention`` dispatches to one of several kernels: the math backend
(plain matmul + softmax), FlashAttention, memory-efficient attention and cuDNN attention
on CUDA, and a flash kernel of its own on CPU. Which one runs depends on the device, the
dtype, the shapes and the build, so a node where one kernel is wrong trains wrong models
only for some configurations. Each available backend is run alone (``sdpa_kernel``) and
compared, forward and backward, with the math backend computed in fp64 on the same
(rounded) inputs, as PyTorch's test_transformers.py does; bounds are the table's
``sdpa_out_rel_l2`` / ``sdpa_grad_rel_l2`` rows (sources in tolerances.py).

A backend that cannot run this configuration here is a skip that names it and gives
torch's reason. One that runs must be the kernel asked for: the ops it dispatched are
recorded, so a silent fallback to another kernel cannot pass as the backend under test.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from pytest_gpuconform.checks import recorded_ops, relative_l2, true_fp32

BATCH, HEADS, SEQ, HEAD_DIM = 2, 4, 64, 32
MASK_KEEP = 0.7  # share of positions a boolean mask lets through

# backend -> the aten ops that show it ran (forward op; its backward is "<op>_backward")
FUSED_OPS = {
    "flash": {"cpu": "_scaled_dot_product_flash_attention_for_cpu", "cuda": "_scaled_dot_product_flash_attention"},
    "efficient": {"cuda": "_scaled_dot_product_efficient_attention"},
    "cudnn": {"cuda": "_scaled_dot_product_cudnn_attention"},
}
ALL_FUSED = {op for ops in FUSED_OPS.values() for op in ops.values()}
BACKENDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def _sdpa_kernel():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel (2.3+)")
    return SDPBackend, sdpa_kernel


def _inputs(device, masking: str):
    """q, k, v, the output gradient (fp64) and the mask arguments for ``masking``."""
    generator = torch.Generator().manual_seed(17)
    q, k, v, grad_out = (
        torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, generator=generator, dtype=torch.float64) for _ in range(4)
    )
    if masking == "causal":
        extra = {"is_causal": True}
    else:
        mask = torch.rand(BATCH, 1, SEQ, SEQ, generator=generator) < MASK_KEEP
        mask[..., 0] = True  # no fully masked row (its softmax is NaN by definition)
        extra = {"attn_mask": mask.to(device)}
    return [t.to(device) for t in (q, k, v, grad_out)], extra


def _attention(tensors, extra, dtype, backends):
    """Output and q/k/v gradients of SDPA in ``dtype`` under ``sdpa_kernel(backends)``, and
    the ops it dispatched."""
    _, sdpa_kernel = _sdpa_kernel()
    q, k, v, grad_out = tensors
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(backends), recorded_ops() as ran:
        out = F.scaled_dot_product_attention(*leaves, **extra)
        out.backward(grad_out.to(dtype))
    return {"output": out, "grad q": leaves[0].grad, "grad k": leaves[1].grad, "grad v": leaves[2].grad}, set(ran)


def _run_or_skip(backend: str, tensors, extra, dtype, device):
    """Run the backend alone; skip naming it (and torch's reason) where it cannot run."""
    SDPBackend, _ = _sdpa_kernel()
    if backend != "math" and device.type not in FUSED_OPS[backend]:
        pytest.skip(f"SDPA backend {backend} ({BACKENDS[backend]}) does not exist on {device.type}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return _attention(tensors, extra, dtype, [getattr(SDPBackend, BACKENDS[backend])])
        except RuntimeError as exc:
            if "No available kernel" not in str(exc):
                raise
            why = "; ".join(" ".join(str(w.message).split())[:200] for w in caught) or str(exc).splitlines()[0]
            pytest.skip(
                f"SDPA backend {backend} ({BACKENDS[backend]}) not available for {dtype} on {device.type}: {why}"
            )


def _kernel_problem(backend: str, ran: set, device) -> str | None:
    """None when the ops that ran show ``backend``; else what ran instead."""
    fused = ran & (ALL_FUSED | {f"{op}_backward" for op in ALL_FUSED})
    if backend == "math":
        return None if not fused else f"math backend requested, fused kernels ran: {sorted(fused)}"
    op = FUSED_OPS[backend][device.type]
    missing = [name for name in (op, f"{op}_backward") if name not in ran]
    return (
        None
        if not missing
        else f"{backend} backend requested, {missing} did not run (ran: {sorted(fused) or 'no fused kernel'})"
    )


@pytest.mark.dtype("fp32", "bf16", "fp16")
@pytest.mark.parametrize("masking", ["causal", "bool_mask"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sdpa_backend_matches_fp64_math(backend, masking, device, dtype, tolerance, record):
    """The backend's output and q/k/v gradients within the table's sdpa_* rel_l2 of the
    math backend in fp64 on the same inputs, and the backend's own kernel is what ran."""
    SDPBackend, _ = _sdpa_kernel()
    tensors, extra = _inputs(device, masking)
    rounded = [t.to(dtype).double() for t in tensors]  # the kernel's error, not the inputs'
    with true_fp32(device):
        got, ran = _run_or_skip(backend, rounded, extra, dtype, device)
        want, _ = _attention(rounded, extra, torch.float64, [SDPBackend.MATH])
    problems = [found] if (found := _kernel_problem(backend, ran, device)) else []
    worst = {"out": 0.0, "grad": 0.0}
    for name, value in got.items():
        kind = "out" if name == "output" else "grad"
        bound = tolerance.sdpa_out_rel_l2 if kind == "out" else tolerance.sdpa_grad_rel_l2
        if value is None or value.dtype != dtype:
            problems.append(f"{name}: {'missing' if value is None else value.dtype}, expected a {dtype} tensor")
            continue
        measured = relative_l2(value, want[name])
        worst[kind] = max(worst[kind], measured)
        if not measured <= bound:
            problems.append(f"{name}: rel_l2={measured:.3g} > bound {bound:g} vs math in fp64")
    record("out_rel_l2", worst["out"])
    record("out_rel_l2_bound", tolerance.sdpa_out_rel_l2)
    record("grad_rel_l2", worst["grad"])
    record("grad_rel_l2_bound", tolerance.sdpa_grad_rel_l2)
    assert not problems, f"SDPA {backend} ({masking}, {dtype}, {device}): " + "; ".join(problems)
