"""The FSDP2 checks catch sharded training that is silently wrong or silently not sharded.

Faults are planted in the ranks mostly through FSDP2's own public knobs, applied by a
wrapped ``fully_shard``, so FSDP runs and only the promise under test breaks: gradients
summed instead of averaged (a divide factor of 1), a "sharding" over a mesh whose shard
dimension has size 1 (every rank holds everything, and trains correctly: only the memory
check can see it), an optimizer that hoards full copies (only the bytes kept show it),
resharding turned off, a mixed-precision policy dropped (compute in
fp32, closer to any reference) or reducing in bf16, clipping with each rank's local norm,
activation checkpointing that keeps everything or recomputes different values, HSDP
replicas that skip the all-reduce across replica groups, and an int reshard that reshards fully. Two subprocesses:
world size 2, and world size 4 on an oversubscribed CPU (``--gpuconform-cpu-ranks 4``).
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

RE_EXPORT = "from pytest_gpuconform.conformance.test_fsdp import {name}\n"

# fully_shard(module, **ADJUST(kwargs)) then AFTER(module); test_fsdp looks fully_shard up
# in torch.distributed.fsdp at every call, so it gets this one.
WRAP_FULLY_SHARD = """
import torch
import torch.distributed.fsdp as fsdp_api
_real = fsdp_api.fully_shard
ADJUST = lambda kwargs: kwargs
AFTER = lambda module: None
def _wrapped(module, **kwargs):
    sharded = _real(module, **ADJUST(kwargs))
    AFTER(sharded)
    return sharded
fsdp_api.fully_shard = _wrapped
"""

# The block's activation checkpoint replaced by ``CHECKPOINT(fn, x)``.
PATCH_CHECKPOINT = """
import torch
from torch.utils.checkpoint import checkpoint as _real_checkpoint
from pytest_gpuconform.conformance import _transformer
_transformer.checkpoint = lambda fn, x, **kwargs: CHECKPOINT(fn, x, **kwargs)
"""

FAULTS = {
    # Reduce-scatter sums the ranks' gradients without dividing by the world size.
    "test_fault_fsdp_sums_gradients": WRAP_FULLY_SHARD
    + """
def AFTER(module):  # gloo has no PREMUL_SUM: plain sums, divided by 1
    module.set_force_sum_reduction_for_comms(True)
    module.set_gradient_divide_factor(1.0)
"""
    + RE_EXPORT.format(name="test_fsdp_matches_single_process"),
    # "Sharded" over a (world, 1) mesh: replicated like DDP, numerically right, 1/1 memory.
    "test_fault_fsdp_not_sharded": WRAP_FULLY_SHARD
    + """
from torch.distributed.device_mesh import init_device_mesh
_replicated = []
def ADJUST(kwargs):
    if not _replicated:
        mesh = kwargs["mesh"]
        _replicated.append(init_device_mesh(mesh.device_type, (mesh.size(), 1), mesh_dim_names=("replicate", "shard")))
    return {**kwargs, "mesh": _replicated[0]}
"""
    + RE_EXPORT.format(name="test_fsdp_state_bytes_are_one_nth"),
    # reshard_after_forward ignored: unsharded parameters stay after every forward.
    "test_fault_fsdp_never_reshards": WRAP_FULLY_SHARD
    + """
ADJUST = lambda kwargs: {**kwargs, "reshard_after_forward": False}
"""
    + RE_EXPORT.format(name="test_fsdp_resharding_frees_parameters_after_forward"),
    # clip_grad_norm_ with each rank's local shard norm presented as the global one.
    "test_fault_fsdp_clip_local_norm": """
import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.nn.utils import clip_grad
_real = clip_grad._get_total_norm
def _local_norm(tensors, *args, **kwargs):
    tensors = list(tensors)
    dtensors = [t for t in tensors if isinstance(t, DTensor)]
    if not dtensors:
        return _real(tensors, *args, **kwargs)
    norm = _real([t.to_local() for t in tensors], *args, **kwargs)
    return DTensor.from_local(norm, dtensors[0].device_mesh, [Replicate()] * dtensors[0].device_mesh.ndim)
clip_grad._get_total_norm = _local_norm
"""
    + RE_EXPORT.format(name="test_fsdp_clip_grad_norm_matches_full_model"),
    # Under the mixed-precision policy, gradients summed instead of averaged.
    "test_fault_fsdp_mp_sums_gradients": WRAP_FULLY_SHARD
    + """
def AFTER(module):
    module.set_force_sum_reduction_for_comms(True)
    module.set_gradient_divide_factor(1.0)
"""
    + RE_EXPORT.format(name="test_fsdp_mixed_precision_matches_reference"),
    # Adam keeps a gathered full copy of every sharded parameter: the state shards are right,
    # the rank's memory is not 1/N (only the bytes kept by the step show it).
    "test_fault_fsdp_optimizer_keeps_full_copies": """
import torch
_real_step = torch.optim.Adam.step
_kept = []
def _hoarding_step(self, *args, **kwargs):
    for group in self.param_groups:
        _kept.extend(p.full_tensor() for p in group["params"] if hasattr(p, "full_tensor"))
    return _real_step(self, *args, **kwargs)
torch.optim.Adam.step = _hoarding_step
"""
    + RE_EXPORT.format(name="test_fsdp_state_bytes_are_one_nth"),
    # The mixed-precision policy is dropped: compute in fp32.
    "test_fault_fsdp_mp_policy_ignored": WRAP_FULLY_SHARD
    + """
ADJUST = lambda kwargs: {k: v for k, v in kwargs.items() if k != "mp_policy"}
"""
    + RE_EXPORT.format(name="test_fsdp_mixed_precision_matches_reference"),
    # Gradients reduced in bf16 although reduce_dtype=fp32 was asked for.
    "test_fault_fsdp_mp_reduces_in_bf16": WRAP_FULLY_SHARD
    + """
from torch.distributed.fsdp import MixedPrecisionPolicy
def ADJUST(kwargs):
    if "mp_policy" in kwargs:
        kwargs = {**kwargs, "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)}
    return kwargs
"""
    + RE_EXPORT.format(name="test_fsdp_mixed_precision_matches_reference"),
    # A checkpoint that just runs the block: right numbers, nothing saved.
    "test_fault_fsdp_checkpoint_keeps_everything": PATCH_CHECKPOINT
    + """
CHECKPOINT = lambda fn, x, **kwargs: fn(x)
"""
    + RE_EXPORT.format(name="test_fsdp_with_activation_checkpointing"),
    # The recompute sees its input scaled by 1 + 2**-10 (forward saw it exact).
    "test_fault_fsdp_recompute_differs": PATCH_CHECKPOINT
    + """
def CHECKPOINT(fn, x, **kwargs):
    calls = [0]
    def region(t):
        calls[0] += 1
        return fn(t if calls[0] == 1 else t * (1 + 2 ** -10))
    return _real_checkpoint(region, x, **kwargs)
"""
    + RE_EXPORT.format(name="test_fsdp_with_activation_checkpointing"),
}

SELECTION = [
    "test_fault_fsdp_sums_gradients.py::test_fsdp_matches_single_process[ws2-cpu-reshard]",
    "test_fault_fsdp_not_sharded.py::test_fsdp_state_bytes_are_one_nth[ws2-cpu]",
    "test_fault_fsdp_never_reshards.py::test_fsdp_resharding_frees_parameters_after_forward[ws2-cpu]",
    "test_fault_fsdp_clip_local_norm.py::test_fsdp_clip_grad_norm_matches_full_model[ws2-cpu]",
    "test_fault_fsdp_mp_sums_gradients.py::test_fsdp_mixed_precision_matches_reference[ws2-cpu-bf16]",
    "test_fault_fsdp_optimizer_keeps_full_copies.py::test_fsdp_state_bytes_are_one_nth[ws2-cpu]",
    "test_fault_fsdp_mp_policy_ignored.py::test_fsdp_mixed_precision_matches_reference[ws2-cpu-bf16]",
    "test_fault_fsdp_mp_reduces_in_bf16.py::test_fsdp_mixed_precision_matches_reference[ws2-cpu-bf16]",
    "test_fault_fsdp_checkpoint_keeps_everything.py::test_fsdp_with_activation_checkpointing[ws2-cpu]",
    "test_fault_fsdp_recompute_differs.py::test_fsdp_with_activation_checkpointing[ws2-cpu]",
]

WORLD_4_FAULTS = {
    # HSDP without the all-reduce across replicas: each replica group averages only its
    # own ranks' gradients and trains on its half of the batch.
    "test_fault_hsdp_replicas_not_reduced": """
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
_real = _fsdp_param_group.foreach_reduce
def _no_replica_all_reduce(*args, **kwargs):
    args = list(args)
    args[9] = None  # all_reduce_group
    return _real(*args, **kwargs)
_fsdp_param_group.foreach_reduce = _no_replica_all_reduce
"""
    + RE_EXPORT.format(name="test_hsdp_matches_single_process"),
    # reshard_after_forward=2 treated as True: nothing kept for the smaller group.
    "test_fault_fsdp_int_reshard_is_full": WRAP_FULLY_SHARD
    + """
ADJUST = lambda kwargs: {**kwargs, "reshard_after_forward": True} if kwargs.get("reshard_after_forward") == 2 else kwargs
"""
    + RE_EXPORT.format(name="test_fsdp_reshard_to_smaller_group"),
}

WORLD_4_SELECTION = [
    "--gpuconform-cpu-ranks=4",
    "test_fault_hsdp_replicas_not_reduced.py::test_hsdp_matches_single_process[ws4-cpu]",
    "test_fault_fsdp_int_reshard_is_full.py::test_fsdp_reshard_to_smaller_group[ws4-cpu]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("fsdp_faults"), FAULTS, SELECTION)


@pytest.fixture(scope="module")
def world_4_cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("fsdp_ws4_faults"), WORLD_4_FAULTS, WORLD_4_SELECTION, timeout=120)


def test_gradients_summed_not_averaged_are_caught(cases):
    assert_caught(
        cases,
        "test_fault_fsdp_sums_gradients::test_fsdp_matches_single_process[ws2-cpu-reshard]",
        "FSDP2(reshard_after_forward=True) vs single process: 2 of 2 ranks wrong",
        "rank 0: step 1 grad 'layers.0.",
        "outside tolerance",
        "|diff|=",
        "(atol=1e-05, rtol=1.3e-06)",
    )


def test_replicated_instead_of_sharded_is_caught_by_memory(cases):
    assert_caught(
        cases,
        "test_fault_fsdp_not_sharded::test_fsdp_state_bytes_are_one_nth[ws2-cpu]",
        "FSDP2 per-rank state bytes",
        "rank 0: state_bytes_ratio=1",
        "kept_bytes_ratio=",
        "expected 1/2 within",
    )


def test_resharding_that_keeps_parameters_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_fsdp_never_reshards::test_fsdp_resharding_frees_parameters_after_forward[ws2-cpu]",
        "FSDP2 reshard_after_forward memory",
        "rank 0: resharding saves 0 B after forward",
        "expected the unsharded parameters: 152224 B",
        "forward peak with resharding",
    )


def test_clipping_with_local_norms_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_fsdp_clip_local_norm::test_fsdp_clip_grad_norm_matches_full_model[ws2-cpu]",
        "FSDP2 clip_grad_norm_(max_norm=0.05) vs single process",
        "step 1 total grad norm of clip_grad_norm_: 1 of 1 elements outside tolerance",
    )


def test_mixed_precision_gradients_summed_are_caught_by_the_bf16_row(cases):
    assert_caught(
        cases,
        "test_fault_fsdp_mp_sums_gradients::test_fsdp_mixed_precision_matches_reference[ws2-cpu-bf16]",
        "FSDP2 MixedPrecisionPolicy(param_dtype=torch.bfloat16): 2 of 2 ranks wrong",
        "step 1 grad 'layers.0.",
        "rel_l2=1 > bound 0.02",
    )


def test_hidden_full_copies_are_caught_by_the_bytes_kept(cases):
    key = "test_fault_fsdp_optimizer_keeps_full_copies::test_fsdp_state_bytes_are_one_nth[ws2-cpu]"
    assert_caught(cases, key, "FSDP2 per-rank state bytes", "rank 0: kept_bytes_ratio=0.75", "expected 1/2 within")
    assert "state_bytes_ratio=" not in cases[key].text, "the state shards themselves were right"


def test_ignored_mixed_precision_policy_is_caught_by_compute_dtype(cases):
    assert_caught(
        cases,
        "test_fault_fsdp_mp_policy_ignored::test_fsdp_mixed_precision_matches_reference[ws2-cpu-bf16]",
        "FSDP2 MixedPrecisionPolicy(param_dtype=torch.bfloat16)",
        "ran with inputs in ['torch.float32'], expected only torch.bfloat16 (param_dtype)",
    )


def test_reduction_in_bf16_is_caught_by_the_rounding_grid(cases):
    assert_caught(
        cases,
        "test_fault_fsdp_mp_reduces_in_bf16::test_fsdp_mixed_precision_matches_reference[ws2-cpu-bf16]",
        "only 0 of the reduced gradient elements are off the torch.bfloat16 grid (min 0.1)",
        "not in reduce_dtype=fp32",
    )


def test_checkpoint_that_keeps_everything_under_fsdp_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_fsdp_checkpoint_keeps_everything::test_fsdp_with_activation_checkpointing[ws2-cpu]",
        "FSDP2 + activation checkpointing",
        "checkpointed model keeps",
        "> bound 0.2",
    )


def test_recompute_that_differs_under_fsdp_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_fsdp_recompute_differs::test_fsdp_with_activation_checkpointing[ws2-cpu]",
        "FSDP2 + activation checkpointing",
        "with checkpointing: #wrong=",
        "(bound: exact)",
    )


def test_hsdp_without_replica_all_reduce_is_caught(world_4_cases):
    assert_caught(
        world_4_cases,
        "test_fault_hsdp_replicas_not_reduced::test_hsdp_matches_single_process[ws4-cpu]",
        "HSDP(2x2) vs single process: 4 of 4 ranks wrong",
        "step 1 grad",
        "outside tolerance",
    )


def test_int_reshard_that_reshards_fully_is_caught(world_4_cases):
    assert_caught(
        world_4_cases,
        "test_fault_fsdp_int_reshard_is_full::test_fsdp_reshard_to_smaller_group[ws4-cpu]",
        "reshard_after_forward=2 keeps 0 B more after forward than True",
        "expected half the unsharded parameters: 76112 B",
    )
