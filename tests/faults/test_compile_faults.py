"""The torch.compile checks catch generated code that is wrong, or not generated at all.

Faults: inductor's compiled graph whose outputs are 1e-4 off (a miscompiled kernel; its
gradients follow), a compile that drops autocast (the compiled code computes in fp32, which
is *closer* to eager than the bound and only the low-precision floor can see), a
torch.compile that returns the model uncompiled (eager passes every numeric check), a
compiled DDP model whose gradients are never averaged, and perturbed inductor code inside
FSDP2 ranks (0.1% off). The block checks run in the pytest process, so their faults are autouse
fixtures; the rank faults are installed at import and act only where a process group
exists (in the ranks). One subprocess runs them all; it compiles from scratch, so it is
the slowest fault run (~30 s on two cores).
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

RE_EXPORT = "from pytest_gpuconform.conformance.test_compile import {name}, inductor_cache_dir\n"

# A dynamo backend: inductor, with the compiled graph's output scaled by ``FACTOR``.
PERTURBED_INDUCTOR = """
import torch
from torch._inductor.compile_fx import compile_fx
FACTOR = 1 + 1e-4
def perturbed_inductor(gm, example_inputs):
    compiled = compile_fx(gm, example_inputs)
    def run(*args):
        outputs = compiled(*args)
        return type(outputs)(o * FACTOR if i == 0 else o for i, o in enumerate(outputs))
    return run
"""

# torch.compile replaced, for the tests of this module, by ``faulty(real, model, **kwargs)``.
PATCH_COMPILE = """
import pytest
import torch

@pytest.fixture(autouse=True)
def _fault(monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: faulty(real, model, **kwargs))
"""

FAULTS = {
    "test_fault_inductor_output_off": PERTURBED_INDUCTOR
    + PATCH_COMPILE
    + """
def faulty(real, model, **kwargs):
    return real(model, **{**kwargs, "backend": perturbed_inductor})
"""
    + RE_EXPORT.format(name="test_compiled_block_matches_eager"),
    # Under autocast, inductor's output 3% off (beyond the bf16 row's rel_l2 of 2e-2).
    "test_fault_inductor_autocast_output_off": PERTURBED_INDUCTOR
    + """
FACTOR = 1 + 2 ** -5
"""
    + PATCH_COMPILE
    + """
def faulty(real, model, **kwargs):
    return real(model, **{**kwargs, "backend": perturbed_inductor})
"""
    + RE_EXPORT.format(name="test_compiled_block_under_autocast"),
    "test_fault_compile_drops_autocast": PATCH_COMPILE
    + """
def faulty(real, model, **kwargs):
    compiled = real(model, **kwargs)
    def run(*args, **kw):
        with torch.autocast("cpu", enabled=False):
            return compiled(*args, **kw)
    return run
"""
    + RE_EXPORT.format(name="test_compiled_block_under_autocast"),
    "test_fault_compile_returns_eager": PATCH_COMPILE
    + """
def faulty(real, model, **kwargs):
    return model
"""
    + RE_EXPORT.format(name="test_compiled_block_matches_eager"),
    # Every DDP model gets a hook that returns each rank's own gradients.
    "test_fault_compiled_ddp_unreduced": """
import torch
from torch.nn.parallel import DistributedDataParallel
_init = DistributedDataParallel.__init__
def _local_only(state, bucket):
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future
def _init_with_hook(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.register_comm_hook(None, _local_only)
DistributedDataParallel.__init__ = _init_with_hook
"""
    + RE_EXPORT.format(name="test_compiled_model_under_ddp"),
    # In the ranks (where a process group exists), each compiled layer's output is 0.1%
    # off (a residual branch: 1e-4 would move the model's gradients by ~1e-5 only).
    "test_fault_compiled_fsdp_output_off": PERTURBED_INDUCTOR
    + """
import torch.distributed as dist
FACTOR = 1 + 1e-3
_real_compile = torch.compile
def _compile(model, **kwargs):
    if dist.is_initialized():
        kwargs = {**kwargs, "backend": perturbed_inductor}
    return _real_compile(model, **kwargs)
torch.compile = _compile
"""
    + RE_EXPORT.format(name="test_compiled_model_under_fsdp2"),
}

SELECTION = [
    "test_fault_inductor_output_off.py::test_compiled_block_matches_eager[cpu]",
    "test_fault_inductor_autocast_output_off.py::test_compiled_block_under_autocast[cpu-bf16]",
    "test_fault_compile_drops_autocast.py::test_compiled_block_under_autocast[cpu-bf16]",
    "test_fault_compile_returns_eager.py::test_compiled_block_matches_eager[cpu]",
    "test_fault_compiled_ddp_unreduced.py::test_compiled_model_under_ddp[ws2-cpu]",
    "test_fault_compiled_fsdp_output_off.py::test_compiled_model_under_fsdp2[ws2-cpu]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("compile_faults"), FAULTS, SELECTION, timeout=180)


def test_miscompiled_output_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_inductor_output_off::test_compiled_block_matches_eager[cpu]",
        "inductor block vs eager (cpu): compiled output:",
        "outside tolerance",
        "(atol=1e-05, rtol=1.3e-06)",
        "compiled grad ",
    )


def test_miscompiled_output_under_autocast_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_inductor_autocast_output_off::test_compiled_block_under_autocast[cpu-bf16]",
        "inductor block under autocast(torch.bfloat16)",
        "compiled output vs eager autocast: rel_l2=0.03",
        "> bound 0.02",
    )


def test_compile_that_drops_autocast_is_caught_by_the_floor(cases):
    assert_caught(
        cases,
        "test_fault_compile_drops_autocast::test_compiled_block_under_autocast[cpu-bf16]",
        "inductor block under autocast(torch.bfloat16)",
        "compiled results are within rel_l2",
        "of fp32 everywhere (floor 0.000488",
        "autocast(torch.bfloat16) was not applied",
    )


def test_uncompiled_model_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_compile_returns_eager::test_compiled_block_matches_eager[cpu]",
        "not compiled: dynamo captured 0 graphs, inductor compiled 0",
    )


def test_compiled_ddp_without_averaging_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_compiled_ddp_unreduced::test_compiled_model_under_ddp[ws2-cpu]",
        "compiled DDP vs eager single process: 2 of 2 ranks wrong",
        "step 1 grad",
        "vs eager single process:",
        "outside tolerance",
    )


def test_miscompiled_layers_under_fsdp_are_caught(cases):
    assert_caught(
        cases,
        "test_fault_compiled_fsdp_output_off::test_compiled_model_under_fsdp2[ws2-cpu]",
        "compiled layers under FSDP2 vs eager single process",
        "rank 0: step 1 grad",
        "outside tolerance",
    )
