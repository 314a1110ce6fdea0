"""The object and functional collective checks catch objects and tensors that arrive changed.

Faults planted in the ranks: tuples that arrive as lists after broadcast_object_list,
all_gather_object slots swapped, a bf16 tensor inside a gathered object widened to fp32,
scatter_object_list handing every rank the first object, a functional all_gather along
dim 1 done along dim 0 and reshaped (the layout bug of a naive shard-dim-1 gather), and
a functional all_reduce("max") that sums, and an all_gather whose gradient is each rank's
own slice instead of the reduce_scatter of all. One subprocess runs them all.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

OBJECTS = "from pytest_gpuconform.conformance.test_object_collectives import {name}\n"
FUNCTIONAL = "from pytest_gpuconform.conformance.test_functional_collectives import {name}\n"

FAULTS = {
    "test_fault_object_tuple_becomes_list": """
import torch.distributed as dist
_real = dist.broadcast_object_list
def _listified(object_list, src=None, *args, **kwargs):
    _real(object_list, src, *args, **kwargs)
    if dist.get_rank() == 1 and src == 0:
        object_list[0]["flags"] = list(object_list[0]["flags"])
dist.broadcast_object_list = _listified
"""
    + OBJECTS.format(name="test_broadcast_object_list"),
    "test_fault_object_slots_swapped": """
import torch.distributed as dist
_real = dist.all_gather_object
def _swapped(object_list, obj, *args, **kwargs):
    _real(object_list, obj, *args, **kwargs)
    if dist.get_rank() == 0:
        object_list[0], object_list[1] = object_list[1], object_list[0]
dist.all_gather_object = _swapped
"""
    + OBJECTS.format(name="test_all_gather_object"),
    "test_fault_object_tensor_widened": """
import torch.distributed as dist
_real = dist.gather_object
def _widened(obj, object_gather_list=None, dst=None, *args, **kwargs):
    _real(obj, object_gather_list, dst, *args, **kwargs)
    if dist.get_rank() == dst == 1:
        layer = object_gather_list[0]["layers"][1]
        layer["scale"] = layer["scale"].float()
dist.gather_object = _widened
"""
    + OBJECTS.format(name="test_gather_object"),
    "test_fault_object_scatter_first": """
import torch.distributed as dist
_real = dist.scatter_object_list
def _first(output, inputs=None, src=None, *args, **kwargs):
    if inputs is not None:
        inputs = [inputs[0]] * len(inputs)
    return _real(output, inputs, src, *args, **kwargs)
dist.scatter_object_list = _first
"""
    + OBJECTS.format(name="test_scatter_object_list"),
    "test_fault_funcol_dim1_layout": """
import torch.distributed._functional_collectives as funcol
_real = funcol.all_gather_single
def _reshaped(tensor, gather_dim, group, *args, **kwargs):
    if gather_dim != 1:
        return _real(tensor, gather_dim, group, *args, **kwargs)
    gathered = funcol.wait_tensor(_real(tensor, 0, group, *args, **kwargs))
    return gathered.reshape(tensor.shape[0], -1)
funcol.all_gather_single = _reshaped
"""
    + FUNCTIONAL.format(name="test_functional_collectives"),
    "test_fault_funcol_max_sums": """
import torch.distributed._functional_collectives as funcol
_real = funcol.all_reduce
funcol.all_reduce = lambda tensor, op, group, *args: _real(tensor, "sum" if op == "max" else op, group, *args)
"""
    + FUNCTIONAL.format(name="test_functional_collectives"),
    # all_gather's gradient is each rank's own slice, not the reduce_scatter of every rank's.
    "test_fault_funcol_gather_backward_local": """
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
class _LocalBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.size = tensor.shape[0]
        return funcol.wait_tensor(funcol.all_gather_single(tensor, 0, group))
    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank()
        return grad[rank * ctx.size:(rank + 1) * ctx.size].clone(), None
funcol.all_gather_single_autograd = lambda tensor, gather_dim, group, *args: _LocalBackward.apply(tensor, group)
"""
    + FUNCTIONAL.format(name="test_functional_collectives"),
}

SELECTION = [
    "test_fault_object_tuple_becomes_list.py::test_broadcast_object_list[ws2-cpu]",
    "test_fault_object_slots_swapped.py::test_all_gather_object[ws2-cpu]",
    "test_fault_object_tensor_widened.py::test_gather_object[ws2-cpu]",
    "test_fault_object_scatter_first.py::test_scatter_object_list[ws2-cpu]",
    "test_fault_funcol_dim1_layout.py::test_functional_collectives[ws2-cpu-fp32]",
    "test_fault_funcol_max_sums.py::test_functional_collectives[ws2-cpu-int32]",
    "test_fault_funcol_gather_backward_local.py::test_functional_collectives[ws2-cpu-bf16]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("object_faults"), FAULTS, SELECTION)


def test_container_type_change_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_object_tuple_becomes_list::test_broadcast_object_list[ws2-cpu]",
        "rank 1: broadcast_object_list(root=0)[0]['flags']: type list != expected tuple",
    )


def test_objects_in_the_wrong_slots_are_caught(cases):
    assert_caught(
        cases,
        "test_fault_object_slots_swapped::test_all_gather_object[ws2-cpu]",
        "rank 0: all_gather_object[0]['source']: got 1 expected 0",
    )


def test_tensor_dtype_change_inside_an_object_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_object_tensor_widened::test_gather_object[ws2-cpu]",
        "rank 1: gather_object(root=1)[0]['layers'][1]['scale']: tensor torch.float32 (3,) "
        "!= expected torch.bfloat16 (3,)",
    )


def test_object_scattered_to_the_wrong_rank_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_object_scatter_first::test_scatter_object_list[ws2-cpu]",
        "rank 1: scatter_object_list(root=0)['source']: got 0 expected 1",
    )


def test_dim_1_gather_layout_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_funcol_dim1_layout::test_functional_collectives[ws2-cpu-fp32]",
        "funcol.all_gather_single(gather_dim=1) fp32 x1031 (4124 B): #wrong=",
        "(bound: exact)",
    )


def test_functional_reduction_with_the_wrong_operator_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_funcol_max_sums::test_functional_collectives[ws2-cpu-int32]",
        "rank 0: funcol.all_reduce(max, wait_tensor) int32 x1 (4 B): #wrong=1 of 1",
    )


def test_gradient_of_all_gather_that_is_not_reduced_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_funcol_gather_backward_local::test_functional_collectives[ws2-cpu-bf16]",
        "funcol.all_gather_single_autograd backward (reduce_scatter) bf16 x1 (2 B): #wrong=1 of 1",
    )
