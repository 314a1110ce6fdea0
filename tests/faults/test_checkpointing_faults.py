"""Every checkpointing check catches the fault it exists for.

Each fault mimics a way activation checkpointing goes wrong in practice: a recompute that
sees different values than forward (a global changed in between, which the metadata-only
determinism check cannot see), a recompute that does not replay the RNG (OLMo-core #828), a
recompute outside forward's autocast state (pytorch#141896, #159359), a checkpoint that
saves everything (no memory saved), a checkpoint_sequential that also checkpoints its last
chunk, and a disabled determinism check. The shipped check must fail and say by how much.

All faults run in one pytest subprocess. The checks run in that pytest process (single
device, no ranks), so each fault is applied by an autouse fixture of its own module rather
than at import time: modules imported together must not see each other's faults.
"""

from __future__ import annotations

import re

import pytest

from support.rank_faults import assert_caught, run_faulted

RE_EXPORT = "from pytest_gpuconform.conformance.test_checkpointing import {name}\n"

# Patches torch.utils.checkpoint.checkpoint for the module's tests with ``faulty(real, fn,
# *args, **kwargs)``; checkpoint_sequential calls the module attribute, so it sees it too.
PATCH_CHECKPOINT = """
import pytest
import torch
from torch.utils import checkpoint as ckpt

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda fn, *a, **k: faulty(real, fn, *a, **k))
"""

FAULTS = {
    # The region scales its input by a global that changes between forward (1.0, exact) and
    # recompute (1 + 2**-6): same ops and shapes, so the metadata check cannot see it.
    "test_fault_recompute_differs": PATCH_CHECKPOINT
    + """
def faulty(real, fn, *args, **kwargs):
    calls = [0]
    def region(*inputs, **kw):
        calls[0] += 1
        factor = 1.0 if calls[0] == 1 else 1 + 2 ** -6
        return fn(*(t * factor if torch.is_tensor(t) else t for t in inputs), **kw)
    return real(region, *args, **kwargs)
"""
    + RE_EXPORT.format(name="test_checkpoint_matches_plain"),
    # The recompute draws fresh random numbers (preserve_rng_state forced off).
    "test_fault_no_rng_replay": PATCH_CHECKPOINT
    + """
def faulty(real, fn, *args, **kwargs):
    kwargs["preserve_rng_state"] = False
    return real(fn, *args, **kwargs)
"""
    + RE_EXPORT.format(name="test_checkpoint_dropout_matches_plain")
    + RE_EXPORT.format(name="test_checkpoint_dropout_mask_self_consistent"),
    # The recompute runs outside forward's autocast state.
    "test_fault_recompute_without_autocast": PATCH_CHECKPOINT
    + """
def faulty(real, fn, *args, **kwargs):
    calls = [0]
    def region(*inputs, **kw):
        calls[0] += 1
        if calls[0] == 1:
            return fn(*inputs, **kw)
        with torch.autocast("cpu", enabled=False):
            return fn(*inputs, **kw)
    return real(region, *args, **kwargs)
"""
    + RE_EXPORT.format(name="test_checkpoint_under_autocast_matches_plain"),
    # A checkpoint that just runs the function: correct numbers, no memory saved.
    "test_fault_saves_everything": PATCH_CHECKPOINT
    + """
CHECKPOINT_ONLY = {"use_reentrant", "preserve_rng_state", "context_fn", "determinism_check", "debug", "early_stop"}
def faulty(real, fn, *args, **kwargs):
    return fn(*args, **{k: v for k, v in kwargs.items() if k not in CHECKPOINT_ONLY})
"""
    + RE_EXPORT.format(name="test_checkpoint_activation_memory"),
    # Autograd keeps an extra copy of what GELU saves (a leaking saved-tensor hook, e.g. a
    # broken offload hook): the plain model no longer keeps its analytic size.
    "test_fault_extra_saved_copies": """
import pytest
import torch
from torch import nn

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    real = nn.GELU.forward
    def keeping_copies(self, x):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (t, t.clone()), lambda packed: packed[0]):
            return real(self, x)
    monkeypatch.setattr(nn.GELU, "forward", keeping_copies)
"""
    + RE_EXPORT.format(name="test_checkpoint_activation_memory"),
    # Dropout whose backward scales by 1/(1-p) * (1 + 2**-10): right mask, wrong values.
    "test_fault_dropout_backward_scale": """
import pytest
import torch

class OffScaleDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, real):
        out = real(x, p, True)
        ctx.save_for_backward(out != 0)
        ctx.scale = (1 + 2 ** -10) / (1 - p)
        return out

    @staticmethod
    def backward(ctx, grad):
        (kept,) = ctx.saved_tensors
        return grad * kept * ctx.scale, None, None

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    real = torch.nn.functional.dropout
    monkeypatch.setattr(torch.nn.functional, "dropout",
                        lambda x, p=0.5, training=True, inplace=False: OffScaleDropout.apply(x, p, real))
"""
    + RE_EXPORT.format(name="test_checkpoint_dropout_mask_self_consistent"),
    # checkpoint_sequential that checkpoints every chunk, the last one too.
    "test_fault_last_chunk_checkpointed": """
import pytest
from torch import nn
from torch.utils import checkpoint as ckpt

def every_chunk(functions, segments, input, use_reentrant=None, **kwargs):
    modules = list(functions.children()) if isinstance(functions, nn.Sequential) else list(functions)
    size = len(modules) // segments
    starts = [i * size for i in range(segments)] + [len(modules)]
    for start, end in zip(starts, starts[1:]):
        input = ckpt.checkpoint(nn.Sequential(*modules[start:end]), input, use_reentrant=use_reentrant)
    return input

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    monkeypatch.setattr(ckpt, "checkpoint_sequential", every_chunk)
"""
    + RE_EXPORT.format(name="test_checkpoint_sequential_recomputes_all_but_last_chunk"),
    # determinism_check forced to "none": a shape-changing recompute is no longer diagnosed.
    "test_fault_no_determinism_check": PATCH_CHECKPOINT
    + """
def faulty(real, fn, *args, **kwargs):
    kwargs["determinism_check"] = "none"
    return real(fn, *args, **kwargs)
"""
    + RE_EXPORT.format(name="test_checkpoint_recompute_shape_change_raises"),
}

TORCH_DTYPE = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
NUMERIC_VARIANTS = ("non_reentrant", "reentrant", "sequential_non_reentrant", "sequential_reentrant", "selective")
DROPOUT_VARIANTS = ("non_reentrant", "reentrant", "sequential_non_reentrant", "selective")
MEMORY_VARIANTS = {  # variant -> analytic bound + slack, as printed by the check
    "non_reentrant": "0.2600",
    "reentrant": "0.2600",
    "sequential_2": "0.5413",
    "sequential_4": "0.3538",
    "selective": "0.7600",
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpointing_faults")
    with pytest.MonkeyPatch.context() as env:
        # One intra-op thread: on a busy 2-core CI box torch's thread pool spins and the
        # tiny models take 3-4x longer; detection does not depend on threading.
        env.setenv("OMP_NUM_THREADS", "1")
        return run_faulted(directory, FAULTS, ["-k", "cpu", *(f"{name}.py" for name in FAULTS)], timeout=120)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("variant", NUMERIC_VARIANTS)
def test_recompute_that_differs_is_caught(cases, variant, dtype):
    key = f"test_fault_recompute_differs::test_checkpoint_matches_plain[cpu-{dtype}-{variant}]"
    assert_caught(
        cases,
        key,
        f"{variant} checkpoint vs plain ({TORCH_DTYPE[dtype]}, cpu)",
        "grad of",
        "max |diff|",
        "(bound: exact)",
    )


@pytest.mark.parametrize("variant", DROPOUT_VARIANTS)
def test_recompute_without_rng_replay_is_caught(cases, variant):
    assert_caught(
        cases,
        f"test_fault_no_rng_replay::test_checkpoint_dropout_matches_plain[cpu-{variant}]",
        f"{variant} checkpoint with dropout p=0.5 vs plain",
        "max |diff|",
        "(bound: exact)",
    )
    key = f"test_fault_no_rng_replay::test_checkpoint_dropout_mask_self_consistent[cpu-{variant}]"
    assert_caught(cases, key, "disagrees with forward's mask (bound: 0)")
    wrong = int(re.search(r"(\d+) of 4096 elements have a gradient", cases[key].text).group(1))
    assert wrong > 100, f"{key}: only {wrong} mask mismatches reported for a fresh p=0.5 mask"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("variant", NUMERIC_VARIANTS)
def test_recompute_outside_autocast_is_caught(cases, variant, dtype):
    key = f"test_fault_recompute_without_autocast::test_checkpoint_under_autocast_matches_plain[cpu-{dtype}-{variant}]"
    assert_caught(
        cases,
        key,
        f"{variant} checkpoint vs plain under autocast(cpu, {TORCH_DTYPE[dtype]})",
        "forward+backward raised",
    )
    # Non-reentrant SAC diagnoses the recompute by metadata (saved low dtype vs recomputed
    # float32); the others fail in backward on the dtype mix. Either way both dtypes are named.
    first_line = cases[key].text.splitlines()[0]
    low = {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    named = (f"torch.{low}" in first_line and "torch.float32" in first_line) or (
        f"{'Half' if dtype == 'fp16' else 'BFloat16'} and Float" in first_line
    )
    assert named, f"{key}: message names neither dtype pair: {first_line[:800]}"


@pytest.mark.parametrize("variant", sorted(MEMORY_VARIANTS))
def test_checkpoint_that_saves_everything_is_caught(cases, variant):
    key = f"test_fault_saves_everything::test_checkpoint_activation_memory[cpu-{variant}]"
    assert_caught(
        cases,
        key,
        "activation ratio checkpointed/plain 1.0000 (262144 B / 262144 B after forward)",
        f"> bound {MEMORY_VARIANTS[variant]}",
    )


@pytest.mark.parametrize("variant", sorted(MEMORY_VARIANTS))
def test_extra_saved_copies_are_caught(cases, variant):
    key = f"test_fault_extra_saved_copies::test_checkpoint_activation_memory[cpu-{variant}]"
    assert_caught(cases, key, "plain model (cpu) kept 393216 B after forward, analytic 262144 B")


@pytest.mark.parametrize("variant", DROPOUT_VARIANTS)
def test_wrong_dropout_gradient_scale_is_caught(cases, variant):
    key = f"test_fault_dropout_backward_scale::test_checkpoint_dropout_mask_self_consistent[cpu-{variant}]"
    assert_caught(
        cases, key, "kept elements' gradient differs from 2cos(d)/(1-p) by relative 0.000977", "(bound: rtol 1.3e-06)"
    )


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_checkpointed_last_chunk_is_caught(cases, mode):
    key = f"test_fault_last_chunk_checkpointed::test_checkpoint_sequential_recomputes_all_but_last_chunk[cpu-{mode}]"
    assert_caught(cases, key, "block 4 ran 2x, expected 1x", "block 7 ran 2x, expected 1x")


def test_missing_checkpoint_error_is_caught(cases):
    key = "test_fault_no_determinism_check::test_checkpoint_recompute_shape_change_raises[cpu]"
    assert_caught(cases, key, "(4, 6) -> (4, 7)", "raised RuntimeError", "(expected: CheckpointError)")
