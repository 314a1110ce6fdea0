"""Process groups: a collective on a group involves its members and nobody else.

Every layout beyond plain data parallelism (tensor, pipeline, expert, sequence parallel,
FSDP's hybrid sharding) runs its collectives on subgroups. A group that silently runs over
the whole world gives members the wrong sum and blocks the ranks outside it; a wrong
group-rank order puts gathered blocks in the wrong place. So the checks use groups of
several shapes (single ranks, halves, interleaved ranks, all but the last rank, the whole
world) and require: members get the group's exact result, in the group's rank order;
ranks outside a group are not touched by its collectives (a call from a non-member returns
at once and leaves its buffer alone) and are not needed for them (one half of the world
finishes its group collective while the other half waits on a store, outside every
collective); global and group ranks map consistently both ways; ``new_subgroups`` and
``new_subgroups_by_enumeration`` give each rank its own block.
"""

from __future__ import annotations

import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from pytest_gpuconform.checks import ExactTally, integer_values, raise_if_any, value_range

from . import _stores
from ._collective_cases import all_gather_single, destroy_groups

WORLD_SIZES = (2, 4, 8)
COUNT = 1031
GROUP_WAIT = timedelta(seconds=10)  # a group all_reduce of 1031 floats takes milliseconds


def _subsets(world_size: int) -> list[list[int]]:
    """Member lists of several shapes; on 2 ranks: each rank alone and both."""
    half = world_size // 2
    shapes = [
        list(range(half)),
        list(range(half, world_size)),
        list(range(0, world_size, 2)),
        list(range(1, world_size, 2)),
        list(range(world_size - 1)),
        list(range(world_size)),
    ]
    return [s for i, s in enumerate(shapes) if s and s not in shapes[:i]]


def _values(source: int, salt: int, device, dtype=torch.float32, divisor=1) -> torch.Tensor:
    low, high = value_range(dtype, divisor)
    return integer_values(COUNT, low, high, source=source, salt=salt, device=device).to(dtype)


def _members_results(group, members, rank, world_size, salt, device, tally, what) -> None:
    """all_reduce, all_gather and broadcast on ``group``: exact, and in the group's order."""
    order = dist.get_process_group_ranks(group)
    inputs = {r: _values(r, salt, device, divisor=world_size) for r in set(members) | set(order)}
    mine = inputs[rank].clone()
    dist.all_reduce(mine, group=group)
    tally.expect(mine, sum(inputs[r] for r in members), f"{what} all_reduce(sum) x{COUNT}")
    gathered = torch.empty(
        dist.get_world_size(group) * COUNT, device=device
    )  # a wrong group: reported, not a size error
    all_gather_single()(gathered, inputs[rank], group=group)
    tally.expect(gathered, torch.cat([inputs[r] for r in order]), f"{what} all_gather in group-rank order {order}")
    root = members[-1]
    buffer = inputs[rank].clone()
    dist.broadcast(buffer, src=root, group=group)
    tally.expect(buffer, inputs[root], f"{what} broadcast(src=global rank {root})")


@pytest.mark.world_size(*WORLD_SIZES)
def test_new_group_members_get_group_result(rank, world_size, device, record):
    """new_group over several subsets: members get exactly the group's all_reduce,
    all_gather (in group-rank order) and broadcast; non-members' calls return at once and
    leave their buffers untouched."""
    tally = ExactTally()
    groups = []
    try:
        for index, members in enumerate(_subsets(world_size)):
            group = dist.new_group(members)
            groups.append(group)
            what = f"group {members}"
            if rank in members:
                _members_results(group, members, rank, world_size, index, device, tally, what)
                continue
            buffer = _values(world_size + rank, index, device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns that a non-member's call does nothing
                work = dist.all_reduce(buffer, group=group)
            tally.expect(buffer, _values(world_size + rank, index, device), f"{what} non-member rank {rank}'s buffer")
            if work is not None:
                tally.note(f"{what}: all_reduce from non-member rank {rank} returned {work!r}, expected None")
        tally.verdict("new_group", rank, world_size, record)
    finally:
        destroy_groups(groups)


@pytest.mark.world_size(*WORLD_SIZES)
def test_new_group_does_not_need_non_members(rank, world_size, device, record):
    """Two halves of the world, each a group: the first half runs its collective while the
    second waits outside every collective (on a store) for it to finish, then the other way
    round. A group collective that needed non-members would never finish."""
    half = world_size // 2
    halves = [list(range(half)), list(range(half, world_size))]
    groups = [dist.new_group(h) for h in halves]
    store = _stores.tcp_store(rank, world_size)
    tally = ExactTally()
    try:
        for turn, members in enumerate(halves):
            key = f"turn {turn} done"
            outsiders = halves[1 - turn]
            if rank in members:
                mine = _values(rank, turn, device, divisor=world_size)
                outcome = "ok"
                try:
                    dist.all_reduce(mine, group=groups[turn], async_op=True).wait(GROUP_WAIT)
                except RuntimeError as exc:
                    outcome = f"failed after {GROUP_WAIT.total_seconds():.0f} s: {str(exc).splitlines()[0]}"
                    tally.note(f"group {members} all_reduce while ranks {outsiders} stayed out: {outcome}")
                store.set(f"{key}/{rank}", outcome)
                tally.expect(
                    mine,
                    sum(_values(r, turn, device, divisor=world_size) for r in members),
                    f"group {members} all_reduce while ranks {outsiders} stayed out",
                )
                continue
            try:
                store.wait([f"{key}/{m}" for m in members], GROUP_WAIT + timedelta(seconds=5))
            except (RuntimeError, getattr(dist, "DistError", RuntimeError)):
                tally.note(
                    f"group {members} did not finish its all_reduce while rank {rank} stayed out of it "
                    f"(waited {GROUP_WAIT.total_seconds() + 5:.0f} s)"
                )
        tally.verdict("group collective without non-members", rank, world_size, record)
    finally:
        _stores.all_done(world_size)
        del store
        destroy_groups(groups)


@pytest.mark.world_size(*WORLD_SIZES)
def test_group_rank_mapping(rank, world_size, device):
    """Global <-> group rank: get_group_rank, get_global_rank, get_process_group_ranks,
    get_rank(group) and get_world_size(group) agree with each other and with the members;
    a non-member's rank in the group is -1."""
    problems = []
    groups = []
    try:
        for members in _subsets(world_size):
            group = dist.new_group(members)
            groups.append(group)
            if rank not in members:
                if dist.get_rank(group) != -1:
                    problems.append(
                        f"group {members}: get_rank(group) on non-member rank {rank} "
                        f"is {dist.get_rank(group)}, expected -1"
                    )
                continue
            order = dist.get_process_group_ranks(group)
            facts = {
                "sorted(get_process_group_ranks)": (sorted(order), sorted(members)),
                "get_world_size(group)": (dist.get_world_size(group), len(members)),
                "get_rank(group)": (dist.get_rank(group), order.index(rank) if rank in order else None),
                "get_global_rank(group, i) for i": ([dist.get_global_rank(group, i) for i in range(len(order))], order),
                "get_group_rank(group, r) for r": (
                    [dist.get_group_rank(group, r) for r in order],
                    list(range(len(order))),
                ),
            }
            problems.extend(
                f"group {members} on rank {rank}: {name}: got {got} expected {want}"
                for name, (got, want) in facts.items()
                if got != want
            )
    finally:
        destroy_groups(groups)
    raise_if_any("; ".join(problems) or None, rank, world_size, "group rank mapping")


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("how", ["new_subgroups", "by_enumeration"])
def test_new_subgroups(how, rank, world_size, device, record):
    """new_subgroups(group_size=n/2) gives contiguous blocks; new_subgroups_by_enumeration
    the interleaved ones asked for: each rank's subgroup holds exactly its block, and an
    all_reduce on it sums that block only."""
    half = world_size // 2
    if how == "new_subgroups":
        blocks = [list(range(i, i + half)) for i in range(0, world_size, half)]
        mine, subgroups = dist.new_subgroups(group_size=half)
    else:
        blocks = [list(range(start, world_size, 2)) for start in (0, 1)]
        mine, subgroups = dist.new_subgroups_by_enumeration(blocks)
    try:
        block = next(b for b in blocks if rank in b)
        tally = ExactTally()
        members = dist.get_process_group_ranks(mine)
        if members != block:
            tally.note(f"{how}: rank {rank}'s subgroup has ranks {members}, expected {block}")
        value = _values(rank, 7, device, divisor=world_size)
        dist.all_reduce(value, group=mine)
        tally.expect(
            value,
            sum(_values(r, 7, device, divisor=world_size) for r in block),
            f"{how} block {block} all_reduce(sum) x{COUNT}",
        )
        tally.verdict(how, rank, world_size, record)
    finally:
        destroy_groups(subgroups)
