"""The DCP checks catch checkpoints that do not bring the training state back.

Faults planted in the ranks, in DCP's planner and storage layers: rank 1 writes one element
of every tensor it saves off by one, the load plan leaves out the optimizer's moments, a single-process load reads only rank 0's shard files, and rank 1 commits loaded data
off by one. One subprocess runs them all.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

RE_EXPORT = "from pytest_gpuconform.conformance.test_dcp import {name}\n"

FAULTS = {
    "test_fault_dcp_rank1_writes_wrong": """
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import DefaultSavePlanner
_real = DefaultSavePlanner.resolve_data
def _off_by_one(self, write_item):
    data = _real(self, write_item)
    if torch.is_tensor(data) and dist.is_initialized() and dist.get_rank() == 1 and data.numel():
        data = data.detach().clone()
        data.view(-1)[0] += 1
    return data
DefaultSavePlanner.resolve_data = _off_by_one
"""
    + RE_EXPORT.format(name="test_dcp_sharded_roundtrip_bitwise"),
    # The load plan leaves out the optimizer's state tensors (its step counts stay).
    "test_fault_dcp_optimizer_not_restored": """
import dataclasses
from torch.distributed.checkpoint import DefaultLoadPlanner
_real = DefaultLoadPlanner.create_local_plan
def _without_optimizer_moments(self):
    plan = _real(self)
    items = [i for i in plan.items if not (i.dest_index.fqn.startswith("optim.state.") and
                                            not i.dest_index.fqn.endswith(".step"))]
    return dataclasses.replace(plan, items=items)
DefaultLoadPlanner.create_local_plan = _without_optimizer_moments
"""
    + RE_EXPORT.format(name="test_dcp_sharded_roundtrip_bitwise"),
    "test_fault_dcp_reads_only_rank0_files": """
import dataclasses
from torch.distributed.checkpoint import FileSystemReader
_real = FileSystemReader.read_data
def _rank0_files(self, plan, planner):
    items = [i for i in plan.items if self.storage_data[i.storage_index].relative_path.startswith("__0_")]
    return _real(self, dataclasses.replace(plan, items=items), planner)
FileSystemReader.read_data = _rank0_files
"""
    + RE_EXPORT.format(name="test_dcp_sharded_checkpoint_loads_in_one_process"),
    "test_fault_dcp_rank1_loads_wrong": """
import torch.distributed as dist
from torch.distributed.checkpoint import DefaultLoadPlanner
_real = DefaultLoadPlanner.commit_tensor
def _off_by_one(self, read_item, tensor):
    _real(self, read_item, tensor)
    if dist.is_initialized() and dist.get_rank() == 1 and tensor.numel():
        tensor.view(-1)[0] += 1
DefaultLoadPlanner.commit_tensor = _off_by_one
"""
    + RE_EXPORT.format(name="test_dcp_single_process_checkpoint_loads_sharded"),
}

SELECTION = [
    "test_fault_dcp_rank1_writes_wrong.py::test_dcp_sharded_roundtrip_bitwise[ws2-cpu]",
    "test_fault_dcp_optimizer_not_restored.py::test_dcp_sharded_roundtrip_bitwise[ws2-cpu]",
    "test_fault_dcp_reads_only_rank0_files.py::test_dcp_sharded_checkpoint_loads_in_one_process[ws2-cpu]",
    "test_fault_dcp_rank1_loads_wrong.py::test_dcp_single_process_checkpoint_loads_sharded[ws2-cpu]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("dcp_faults"), FAULTS, SELECTION)


def test_corrupted_write_is_caught_on_the_rank_that_wrote_it(cases):
    assert_caught(
        cases,
        "test_fault_dcp_rank1_writes_wrong::test_dcp_sharded_roundtrip_bitwise[ws2-cpu]",
        # rank 1 also wrote the replicated optimizer step counts that rank 0 loads
        "DCP save/load at world size 2: 2 of 2 ranks wrong",
        "rank 0: loaded state 'optim/state/",
        "rank 1: loaded state 'model/",
        "#wrong=1 of",
        "max |diff|=1 (bound: exact)",
    )


def test_optimizer_state_not_restored_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_dcp_optimizer_not_restored::test_dcp_sharded_roundtrip_bitwise[ws2-cpu]",
        "DCP save/load at world size 2: 2 of 2 ranks wrong",
        "loaded state 'optim/state/layers.0.attn_norm.weight/exp_avg': #wrong=16 of 16",
        "got 0.0",
    )


def test_load_that_reads_only_rank0_shards_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_dcp_reads_only_rank0_files::test_dcp_sharded_checkpoint_loads_in_one_process[ws2-cpu]",
        "DCP saved at world size 2, loaded at 1",
        "rank 0: world size 2 -> 1 'model/",
        "#wrong=",
    )


def test_corrupted_load_is_caught_on_the_loading_rank(cases):
    assert_caught(
        cases,
        "test_fault_dcp_rank1_loads_wrong::test_dcp_single_process_checkpoint_loads_sharded[ws2-cpu]",
        "DCP saved at world size 1, loaded at 2: 1 of 2 ranks wrong",
        "rank 1: world size 1 -> 2 '",
        "#wrong=1 of",
    )
