"""Every AMP check catches the fault it exists for.

The faults mimic how mixed precision breaks on a real stack: an op dropped from (or added
to) an autocast list, a cast kernel that rounds the wrong way, autocast silently disabled
(e.g. "device_type ... is not available. Disabling"), a cast far too coarse for the dtype,
a GradScaler whose inf check never fires, a fused optimizer that ignores ``found_inf``
(pytorch#95781), a scale update without backoff or with the wrong growth interval, a scaler
that forgets to unscale, and a scaler that lets ``unscale_`` run twice.

Autocast list faults are real kernel registrations: a ``torch.library`` implementation for
the ``AutocastCPU`` dispatch key of one aten op replaces the built-in autocast wrapper, and
destroying the library restores it. All faults run in one pytest subprocess, each applied
by an autouse fixture of its own module so that modules imported together stay independent.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

RE_EXPORT = "from pytest_gpuconform.conformance.test_amp import {name}\n"

# Registers ``autocast_kernel`` for the AutocastCPU key of aten::OP while the module's tests run.
AUTOCAST_KERNEL = """
import pytest
import torch

AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

def below_autocast(op, *args):
    with torch._C._ExcludeDispatchKeyGuard(AUTOCAST):
        return op(*args)

@pytest.fixture(autouse=True)
def _fault():
    lib = torch.library.Library("aten", "IMPL")
    lib.impl(OP, autocast_kernel, "AutocastCPU")
    yield
    lib._destroy()
"""

FAULTS = {
    # aten::mm no longer on the lower-precision list: it runs in fp32 under autocast.
    "test_fault_mm_dropped_from_list": """
OP = "mm"
"""
    + AUTOCAST_KERNEL
    + """
def autocast_kernel(a, b):
    return below_autocast(torch.ops.aten.mm.default, a, b)
"""
    + RE_EXPORT.format(name="test_autocast_lower_precision_ops"),
    # aten::mm's autocast cast rounds up instead of to nearest: right dtype, wrong bits.
    "test_fault_cast_rounds_up": """
OP = "mm"
"""
    + AUTOCAST_KERNEL
    + """
def round_up(t, dtype):
    low = t.to(dtype)
    up = torch.nextafter(low, torch.full_like(low, float("inf")))
    return torch.where(low.float() < t, up, low)

def autocast_kernel(a, b):
    dtype = torch.get_autocast_dtype("cpu")
    return below_autocast(torch.ops.aten.mm.default, round_up(a, dtype), round_up(b, dtype))
"""
    + RE_EXPORT.format(name="test_autocast_lower_precision_ops"),
    # aten::mse_loss moved off the fp32 list: it runs in the inputs' low dtype.
    "test_fault_mse_loss_runs_low": """
OP = "mse_loss"
"""
    + AUTOCAST_KERNEL
    + """
def autocast_kernel(a, b, reduction=1):
    return below_autocast(torch.ops.aten.mse_loss.default, a, b, reduction)
"""
    + RE_EXPORT.format(name="test_autocast_fp32_ops"),
    # Linear's autocast cast keeps only 4 mantissa bits: low dtype, but errors ~3%.
    "test_fault_coarse_cast": """
OP = "linear"
"""
    + AUTOCAST_KERNEL
    + """
def coarse(t, dtype):
    mantissa, exponent = torch.frexp(t)
    return torch.ldexp(torch.round(mantissa * 16) / 16, exponent).to(dtype)

def autocast_kernel(x, weight, bias=None):
    dtype = torch.get_autocast_dtype("cpu")
    args = [coarse(x, dtype), coarse(weight, dtype)] + ([coarse(bias, dtype)] if bias is not None else [])
    return below_autocast(torch.ops.aten.linear.default, *args)
"""
    + RE_EXPORT.format(name="test_autocast_block_matches_fp32")
    + RE_EXPORT.format(name="test_autocast_training_tracks_fp32"),
    # autocast silently disabled, whatever the caller asked for.
    "test_fault_autocast_does_nothing": """
import pytest
import torch

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    cls = torch.amp.autocast_mode.autocast
    real = cls.__init__
    def disabled(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        real(self, device_type, dtype=dtype, enabled=False, cache_enabled=cache_enabled)
    monkeypatch.setattr(cls, "__init__", disabled)
"""
    + RE_EXPORT.format(name="test_autocast_lower_precision_ops")
    + RE_EXPORT.format(name="test_autocast_block_matches_fp32")
    + RE_EXPORT.format(name="test_autocast_activation_memory"),
    # The inf/NaN check never fires (unscales, but found_inf stays 0).
    "test_fault_scaler_steps_on_inf": """
import pytest
import torch

def unscale_without_check(grads, found_inf, inv_scale):
    torch._foreach_mul_(grads, inv_scale)

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", unscale_without_check)
"""
    + RE_EXPORT.format(name="test_grad_scaler_skips_nonfinite_and_rescales"),
    # Fused optimizers drop found_inf (pytorch#95781): they step on inf gradients.
    "test_fault_fused_ignores_found_inf": """
import pytest
import torch

def dropping_found_inf(real):
    def fused(*args, **kwargs):
        kwargs["found_inf"] = None
        return real(*args, **kwargs)
    return fused

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    for name in ("_fused_adam_", "_fused_sgd_"):
        monkeypatch.setattr(torch, name, dropping_found_inf(getattr(torch, name)))
"""
    + RE_EXPORT.format(name="test_grad_scaler_skips_nonfinite_and_rescales"),
    # The scale update ignores backoff_factor.
    "test_fault_no_backoff": """
import pytest
import torch

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    real = torch._amp_update_scale_
    monkeypatch.setattr(torch, "_amp_update_scale_",
                        lambda scale, tracker, found_inf, growth, backoff, interval:
                        real(scale, tracker, found_inf, growth, 1.0, interval))
"""
    + RE_EXPORT.format(name="test_grad_scaler_skips_nonfinite_and_rescales"),
    # The scale update grows one step late (growth_interval off by one).
    "test_fault_late_growth": """
import pytest
import torch

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    real = torch._amp_update_scale_
    monkeypatch.setattr(torch, "_amp_update_scale_",
                        lambda scale, tracker, found_inf, growth, backoff, interval:
                        real(scale, tracker, found_inf, growth, backoff, interval + 1))
"""
    + RE_EXPORT.format(name="test_grad_scaler_skips_nonfinite_and_rescales"),
    # The scaler checks for inf but never divides by the scale: the optimizer sees scaled grads.
    "test_fault_no_unscale": """
import pytest
import torch

def check_without_unscale(grads, found_inf, inv_scale):
    for g in grads:
        if not torch.isfinite(g).all():
            found_inf.fill_(1.0)

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", check_without_unscale)
"""
    + RE_EXPORT.format(name="test_grad_scaler_skips_nonfinite_and_rescales"),
    # unscale_ forgets that it already ran.
    "test_fault_unscale_twice_allowed": """
import pytest
import torch
from torch.amp.grad_scaler import OptState

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    real = torch.amp.GradScaler.unscale_
    def forgetful(self, optimizer):
        self._per_optimizer_states[id(optimizer)]["stage"] = OptState.READY
        return real(self, optimizer)
    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", forgetful)
"""
    + RE_EXPORT.format(name="test_grad_scaler_unscale_twice_raises"),
}

DTYPES = ("fp16", "bf16")
TORCH_DTYPE = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}
OPTIMIZERS = ("sgd", "sgd_foreach", "sgd_fused", "adam", "adam_foreach", "adam_fused")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    directory = tmp_path_factory.mktemp("amp_faults")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # see test_checkpointing_faults.py
        return run_faulted(directory, FAULTS, ["-k", "cpu", *(f"{name}.py" for name in FAULTS)], timeout=120)


def _case(module, test, *params):
    return f"{module}::{test}[{'-'.join(('cpu',) + params)}]"


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_dropped_from_lower_precision_list_is_caught(cases, dtype):
    assert_caught(
        cases,
        _case("test_fault_mm_dropped_from_list", "test_autocast_lower_precision_ops", dtype),
        f"autocast(cpu, {TORCH_DTYPE[dtype]}) lower-precision list: 1 of 11 ops wrong",
        f"mm gave torch.float32 (expected {TORCH_DTYPE[dtype]})",
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_cast_that_rounds_wrongly_is_caught(cases, dtype):
    assert_caught(
        cases,
        _case("test_fault_cast_rounds_up", "test_autocast_lower_precision_ops", dtype),
        f"mm vs mm on inputs cast to {TORCH_DTYPE[dtype]} by hand: #wrong=",
        "max |diff|=",
        "(bound: exact)",
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_dropped_from_fp32_list_is_caught(cases, dtype):
    assert_caught(
        cases,
        _case("test_fault_mse_loss_runs_low", "test_autocast_fp32_ops", dtype),
        f"autocast(cpu, {TORCH_DTYPE[dtype]}) fp32 list: 1 of 10 ops wrong",
        f"mse_loss gave {TORCH_DTYPE[dtype]} (expected torch.float32)",
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_coarse_cast_is_caught_by_model_bounds(cases, dtype):
    bound = {"fp16": "0.005", "bf16": "0.02"}[dtype]
    assert_caught(
        cases,
        _case("test_fault_coarse_cast", "test_autocast_block_matches_fp32", dtype),
        f"autocast(cpu, {TORCH_DTYPE[dtype]}) vs fp32: rel-L2 error above bound {bound}",
        "input grad 0.",
    )
    loss_bound = {"fp16": "0.002", "bf16": "0.01"}[dtype]
    assert_caught(
        cases,
        _case("test_fault_coarse_cast", "test_autocast_training_tracks_fp32", dtype),
        f"autocast(cpu, {TORCH_DTYPE[dtype]}) training: step",
        "vs fp32",
        f"> bound loss_rel {loss_bound}",
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_autocast_that_does_nothing_is_caught(cases, dtype):
    low = TORCH_DTYPE[dtype]
    assert_caught(
        cases,
        _case("test_fault_autocast_does_nothing", "test_autocast_lower_precision_ops", dtype),
        "11 of 11 ops wrong",
        f"mm gave torch.float32 (expected {low})",
    )
    assert_caught(
        cases,
        _case("test_fault_autocast_does_nothing", "test_autocast_block_matches_fp32", dtype),
        "Linear outputs {'qkv': 'torch.float32'",
        f"(expected {low}): autocast did not run",
    )
    assert_caught(
        cases,
        _case("test_fault_autocast_does_nothing", "test_autocast_activation_memory", dtype),
        "activation ratio autocast/fp32 1.0000 (2097152 B / 2097152 B kept after forward) > bound 0.5891",
    )


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scaler_stepping_on_inf_is_caught(cases, dtype, optimizer):
    assert_caught(
        cases,
        _case("test_fault_scaler_steps_on_inf", "test_grad_scaler_skips_nonfinite_and_rescales", dtype, optimizer),
        f"+ {optimizer}, inf gradient at step 2: the step was not skipped: param ",
        "#wrong=",
        "(bound: exact)",
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_optimizer_ignoring_found_inf_is_caught(cases, dtype):
    for optimizer in OPTIMIZERS:
        key = _case(
            "test_fault_fused_ignores_found_inf", "test_grad_scaler_skips_nonfinite_and_rescales", dtype, optimizer
        )
        if optimizer.endswith("_fused"):
            assert_caught(cases, key, f"+ {optimizer}, inf gradient at step 2: the step was not skipped")
        else:  # the fault is in the fused kernels only: the others must still pass
            assert cases[key].outcome == "passed", f"{key}: {cases[key].outcome}: {cases[key].text[:500]}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_without_backoff_is_caught(cases, dtype):
    key = _case("test_fault_no_backoff", "test_grad_scaler_skips_nonfinite_and_rescales", dtype, "adam")
    assert_caught(
        cases, key, "scale after each step [256.0, 256.0, 512.0, 1024.0]", "(expected [256.0, 128.0, 256.0, 512.0]"
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_late_scale_growth_is_caught(cases, dtype):
    key = _case("test_fault_late_growth", "test_grad_scaler_skips_nonfinite_and_rescales", dtype, "sgd")
    assert_caught(
        cases, key, "scale after each step [128.0, 64.0, 64.0, 128.0]", "(expected [256.0, 128.0, 256.0, 512.0]"
    )


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_foreach", "adam", "adam_foreach"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_missing_unscale_is_caught(cases, dtype, optimizer):
    # Fused optimizers unscale inside their kernel, so the fault does not reach them. With
    # scaled gradients SGD may blow up into an overflow, which the scale trajectory then shows.
    key = _case("test_fault_no_unscale", "test_grad_scaler_skips_nonfinite_and_rescales", dtype, optimizer)
    assert_caught(cases, key, f"+ {optimizer}")
    text = cases[key].text
    assert ("differs from the unscaled control" in text and "outside tolerance" in text and "> bound" in text) or (
        "scale after each step" in text and "(expected [256.0, 128.0, 256.0, 512.0]" in text
    ), text[:800]


def test_second_unscale_allowed_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_unscale_twice_allowed::test_grad_scaler_unscale_twice_raises[cpu]",
        "second unscale_ before update() raised nothing (expected RuntimeError)",
        "gradients are now 0.01562x the unscaled ones (expected 1)",
    )
