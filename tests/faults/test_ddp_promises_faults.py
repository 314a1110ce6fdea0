"""The checks of DDP's other promises catch a DDP that breaks them silently.

Faults planted in the ranks: no broadcast of the model at construction; no buffer
broadcast at forward; buffers broadcast although ``broadcast_buffers=False``; ``join()``
without its final model broadcast, and one that always divides by the initial world size;
an allreduce hook that sums without dividing; PowerSGD forced down to rank 1 (far below
the gradients' rank); "fp16" compression that rounds to float8; and, on nodes with two
GPUs, SyncBatchNorm that normalises by each rank's own statistics. One subprocess runs
the CPU faults.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

STATE = "from pytest_gpuconform.conformance.test_ddp_state_broadcast import {name}\n"
JOIN = "from pytest_gpuconform.conformance.test_ddp_join import {name}\n"
HOOKS = "from pytest_gpuconform.conformance.test_ddp_comm_hooks import {name}\n"
SYNC_BN = "from pytest_gpuconform.conformance.test_sync_batchnorm import {name}\n"

FAULTS = {
    "test_fault_no_initial_broadcast": """
import torch.nn.parallel.distributed as ddp_module
ddp_module._sync_module_states = lambda *args, **kwargs: None
"""
    + STATE.format(name="test_ddp_initial_broadcast"),
    "test_fault_no_buffer_broadcast": """
from torch.nn.parallel import DistributedDataParallel
DistributedDataParallel._sync_buffers = lambda self: None
"""
    + STATE.format(name="test_ddp_buffers_at_forward"),
    "test_fault_buffers_always_broadcast": """
from torch.nn.parallel import DistributedDataParallel
_init = DistributedDataParallel.__init__
def _always(self, *args, **kwargs):
    kwargs["broadcast_buffers"] = True
    _init(self, *args, **kwargs)
DistributedDataParallel.__init__ = _always
"""
    + STATE.format(name="test_ddp_buffers_at_forward"),
    "test_fault_join_without_final_sync": """
from torch.nn.parallel import DistributedDataParallel
DistributedDataParallel._sync_final_model = lambda self, is_last_joiner: None
"""
    + JOIN.format(name="test_ddp_join_uneven_inputs"),
    "test_fault_join_divides_by_initial": """
from torch.nn.parallel import DistributedDataParallel
_join = DistributedDataParallel.join
def _initial(self, divide_by_initial_world_size=True, *args, **kwargs):
    return _join(self, True, *args, **kwargs)
DistributedDataParallel.join = _initial
"""
    + JOIN.format(name="test_ddp_join_uneven_inputs"),
    "test_fault_allreduce_hook_sums": """
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
def _sums(state, bucket):
    buffer = bucket.buffer()
    dist.all_reduce(buffer)
    future = torch.futures.Future()
    future.set_result(buffer)
    return future
default_hooks.allreduce_hook = _sums
"""
    + HOOKS.format(name="test_ddp_comm_hook"),
    "test_fault_powersgd_rank_1": """
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
_init = powerSGD_hook.PowerSGDState.__init__
def _rank_one(self, *args, **kwargs):
    kwargs["matrix_approximation_rank"] = 1
    _init(self, *args, **kwargs)
powerSGD_hook.PowerSGDState.__init__ = _rank_one
"""
    + HOOKS.format(name="test_ddp_comm_hook"),
    # "fp16" compression that really rounds to float8 (3 mantissa bits).
    "test_fault_coarse_compression": """
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
def _float8_hook(state, bucket):
    buffer = bucket.buffer()
    rounded = buffer.div(dist.get_world_size()).to(torch.float8_e4m3fn).to(buffer.dtype)
    dist.all_reduce(rounded)
    future = torch.futures.Future()
    future.set_result(buffer.copy_(rounded))
    return future
default_hooks.fp16_compress_hook = _float8_hook
"""
    + HOOKS.format(name="test_ddp_comm_hook"),
}

SELECTION = [
    "test_fault_no_initial_broadcast.py::test_ddp_initial_broadcast[ws2-cpu]",
    "test_fault_no_buffer_broadcast.py::test_ddp_buffers_at_forward[ws2-cpu-True]",
    "test_fault_buffers_always_broadcast.py::test_ddp_buffers_at_forward[ws2-cpu-False]",
    "test_fault_join_without_final_sync.py::test_ddp_join_uneven_inputs[ws2-cpu-initial_world_size]",
    "test_fault_join_divides_by_initial.py::test_ddp_join_uneven_inputs[ws2-cpu-active_ranks]",
    "test_fault_allreduce_hook_sums.py::test_ddp_comm_hook[ws2-cpu-allreduce]",
    "test_fault_powersgd_rank_1.py::test_ddp_comm_hook[ws2-cpu-powerSGD]",
    "test_fault_coarse_compression.py::test_ddp_comm_hook[ws2-cpu-fp16]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("ddp_promise_faults"), FAULTS, SELECTION)


def test_missing_initial_broadcast_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_no_initial_broadcast::test_ddp_initial_broadcast[ws2-cpu]",
        "DDP initial broadcast: 1 of 2 ranks wrong",
        "rank 1: embed.weight after wrapping vs rank 0's initial: #wrong=",
        "(bound: exact)",
    )


def test_missing_buffer_broadcast_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_no_buffer_broadcast::test_ddp_buffers_at_forward[ws2-cpu-True]",
        "rank 1: norm.running_mean after forward (broadcast_buffers=True) vs rank 0's drifted buffer: #wrong=32 of 32",
        "norm.num_batches_tracked after forward",
    )


def test_buffer_broadcast_when_disabled_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_buffers_always_broadcast::test_ddp_buffers_at_forward[ws2-cpu-False]",
        "rank 1: norm.running_mean after forward (broadcast_buffers=False) vs rank 1's drifted buffer: #wrong=",
    )


def test_join_without_the_final_broadcast_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_join_without_final_sync::test_ddp_join_uneven_inputs[ws2-cpu-initial_world_size]",
        "DDP join (divide by initial world size)",
        "rank 0: param 'embed.weight' after join vs single process's final:",
        "outside tolerance",
        "(bound: bitwise equal to rank 0)",
    )


def test_join_dividing_by_the_wrong_count_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_join_divides_by_initial::test_ddp_join_uneven_inputs[ws2-cpu-active_ranks]",
        "DDP join (divide by active ranks)",
        "rank 1: step 3 param 'embed.weight' vs single process:",
        "outside tolerance",
    )


def test_allreduce_hook_that_does_not_average_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_allreduce_hook_sums::test_ddp_comm_hook[ws2-cpu-allreduce]",
        "DDP comm hook allreduce",
        "rank 0: step 1 grad 'embed.weight' vs single process:",
        "outside tolerance",
    )


def test_powersgd_below_the_gradient_rank_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_powersgd_rank_1::test_ddp_comm_hook[ws2-cpu-powerSGD]",
        "DDP comm hook powerSGD",
        "step 3 grad",
        "vs single process: rel_l2=",
        "> bound 1e-05",
    )


def test_compression_coarser_than_fp16_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_coarse_compression::test_ddp_comm_hook[ws2-cpu-fp16]",
        "DDP comm hook fp16",
        "rank 0: step 1 grad 'embed.weight' vs single process: rel_l2=",
        "> bound 0.005",
    )


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


@pytest.mark.skipif(_gpus() < 2, reason="SyncBatchNorm exists for GPUs only; its fault test needs 2 GPUs")
def test_sync_batchnorm_with_local_statistics_is_caught(tmp_path):
    faults = {
        "test_fault_syncbn_local_stats": """
import torch
from torch.nn.modules.batchnorm import _BatchNorm
torch.nn.SyncBatchNorm.forward = _BatchNorm.forward
"""
        + SYNC_BN.format(name="test_sync_batchnorm_matches_full_batch")
    }
    key = "test_fault_syncbn_local_stats::test_sync_batchnorm_matches_full_batch[ws2-cuda]"
    cases = run_faulted(tmp_path, faults, [key.replace("::", ".py::")])
    assert_caught(
        cases,
        key,
        "SyncBatchNorm vs full-batch BatchNorm",
        "step 1 output (this rank's slice) vs single process:",
        "outside tolerance",
    )
