"""The DDP checks catch data parallelism that is silently wrong.

Faults are planted in the ranks through DDP's own extension point (communication hooks,
registered by a patched constructor) or by patching ``no_sync`` and ``clip_grad_norm_``,
so DDP itself runs and only the part under test misbehaves: gradients never averaged
(each rank trains alone), summed but not divided, one configuration drifting from the
default, a tied weight's gradient counted twice, ``no_sync`` that communicates or loses
the accumulated gradients, clipping that sees a different set of gradients on one rank,
and gradients of a checkpointed block left unreduced. One subprocess runs them all.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

RE_EXPORT = "from pytest_gpuconform.conformance.test_ddp import {name}\n"

# Registers ``hook`` on every DDP model the check builds (DDP allows one hook per model).
HOOK_ON_EVERY_DDP = """
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
_init = DistributedDataParallel.__init__
def _init_with_hook(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if WANTS_HOOK(kwargs):
        self.register_comm_hook(None, HOOK)
DistributedDataParallel.__init__ = _init_with_hook
def _done(tensor):
    future = torch.futures.Future()
    future.set_result(tensor)
    return future
"""

FAULTS = {
    # Each rank keeps its own gradient: no all_reduce at all.
    "test_fault_ddp_never_averages": HOOK_ON_EVERY_DDP
    + """
def HOOK(state, bucket):
    return _done(bucket.buffer())
WANTS_HOOK = lambda kwargs: True
"""
    + RE_EXPORT.format(name="test_ddp_matches_single_process"),
    # all_reduce(SUM) without dividing by the world size.
    "test_fault_ddp_sums": HOOK_ON_EVERY_DDP
    + """
def HOOK(state, bucket):
    buffer = bucket.buffer()
    dist.all_reduce(buffer)
    return _done(buffer)
WANTS_HOOK = lambda kwargs: True
"""
    + RE_EXPORT.format(name="test_ddp_matches_single_process"),
    # static_graph averages correctly but scales by 1.001: a configuration that drifts.
    "test_fault_ddp_config_drift": HOOK_ON_EVERY_DDP
    + """
def HOOK(state, bucket):
    buffer = bucket.buffer()
    dist.all_reduce(buffer)
    return _done(buffer.div_(dist.get_world_size()).mul_(1.001))
WANTS_HOOK = lambda kwargs: kwargs.get("static_graph", False)
"""
    + RE_EXPORT.format(name="test_ddp_matches_single_process"),
    # no_sync that does not skip communication.
    "test_fault_no_sync_syncs": """
import contextlib
from torch.nn.parallel import DistributedDataParallel
DistributedDataParallel.no_sync = lambda self: contextlib.nullcontext()
"""
    + RE_EXPORT.format(name="test_ddp_no_sync_accumulates"),
    # no_sync whose local gradients are lost before the synced step.
    "test_fault_no_sync_forgets": """
import contextlib
from torch.nn.parallel import DistributedDataParallel
_no_sync = DistributedDataParallel.no_sync
@contextlib.contextmanager
def _forgetful(self):
    with _no_sync(self):
        yield
        self.module.zero_grad(set_to_none=False)
DistributedDataParallel.no_sync = _forgetful
"""
    + RE_EXPORT.format(name="test_ddp_no_sync_accumulates"),
    # The tied (32 x 32) weight's gradient is reduced, then counted twice.
    "test_fault_tied_weight_doubled": HOOK_ON_EVERY_DDP
    + """
def HOOK(state, bucket):
    buffer = bucket.buffer()
    dist.all_reduce(buffer)
    buffer.div_(dist.get_world_size())
    for p, g in zip(bucket.parameters(), bucket.gradients()):
        if p.shape == (32, 32):
            g.mul_(2)
    return _done(buffer)
WANTS_HOOK = lambda kwargs: True
"""
    + RE_EXPORT.format(name="test_ddp_matches_single_process"),
    # On rank 1, clipping misses the last parameter (a dropped group of a foreach grouping);
    # rank 1's reference is clipped the same way, so the ranks' disagreement is what shows.
    "test_fault_clip_misses_a_parameter": """
import torch
import torch.distributed as dist
_real = torch.nn.utils.clip_grad_norm_
def _partial(parameters, *args, **kwargs):
    parameters = list(parameters)
    if dist.get_rank() == 1:
        parameters = parameters[:-1]
    return _real(parameters, *args, **kwargs)
torch.nn.utils.clip_grad_norm_ = _partial
"""
    + RE_EXPORT.format(name="test_ddp_clip_grad_norm"),
    # Under autocast, gradients never averaged.
    "test_fault_autocast_unsynced": HOOK_ON_EVERY_DDP
    + """
def HOOK(state, bucket):
    return _done(bucket.buffer())
WANTS_HOOK = lambda kwargs: True
"""
    + RE_EXPORT.format(name="test_ddp_with_autocast"),
    # The checkpointed block's 32x32 weights keep their local gradient; the rest is averaged.
    "test_fault_checkpointed_block_unreduced": HOOK_ON_EVERY_DDP
    + """
def HOOK(state, bucket):
    buffer = bucket.buffer()
    local = [(g, g.clone()) for p, g in zip(bucket.parameters(), bucket.gradients()) if p.shape == (32, 32)]
    dist.all_reduce(buffer)
    buffer.div_(dist.get_world_size())
    for view, kept in local:
        view.copy_(kept)
    return _done(buffer)
WANTS_HOOK = lambda kwargs: True
"""
    + RE_EXPORT.format(name="test_ddp_with_checkpointing"),
}

SELECTION = [
    "test_fault_ddp_never_averages.py::test_ddp_matches_single_process[ws2-cpu-default]",
    "test_fault_ddp_sums.py::test_ddp_matches_single_process[ws2-cpu-tiny_buckets]",
    "test_fault_ddp_config_drift.py::test_ddp_matches_single_process[ws2-cpu-static_graph]",
    "test_fault_no_sync_syncs.py::test_ddp_no_sync_accumulates[ws2-cpu]",
    "test_fault_no_sync_forgets.py::test_ddp_no_sync_accumulates[ws2-cpu]",
    "test_fault_tied_weight_doubled.py::test_ddp_matches_single_process[ws2-cpu-tied_weights]",
    "test_fault_clip_misses_a_parameter.py::test_ddp_clip_grad_norm[ws2-cpu-foreach]",
    "test_fault_autocast_unsynced.py::test_ddp_with_autocast[ws2-cpu-bf16]",
    "test_fault_checkpointed_block_unreduced.py::test_ddp_with_checkpointing[ws2-cpu-reentrant]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("ddp_faults"), FAULTS, SELECTION)


def test_ddp_that_never_averages_is_caught_by_parity_and_cross_rank_checks(cases):
    assert_caught(
        cases,
        "test_fault_ddp_never_averages::test_ddp_matches_single_process[ws2-cpu-default]",
        "DDP(default): 2 of 2 ranks wrong",
        "rank 1: step 1 grad 'embed.weight' vs single process:",
        "outside tolerance",
        "|diff|=",
        "(atol=1e-05, rtol=1.3e-06)",
        "param 'embed.weight': #wrong=",
        "(bound: bitwise equal to rank 0)",
    )


def test_ddp_that_sums_without_dividing_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_ddp_sums::test_ddp_matches_single_process[ws2-cpu-tiny_buckets]",
        "rank 0: step 1 grad 'embed.weight' vs single process:",
        "outside tolerance",
        "|diff|=",
    )


def test_configuration_drifting_from_default_is_caught(cases):
    key = "test_fault_ddp_config_drift::test_ddp_matches_single_process[ws2-cpu-static_graph]"
    assert_caught(
        cases,
        key,
        "DDP(static_graph)",
        "rank 0: step 1 grad 'embed.weight' vs single process:",
        "with static_graph vs default DDP:",
        "outside tolerance",
    )


def test_no_sync_that_communicates_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_no_sync_syncs::test_ddp_no_sync_accumulates[ws2-cpu]",
        "grad 'embed.weight' after no_sync backward vs this rank's local grad:",
        "outside tolerance",
        "rank 0:",
        "rank 1:",
    )


def test_no_sync_that_loses_local_gradients_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_no_sync_forgets::test_ddp_no_sync_accumulates[ws2-cpu]",
        "grad 'embed.weight' after synced backward vs full-batch accumulated:",
        "outside tolerance",
    )


def test_tied_weight_counted_twice_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_tied_weight_doubled::test_ddp_matches_single_process[ws2-cpu-tied_weights]",
        "DDP(tied_weights)",
        "rank 0: step 1 grad 'mix.weight' vs single process:",
        "outside tolerance",
    )


def test_clipping_that_differs_between_ranks_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_clip_misses_a_parameter::test_ddp_clip_grad_norm[ws2-cpu-foreach]",
        "DDP + clip_grad_norm_(foreach=True)",
        "rank 1: step 1 total norm: #wrong=1 of 1 elements",
        "rank 0 has",
        "(bound: bitwise equal to rank 0)",
        "rank 0: step 2 total norm vs single process:",
        "outside tolerance",
    )


def test_unsynced_ddp_under_autocast_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_autocast_unsynced::test_ddp_with_autocast[ws2-cpu-bf16]",
        "DDP + autocast(torch.bfloat16)",
        "rank 1: step 1 grad 'embed.weight' vs single process: rel_l2=",
        "> bound 0.02",
    )


def test_unreduced_checkpointed_block_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_checkpointed_block_unreduced::test_ddp_with_checkpointing[ws2-cpu-reentrant]",
        "DDP + checkpoint(reentrant)",
        "rank 0: step 1 grad 'block.0.weight' vs single process:",
        "outside tolerance",
    )
