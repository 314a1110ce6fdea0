"""The one place a rank's environment and process-group options are decided.

Called once per rank process, after its output is redirected and before torch is
imported, so whatever it sets is seen by torch, NCCL and gloo from their first import.
NCCL's own settings (async error handling, its log per rank, deterministic cuBLAS: see
node/nccl.py) are part of the environment the pool gives a CUDA rank (pool.py), since the
controller also reads that log when a test fails; ``device_id`` for an NCCL group is added
once the rank has its GPU (process.py). What ``init_process_group`` needs goes into
``GroupOptions``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RankIdentity:
    """Who this process is in its pool (what every rank-side module may ask)."""

    rank: int
    world_size: int
    backend: str | None  # "gloo" | "nccl" | None (a one-rank GPU worker, no process group)
    device_kind: str  # "cpu" | "cuda"


@dataclass
class GroupOptions:
    """Keyword arguments for ``init_process_group`` beyond backend, store, rank, size and
    timeout (``pg_options``, ``device_id``), filled by ``prepare``."""

    extra: dict[str, Any] = field(default_factory=dict)


def prepare(identity: RankIdentity) -> GroupOptions:
    """Set this rank's environment; return what its process group needs besides the basics."""
    os.environ.update(
        RANK=str(identity.rank),
        LOCAL_RANK=str(identity.rank),
        WORLD_SIZE=str(identity.world_size),
        LOCAL_WORLD_SIZE=str(identity.world_size),
    )
    # The controller's phase marker is not this process's: pytest in the rank sets its own.
    os.environ.pop("PYTEST_CURRENT_TEST", None)
    return GroupOptions()
