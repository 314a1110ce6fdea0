"""The group and device-mesh checks catch groups that are not what they claim.

Faults planted in the ranks: group all_reduces that run over the whole world (members get
non-members' data, non-members' buffers change, and one half of the world cannot finish
while the other stays out), a group-rank lookup that returns the global rank, new_subgroups
that hands every rank the first block, and a DeviceMesh whose dp and tp groups are swapped
(at 2 ranks and, as a real 2-D mesh, at 4). The world-size-4 cases, clean and faulted, run
with ``--gpuconform-cpu-ranks 4`` (gloo ranks oversubscribe the cores for small tensors).
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

GROUPS = "from pytest_gpuconform.conformance.test_groups import {name}\n"
MESH = "from pytest_gpuconform.conformance.test_device_mesh import {name}\n"

# Every group all_reduce (members' and non-members' calls alike) runs on the default group.
WHOLE_WORLD = """
import torch.distributed as dist
_real = dist.all_reduce
def _whole_world(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    return _real(tensor, op, None, async_op)
dist.all_reduce = _whole_world
"""

FAULTS = {
    "test_fault_group_is_the_world": WHOLE_WORLD + GROUPS.format(name="test_new_group_members_get_group_result"),
    "test_fault_group_needs_everyone": WHOLE_WORLD + GROUPS.format(name="test_new_group_does_not_need_non_members"),
    "test_fault_group_rank_is_global": """
import torch.distributed as dist
dist.get_group_rank = lambda group, global_rank: global_rank
"""
    + GROUPS.format(name="test_group_rank_mapping"),
    "test_fault_subgroups_first_block": """
import torch.distributed as dist
_real = dist.new_subgroups
def _first(*args, **kwargs):
    mine, subgroups = _real(*args, **kwargs)
    return subgroups[0], subgroups
dist.new_subgroups = _first
"""
    + GROUPS.format(name="test_new_subgroups"),
    "test_fault_mesh_axes_swapped": """
from torch.distributed.device_mesh import DeviceMesh
_real = DeviceMesh.get_group
def _swapped(self, mesh_dim=None):
    return _real(self, {"dp": "tp", "tp": "dp"}.get(mesh_dim, mesh_dim))
DeviceMesh.get_group = _swapped
"""
    + MESH.format(name="test_device_mesh_2d"),
    "test_clean_groups": GROUPS.format(name="test_new_group_members_get_group_result")
    + GROUPS.format(name="test_new_group_does_not_need_non_members")
    + MESH.format(name="test_device_mesh_2d"),
}

SELECTION = [
    "test_clean_groups.py::test_new_group_members_get_group_result[ws4-cpu]",
    "test_clean_groups.py::test_new_group_does_not_need_non_members[ws4-cpu]",
    "test_clean_groups.py::test_device_mesh_2d[ws4-cpu-dp2]",
    "test_clean_groups.py::test_device_mesh_2d[ws4-cpu-tp2]",
    "test_fault_group_is_the_world.py::test_new_group_members_get_group_result[ws2-cpu]",
    "test_fault_group_needs_everyone.py::test_new_group_does_not_need_non_members[ws2-cpu]",
    "test_fault_group_rank_is_global.py::test_group_rank_mapping[ws2-cpu]",
    "test_fault_subgroups_first_block.py::test_new_subgroups[ws2-cpu-new_subgroups]",
    "test_fault_mesh_axes_swapped.py::test_device_mesh_2d[ws2-cpu-tp2]",
    "test_fault_mesh_axes_swapped.py::test_device_mesh_2d[ws4-cpu-dp2]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(
        tmp_path_factory.mktemp("group_faults"), FAULTS, SELECTION, extra_args=("--gpuconform-cpu-ranks", "4")
    )


@pytest.mark.parametrize("key", [s.replace(".py", "") for s in SELECTION if s.startswith("test_clean")])
def test_clean_world_size_4_cases_pass(cases, key):
    case = cases[key]
    assert case.outcome == "passed", case.text[:1500]
    assert case.properties["wrong_elements"] == "0"


def test_group_collective_over_the_whole_world_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_group_is_the_world::test_new_group_members_get_group_result[ws2-cpu]",
        "new_group: 2 of 2 ranks wrong",
        "rank 0: group [0] all_reduce(sum) x1031: #wrong=",
        "rank 1: group [0] non-member rank 1's buffer: #wrong=",
        "(bound: exact)",
    )


def test_group_collective_that_needs_non_members_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_group_needs_everyone::test_new_group_does_not_need_non_members[ws2-cpu]",
        "rank 0: group [0] all_reduce while ranks [1] stayed out: failed after 10 s",
    )


def test_group_rank_mapping_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_group_rank_is_global::test_group_rank_mapping[ws2-cpu]",
        "rank 1: group [1] on rank 1: get_group_rank(group, r) for r: got [1] expected [0]",
    )


def test_subgroup_of_another_block_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_subgroups_first_block::test_new_subgroups[ws2-cpu-new_subgroups]",
        "new_subgroups: 1 of 2 ranks wrong",
        "rank 1: new_subgroups: rank 1's subgroup has ranks [0], expected [1]",
    )


@pytest.mark.parametrize(
    "key, shape",
    [
        ("test_fault_mesh_axes_swapped::test_device_mesh_2d[ws2-cpu-tp2]", "(1, 2)"),
        ("test_fault_mesh_axes_swapped::test_device_mesh_2d[ws4-cpu-dp2]", "(2, 2)"),
    ],
)
def test_mesh_with_swapped_axes_is_caught(cases, key, shape):
    assert_caught(
        cases,
        key,
        f"DeviceMesh {shape} (dp, tp)",
        f"rank 0: mesh {shape} dp group of rank 0: ranks [0, 1], expected {'[0]' if shape == '(1, 2)' else '[0, 2]'}",
        f"mesh {shape} all_reduce(sum) along dp",
        "#wrong=",
    )
