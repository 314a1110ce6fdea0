"""The store checks catch stores that answer wrongly.

Faults planted in the ranks on the store classes: a TCPStore whose ``wait`` returns at once,
a TCPStore whose ``compare_set`` lets every rank win, and a FileStore whose ``add`` returns
the counter as it was before the increment. One subprocess runs them all.
"""

from __future__ import annotations

import pytest

from support.rank_faults import assert_caught, run_faulted

STORE = "from pytest_gpuconform.conformance.test_store import {name}\n"

FAULTS = {
    # The late key is set 1 s late instead of 0.1 s, so that a stalled rank cannot hide the fault.
    "test_fault_tcp_wait_returns": """
import pytest_gpuconform.conformance.test_store as _store_checks
_store_checks.LATE_SECONDS = 1.0
import torch.distributed as dist
dist.TCPStore.wait = lambda self, *args, **kwargs: None
"""
    + STORE.format(name="test_tcp_store"),
    "test_fault_tcp_everyone_wins": """
import torch.distributed as dist
def _everyone_wins(self, key, expected, desired):
    self.set(key, desired)
    return desired.encode()
dist.TCPStore.compare_set = _everyone_wins
"""
    + STORE.format(name="test_tcp_store"),
    "test_fault_file_add_returns_old": """
import torch.distributed as dist
_real = dist.FileStore.add
dist.FileStore.add = lambda self, key, amount: _real(self, key, amount) - amount
"""
    + STORE.format(name="test_file_store"),
}

SELECTION = [
    "test_fault_tcp_wait_returns.py::test_tcp_store[ws2-cpu]",
    "test_fault_tcp_everyone_wins.py::test_tcp_store[ws2-cpu]",
    "test_fault_file_add_returns_old.py::test_file_store[ws2-cpu]",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_faulted(tmp_path_factory.mktemp("store_faults"), FAULTS, SELECTION)


def test_wait_that_does_not_wait_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_tcp_wait_returns::test_tcp_store[ws2-cpu]",
        "TCPStore seen from every rank",
        "rank 0: TCPStore wait: wait(['late']) returned before rank 1 set the key",
        "wait for a key nobody sets returned after",
        "instead of timing out (0.05 s)",
    )


def test_compare_set_with_two_winners_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_tcp_everyone_wins::test_tcp_store[ws2-cpu]",
        "TCPStore compare_set: compare_set('leader', '', 'rank 0') answers by rank: ['rank 0', 'rank 1']",
        "expected one winner for all",
    )


def test_add_that_is_not_a_counter_is_caught(cases):
    assert_caught(
        cases,
        "test_fault_file_add_returns_old::test_file_store[ws2-cpu]",
        "FileStore add: add('counter', 1) returned",
        "is no other rank's result",
        "counter after every rank's add: got 3, largest return",
        "expected 3",
    )
