"""The tensor-parallel and DTensor checks catch sharded compute that is silently wrong.

Faults planted in the ranks, in DTensor's and the parallel styles' own Python layers: a
parallelize_module that does nothing (the numbers stay right), a RowwiseParallel that hands on its partial sums without the all_reduce, a reduce_scatter
that keeps each rank's own partial chunk (sequence parallelism's output), an all_gather
that assembles the shards in the wrong order, a Partial("max") reduced as a sum, and an
activation checkpoint that keeps everything under TP. Each caught fault costs a fresh
pair of ranks, so each is tried on one representative case (the attention block: heads
split over ranks; the gather along a non-leading dimension). One subprocess runs them all.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

RE_EXPORT = "from pytest_gpuconform.conformance.test_tensor_parallel import {name}\n"

FAULTS = {
    # Rowwise output stays a partial sum: no all_reduce.
    "test_fault_tp_rowwise_unreduced": """
from torch.distributed.tensor.parallel import RowwiseParallel
def _partial_out(output_layouts, use_local_output, mod, outputs, device_mesh):
    return outputs.to_local() if use_local_output else outputs
RowwiseParallel._prepare_output_fn = staticmethod(_partial_out)
"""
    + RE_EXPORT.format(name="test_tensor_parallel_matches_single_process"),
    # parallelize_module that leaves the module whole: right numbers, nothing parallel.
    "test_fault_tp_not_parallelized": """
import torch.distributed.tensor.parallel as tp_api
tp_api.parallelize_module = lambda module, device_mesh=None, parallelize_plan=None, **kwargs: module
"""
    + RE_EXPORT.format(name="test_tensor_parallel_matches_single_process"),
    # reduce_scatter that skips the reduction: each rank keeps its chunk of its own partial.
    "test_fault_tp_reduce_scatter_unreduced": """
from torch.distributed.tensor import Partial
def _own_chunk(self, tensor, mesh, mesh_dim, shard_spec):
    rank = mesh.get_local_rank(mesh_dim)
    return tensor.chunk(mesh.size(mesh_dim), dim=shard_spec.dim)[rank].contiguous()
Partial._reduce_shard_value = _own_chunk
"""
    + RE_EXPORT.format(name="test_tensor_parallel_matches_single_process")
    + RE_EXPORT.format(name="test_dtensor_redistribute_exact"),
    # all_gather result rolled by one row along the gathered dim: shards out of order.
    "test_fault_dtensor_all_gather_misordered": """
from torch.distributed.tensor import Shard
_real = Shard._to_replicate_tensor
def _rolled(self, *args, **kwargs):
    return _real(self, *args, **kwargs).roll(1, dims=self.dim)
Shard._to_replicate_tensor = _rolled
"""
    + RE_EXPORT.format(name="test_dtensor_redistribute_exact"),
    # Partial("max") reduced with a sum.
    "test_fault_dtensor_partial_max_summed": """
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import Partial
def _summed(self, tensor, mesh, mesh_dim):
    return funcol.all_reduce(tensor, reduceOp="sum", group=(mesh, mesh_dim))
Partial._reduce_value = _summed
"""
    + RE_EXPORT.format(name="test_dtensor_redistribute_exact"),
    # The block's checkpoint just runs it: nothing saved under TP.
    "test_fault_tp_checkpoint_keeps_everything": """
from pytest_gpuconform.conformance import _transformer
_transformer.checkpoint = lambda fn, x, **kwargs: fn(x)
"""
    + RE_EXPORT.format(name="test_tensor_parallel_with_activation_checkpointing"),
}

SELECTION = [
    "test_fault_tp_rowwise_unreduced.py::test_tensor_parallel_matches_single_process[ws2-cpu-attention]",
    "test_fault_tp_not_parallelized.py::test_tensor_parallel_matches_single_process[ws2-cpu-mlp]",
    "test_fault_tp_reduce_scatter_unreduced.py::test_tensor_parallel_matches_single_process"
    "[ws2-cpu-sequence_parallel_block]",
    "test_fault_tp_reduce_scatter_unreduced.py::test_dtensor_redistribute_exact[ws2-cpu-partial_to_shard0]",
    "test_fault_dtensor_all_gather_misordered.py::test_dtensor_redistribute_exact[ws2-cpu-shard1_to_replicate]",
    "test_fault_dtensor_partial_max_summed.py::test_dtensor_redistribute_exact[ws2-cpu-partial_max_to_replicate]",
    "test_fault_tp_checkpoint_keeps_everything.py::test_tensor_parallel_with_activation_checkpointing[ws2-cpu]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("tp_faults"), FAULTS, SELECTION)


def test_rowwise_without_all_reduce_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_tp_rowwise_unreduced::test_tensor_parallel_matches_single_process[ws2-cpu-attention]",
        "tensor parallel attention vs single process: 2 of 2 ranks wrong",
        "rank 0: attention output:",
        "outside tolerance",
        "|diff|=",
    )


def test_module_left_unparallelized_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_tp_not_parallelized::test_tensor_parallel_matches_single_process[ws2-cpu-mlp]",
        "mlp: no parameter is sharded after parallelize_module",
    )


def test_reduce_scatter_without_reduction_is_caught_by_redistribute(cases):
    assert_caught(
        cases,
        "test_fault_tp_reduce_scatter_unreduced::test_dtensor_redistribute_exact[ws2-cpu-partial_to_shard0]",
        "DTensor redistribute P -> S0",
        "partial_to_shard0: local part: #wrong=",
    )


def test_reduce_scatter_without_reduction_is_caught(cases):
    key = (
        "test_fault_tp_reduce_scatter_unreduced::test_tensor_parallel_matches_single_process"
        "[ws2-cpu-sequence_parallel_block]"
    )
    assert_caught(
        cases,
        key,
        "tensor parallel sequence_parallel_block vs single process",
        "sequence_parallel_block output:",
        "outside tolerance",
    )


def test_misordered_all_gather_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_dtensor_all_gather_misordered::test_dtensor_redistribute_exact[ws2-cpu-shard1_to_replicate]",
        "DTensor redistribute S1 -> R",
        "shard1_to_replicate: local part: #wrong=",
        "first at [",
        "(bound: exact)",
    )


def test_partial_max_reduced_as_sum_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_dtensor_partial_max_summed::test_dtensor_redistribute_exact[ws2-cpu-partial_max_to_replicate]",
        "DTensor redistribute Pmax -> R",
        "partial_max_to_replicate: local part: #wrong=",
        "max |diff|=",
    )


def test_checkpoint_that_keeps_everything_under_tp_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_tp_checkpoint_keeps_everything::test_tensor_parallel_with_activation_checkpointing[ws2-cpu]",
        "tensor parallel + activation checkpointing",
        "ratio 1 > bound 0.312",
    )
