"""Everything a rank process is started with, computed once by the controller.

The rank's own pytest session gets the controller's arguments (so the same rootdir, ini,
conftests, plugins and ``-p``/``-o``/``-W`` options) plus a few of its own (rank mode), and
the values the controller resolved once (settings with the tolerance table and floors, the
node inventory) as data: a rank never re-reads option files or asks NVML for the run's
facts. In the rank's ``config.stash[RANK_SPEC_KEY]`` for the fixtures that differ per rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from .environment import RankIdentity


@dataclass(frozen=True)
class RankSpec:
    identity: RankIdentity
    store_path: str  # FileStore of the pool's rendezvous
    log_path: str  # the rank's stdout and stderr, fd level
    stack_path: str  # where SIGUSR1 makes the rank write every thread's stack
    phase_path: str  # the phase the rank is in, overwritten as it goes (read after a crash or hang)
    pg_timeout: float
    invocation_dir: str  # the controller's: rootdir and relative paths resolve the same
    pytest_args: tuple[str, ...]
    shared_dir: str  # one directory all ranks of the pool see (shared_tmp_path lives below)
    cpu_threads: int  # torch intra-op threads of a CPU rank (the ranks share the cores)
    settings: Any  # pytest_gpuconform.settings.Settings
    inventory: Any  # pytest_gpuconform.node.inventory.Inventory
    environ: dict[str, str] = field(default_factory=dict)  # the controller's, when the pool starts
    sys_path: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return self.identity.rank

    @property
    def world_size(self) -> int:
        return self.identity.world_size


RANK_SPEC_KEY: pytest.StashKey[RankSpec] = pytest.StashKey()
# The test's sequence number in its pool, on the rank's item: the same on every rank.
ATTEMPT_KEY: pytest.StashKey[int] = pytest.StashKey()
