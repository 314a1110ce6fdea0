"""Is this pytest one rank of a launcher's world (torchrun or srun), and which one?

srun is taken as cluster mode only when it started more than one task per node (one task
per GPU); one task per node is the per-node sweep, where each pytest runs on its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from ..node.labels import host_name


@dataclass(frozen=True)
class ClusterWorld:
    launcher: str  # "torchrun" | "srun"
    rank: int
    world_size: int
    local_rank: int
    host: str
    backend: str = "gloo"  # "nccl" on GPU nodes: set by plugin.py from the node's GPUs

    @property
    def device_kind(self) -> str:
        return "cuda" if self.backend == "nccl" else "cpu"


# In the stash of a cluster run only: this rank's world, and where rank 0 wrote the merged JUnit.
CLUSTER_KEY: pytest.StashKey[ClusterWorld] = pytest.StashKey()
MERGED_JUNIT_KEY: pytest.StashKey[str] = pytest.StashKey()


def detect(environ: Mapping[str, str] | None = None, mode: str = "auto") -> ClusterWorld | None:
    environ = os.environ if environ is None else environ
    if mode == "off":
        return None
    host = host_name(environ)
    if "TORCHELASTIC_RUN_ID" in environ or (mode == "on" and "RANK" in environ and "WORLD_SIZE" in environ):
        return ClusterWorld(
            "torchrun", int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)), host
        )
    # SLURM_STEP_ID: a real srun step (the batch script itself also sees SLURM_PROCID/NTASKS).
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and (mode == "on" or "SLURM_STEP_ID" in environ):
        tasks, nodes = int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_NNODES", 1))
        if mode == "on" or (tasks > 1 and tasks != nodes):
            return ClusterWorld("srun", int(environ["SLURM_PROCID"]), tasks, int(environ.get("SLURM_LOCALID", 0)), host)
    return None


def template_path(path: str, host: str, rank: int) -> str:
    """'reports/junit-{host}-r{rank}.xml' -> 'reports/junit-node1-r3.xml'."""
    return path.replace("{host}", host).replace("{rank}", str(rank))


def merged_path(template: str) -> str:
    return os.path.join(os.path.dirname(template) or ".", "junit-cluster.xml")
