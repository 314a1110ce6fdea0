"""The pipeline checks catch schedules that compute something other than the model's step.

Faults planted in the ranks: a stage that perturbs the activations it sends, inputs whose
microbatches are reordered against their targets, the zero-bubble weight-gradient pass with
its double-counting guard removed (re-creating pytorch#180952 in the installed torch), a
traced stage that keeps parameters it does not own, and a 1F1B schedule that keeps as many
activations as GPipe while a stage leaks activations. One subprocess runs them all.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

RE_EXPORT = "from pytest_gpuconform.conformance.test_pipeline import {name}\n"

FAULTS = {
    # Stage 0 adds 1e-3 to every activation it sends downstream.
    "test_fault_pp_perturbed_send": """
from torch.distributed.pipelining.stage import _PipelineStageBase
_real = _PipelineStageBase.get_fwd_send_ops
def _perturbing(self, fwd_chunk_id):
    ops = _real(self, fwd_chunk_id)
    if self.stage_index == 0:
        for op in ops:
            op.tensor = op.tensor + 1e-3
    return ops
_PipelineStageBase.get_fwd_send_ops = _perturbing
"""
    + RE_EXPORT.format(name="test_schedule_matches_sequential"),
    # The first two input microbatches swap places; targets keep their order.
    "test_fault_pp_reordered_microbatch": """
import torch.distributed.pipelining.schedules as schedules
_real = schedules.split_args_kwargs_into_chunks
def _swapped(*args, **kwargs):
    arg_chunks, kwarg_chunks = _real(*args, **kwargs)
    arg_chunks[0], arg_chunks[1] = arg_chunks[1], arg_chunks[0]
    return arg_chunks, kwarg_chunks
schedules.split_args_kwargs_into_chunks = _swapped
"""
    + RE_EXPORT.format(name="test_schedule_matches_sequential"),
    # pytorch#180952 brought back: the split dW pass loses its "clamp saved grads" guard,
    # which it only installs when a parameter group has more than one intermediate.
    "test_fault_pp_zero_bubble_double_count": """
import torch.distributed.pipelining.stage as stage_module
_real = stage_module.stage_backward_weight
class _LooksLikeOne(list):
    def __len__(self):
        return 1
def _unguarded(weights, param_groups, retain_graph=False):
    for group in param_groups:
        group["intermediates"] = _LooksLikeOne(group["intermediates"])
    return _real(weights, param_groups, retain_graph=retain_graph)
stage_module.stage_backward_weight = _unguarded
"""
    + RE_EXPORT.format(name="test_schedule_matches_sequential"),
    # The traced stage module also keeps a stray copy of another block.
    "test_fault_pp_traced_stage_keeps_more": """
import copy
from torch.distributed.pipelining._IR import Pipe
_real = Pipe.get_stage_module
def _bloated(self, stage_idx):
    module = _real(self, stage_idx)
    if not hasattr(module, "stray"):
        other = _real(self, 1 - stage_idx)
        module.stray = copy.deepcopy(other)
    return module
Pipe.get_stage_module = _bloated
"""
    + RE_EXPORT.format(name="test_traced_pipeline_matches_sequential"),
    # 1F1B replaced by GPipe, and every stage output kept alive five times over.
    "test_fault_pp_memory": """
import torch.distributed.pipelining as pipelining
from torch.distributed.pipelining.stage import _PipelineStageBase
pipelining.Schedule1F1B = pipelining.ScheduleGPipe
_leaked = []
_real = _PipelineStageBase.forward_one_chunk
def _leaky(self, *args, **kwargs):
    out = _real(self, *args, **kwargs)
    for tensor in (out if isinstance(out, tuple) else (out,)):
        _leaked.extend(tensor.detach().clone() for _ in range(5))
    return out
_PipelineStageBase.forward_one_chunk = _leaky
"""
    + RE_EXPORT.format(name="test_pipeline_memory"),
}

SELECTION = [
    "test_fault_pp_perturbed_send.py::test_schedule_matches_sequential[ws2-cpu-1F1B]",
    "test_fault_pp_reordered_microbatch.py::test_schedule_matches_sequential[ws2-cpu-GPipe]",
    "test_fault_pp_zero_bubble_double_count.py::test_schedule_matches_sequential[ws2-cpu-InterleavedZeroBubble]",
    "test_fault_pp_traced_stage_keeps_more.py::test_traced_pipeline_matches_sequential[ws2-cpu-GPipe]",
    "test_fault_pp_memory.py::test_pipeline_memory[ws2-cpu]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("pipeline_faults"), FAULTS, SELECTION)


def test_stage_perturbing_its_sends_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_pp_perturbed_send::test_schedule_matches_sequential[ws2-cpu-1F1B]",
        "pipeline 1F1B",
        "rank 1: step 1 pipeline output:",
        "outside tolerance",
        "|diff|=",
    )


def test_reordered_microbatch_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_pp_reordered_microbatch::test_schedule_matches_sequential[ws2-cpu-GPipe]",
        "pipeline GPipe",
        "rank 1: step 1 pipeline output:",
        "step 1 loss (mean of 4 microbatch losses):",
        "grad '0.layer.linear.weight'",
        "outside tolerance",
    )


def test_zero_bubble_double_counted_shared_weight_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_pp_zero_bubble_double_count::test_schedule_matches_sequential[ws2-cpu-InterleavedZeroBubble]",
        "pipeline InterleavedZeroBubble",
        "rank 0: step 1 grad '2.shared.weight'",
        "outside tolerance",
        "|diff|=",
    )


def test_traced_stage_holding_extra_parameters_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_pp_traced_stage_keeps_more::test_traced_pipeline_matches_sequential[ws2-cpu-GPipe]",
        "traced pipeline GPipe",
        "rank 0: stage 0 holds 1056 parameters; its slice has 528, the whole model 1056",
    )


def test_memory_checks_catch_gpipe_like_1f1b_and_leaking_stage(cases):
    assert_caught(
        cases,
        "test_fault_pp_memory::test_pipeline_memory[ws2-cpu]",
        "pipeline memory",
        "rank 0: 1F1B peak",
        ">= GPipe peak",
        "bound < 1) at 8 microbatches",
        "stage peak",
        ">= whole-model peak",
    )
