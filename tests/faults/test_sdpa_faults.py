"""The SDPA checks catch a fused attention kernel that is wrong, or not the kernel asked for.

Each fault wraps ``F.scaled_dot_product_attention`` while only fused kernels are enabled
(the math backend disabled, as ``sdpa_kernel([FLASH_ATTENTION])`` leaves it), so the fp64
math reference stays right and only "the flash kernel" misbehaves: its output 1.6% off
(twice the bf16 output bound), its gradients 3% off (twice the bf16 gradient bound), the
boolean mask ignored, a silent fallback to the math backend that gives the right
numbers from the wrong kernel, and the flash kernel running where math was asked for. The checks run in the pytest process (single device), so
every fault is an autouse fixture of its own module. One subprocess runs them all.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

RE_EXPORT = "from pytest_gpuconform.conformance.test_sdpa import test_sdpa_backend_matches_fp64_math\n"

# ``faulty(real, *args, **kwargs)`` replaces SDPA whenever the math backend is disabled.
WRAP_FUSED = """
import pytest
import torch
import torch.nn.functional as F

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    real = F.scaled_dot_product_attention
    def wrapped(*args, **kwargs):
        if torch.backends.cuda.math_sdp_enabled():
            return real(*args, **kwargs)
        return faulty(real, *args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", wrapped)
"""

# The math backend asked for (not in fp64, where no fused kernel exists): flash runs.
MATH_REPLACED = """
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    real = F.scaled_dot_product_attention
    def wrapped(q, *args, **kwargs):
        if torch.backends.cuda.flash_sdp_enabled() or q.dtype == torch.float64:
            return real(q, *args, **kwargs)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return real(q, *args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", wrapped)
"""

FAULTS = {
    "test_fault_sdpa_math_is_flash": MATH_REPLACED + RE_EXPORT,
    "test_fault_sdpa_output_off": WRAP_FUSED
    + """
def faulty(real, *args, **kwargs):
    return real(*args, **kwargs) * (1 + 2 ** -6)
"""
    + RE_EXPORT,
    "test_fault_sdpa_gradients_off": WRAP_FUSED
    + """
class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)
    @staticmethod
    def backward(ctx, grad):
        return grad * (1 + 2 ** -5)
def faulty(real, q, k, v, **kwargs):
    return real(_ScaleGrad.apply(q), _ScaleGrad.apply(k), _ScaleGrad.apply(v), **kwargs)
"""
    + RE_EXPORT,
    "test_fault_sdpa_mask_ignored": WRAP_FUSED
    + """
def faulty(real, *args, **kwargs):
    kwargs.pop("attn_mask", None)
    return real(*args, **kwargs)
"""
    + RE_EXPORT,
    "test_fault_sdpa_silent_fallback": WRAP_FUSED
    + """
from torch.nn.attention import SDPBackend, sdpa_kernel
def faulty(real, *args, **kwargs):
    with sdpa_kernel([SDPBackend.MATH]):
        return real(*args, **kwargs)
"""
    + RE_EXPORT,
}

TEST = "test_sdpa_backend_matches_fp64_math"
SELECTION = [
    f"test_fault_sdpa_output_off.py::{TEST}[cpu-bf16-flash-causal]",
    f"test_fault_sdpa_output_off.py::{TEST}[cpu-fp32-flash-causal]",
    f"test_fault_sdpa_gradients_off.py::{TEST}[cpu-bf16-flash-causal]",
    f"test_fault_sdpa_mask_ignored.py::{TEST}[cpu-fp16-flash-bool_mask]",
    f"test_fault_sdpa_silent_fallback.py::{TEST}[cpu-fp32-flash-causal]",
    f"test_fault_sdpa_math_is_flash.py::{TEST}[cpu-fp32-math-causal]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("sdpa_faults"), FAULTS, SELECTION)


@pytest.mark.parametrize("dtype, bound", [("bf16", "0.0078125"), ("fp32", "1e-05")])
def test_fused_output_off_by_two_bounds_is_caught(cases, dtype, bound):
    assert_caught(
        cases,
        f"test_fault_sdpa_output_off::{TEST}[cpu-{dtype}-flash-causal]",
        "SDPA flash (causal, torch.",
        "output: rel_l2=0.01",
        f"> bound {bound} vs math in fp64",
    )


def test_fused_gradients_off_by_two_bounds_is_caught(cases):
    assert_caught(
        cases,
        f"test_fault_sdpa_gradients_off::{TEST}[cpu-bf16-flash-causal]",
        "grad q: rel_l2=0.03",
        "> bound 0.015625",
        "grad k: rel_l2=",
        "grad v: rel_l2=",
    )


def test_ignored_mask_is_caught(cases):
    assert_caught(
        cases,
        f"test_fault_sdpa_mask_ignored::{TEST}[cpu-fp16-flash-bool_mask]",
        "SDPA flash (bool_mask, torch.float16",
        "output: rel_l2=",
        "> bound 0.000976562",
    )


def test_silent_fallback_to_math_is_caught(cases):
    assert_caught(
        cases,
        f"test_fault_sdpa_silent_fallback::{TEST}[cpu-fp32-flash-causal]",
        "flash backend requested, ['_scaled_dot_product_flash_attention_for_cpu', "
        "'_scaled_dot_product_flash_attention_for_cpu_backward'] did not run (ran: no fused kernel)",
    )


def test_fused_kernel_posing_as_math_is_caught(cases):
    assert_caught(
        cases,
        f"test_fault_sdpa_math_is_flash::{TEST}[cpu-fp32-math-causal]",
        "math backend requested, fused kernels ran: ['_scaled_dot_product_flash_attention_for_cpu'",
    )
