"""The rendezvous store: every rank sees the same keys, counters and winners.

Process groups, torchrun's rendezvous and elastic restarts all rest on a key-value store
(TCPStore; FileStore on a shared filesystem). A store that loses a write, answers ``wait``
before the key exists or lets two ranks win a ``compare_set`` breaks start-up in ways that
look like network trouble. Each operation is checked from every rank against what every
other rank did: ``set``/``get`` of every rank's key, ``add`` as an atomic counter (every
rank's returned value is the total just after its own increment, so the returns must chain
into one serial order), ``wait`` that really waits (and times out on a missing key), and
``compare_set`` with exactly one winner that every rank agrees on.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from pytest_gpuconform.checks import gather_text, raise_if_any

from . import _stores

LATE_SECONDS = 0.1
MISSING_KEY_TIMEOUT = timedelta(milliseconds=50)


def _set_get(store, rank, world_size) -> list[str]:
    store.set(f"key/{rank}", f"value from rank {rank}")
    problems = []
    for peer in range(world_size):
        got = store.get(f"key/{peer}")  # get waits until the key exists
        if got != f"value from rank {peer}".encode():
            problems.append(f"get('key/{peer}'): got {got!r} expected {f'value from rank {peer}'.encode()!r}")
    return problems


def _add(store, rank, world_size) -> list[str]:
    """Rank r adds r + 1. Each return is the counter right after that add, so every return
    minus its own increment is 0 or another rank's return, the largest is the total, and
    the counter ends at the total on every rank."""
    returned = store.add("counter", rank + 1)
    returns = [int(text) for text in gather_text(str(returned), world_size)]
    total = world_size * (world_size + 1) // 2
    problems = []
    before = returns[rank] - (rank + 1)
    if before != 0 and before not in returns:
        problems.append(
            f"add('counter', {rank + 1}) returned {returns[rank]}: the counter before it ({before}) "
            f"is no other rank's result (returns by rank: {returns})"
        )
    final = store.add("counter", 0)
    if final != total or max(returns) != total:
        problems.append(
            f"counter after every rank's add: got {final}, largest return {max(returns)}, "
            f"expected {total} (returns by rank: {returns})"
        )
    return problems


def _wait(store, rank, world_size, timeout_checked=True) -> list[str]:
    """The last rank sets a key late; the others ``wait`` for it, and must find it there
    when ``wait`` returns (``check`` does not block). A missing key must time out (not
    asked of FileStore, whose wait timeout has a resolution of whole seconds: a 0.2 s
    timeout takes 1 s, too long for the CPU suite's budget)."""
    problems = []
    late = world_size - 1
    if rank == late:
        time.sleep(LATE_SECONDS)
        store.set("late", "here")
    else:
        store.wait(["late"])
        if not store.check(["late"]):
            problems.append(f"wait(['late']) returned before rank {late} set the key")
    if not timeout_checked:
        return problems
    started = time.perf_counter()
    try:
        store.wait([f"never/{rank}"], MISSING_KEY_TIMEOUT)
    except (RuntimeError, getattr(dist, "DistError", RuntimeError)) as exc:  # DistStoreError on 2.2+
        if "timeout" not in str(exc).lower() and "wait" not in str(exc).lower():
            problems.append(f"wait for a missing key raised something else: {str(exc).splitlines()[0]}")
    else:
        problems.append(
            f"wait for a key nobody sets returned after {time.perf_counter() - started:.3f} s "
            f"instead of timing out ({MISSING_KEY_TIMEOUT.total_seconds()} s)"
        )
    return problems


def _compare_set(store, rank, world_size) -> list[str]:
    """Every rank tries to become the leader: compare_set from "" succeeds once; every rank
    is answered with the winner's value and reads the same one back."""
    answer = store.compare_set("leader", "", f"rank {rank}").decode()
    answers = gather_text(answer, world_size)
    problems = []
    if len(set(answers)) != 1 or answers[0] not in {f"rank {r}" for r in range(world_size)}:
        problems.append(
            f"compare_set('leader', '', 'rank {rank}') answers by rank: {answers}: expected one winner for all"
        )
    read = store.get("leader").decode()
    if read != answers[0]:
        problems.append(f"get('leader') after compare_set: got {read!r} expected the winner {answers[0]!r}")
    loser = store.compare_set("leader", "not the leader", "usurper").decode()
    if loser != answers[0]:
        problems.append(
            f"compare_set with a wrong expected value changed the key: got {loser!r} expected {answers[0]!r}"
        )
    return problems


OPERATIONS = {"set/get": _set_get, "add": _add, "wait": _wait, "compare_set": _compare_set}


def _check_store(store, kind, rank, world_size) -> None:
    problems = []
    operations = dict(OPERATIONS)
    if kind == "FileStore":
        operations["wait"] = lambda *args: _wait(*args, timeout_checked=False)
    for name, operation in operations.items():
        problems.extend(f"{kind} {name}: {p}" for p in operation(store, rank, world_size))
    raise_if_any("; ".join(problems) or None, rank, world_size, f"{kind} seen from every rank")


@pytest.mark.world_size(2, 4, 8)
def test_tcp_store(rank, world_size, device):
    """TCPStore served by rank 0 (the store torchrun's c10d rendezvous uses)."""
    store = _stores.tcp_store(rank, world_size)
    try:
        _check_store(store, "TCPStore", rank, world_size)
    finally:
        _stores.all_done(world_size)
        del store


@pytest.mark.world_size(2, 4, 8)
def test_file_store(rank, world_size, device):
    """FileStore on a directory every rank shares (the engine's own rendezvous)."""
    directory = _stores.shared_directory(rank, world_size)
    if directory is None:
        pytest.skip("ranks run on different hosts: a FileStore needs a filesystem every rank shares")
    store = dist.FileStore(f"{directory}/store", world_size)
    store.set_timeout(_stores.STORE_TIMEOUT)
    try:
        _check_store(store, "FileStore", rank, world_size)
    finally:
        del store
        _stores.remove_directory(directory, rank, world_size)
