"""Cluster mode: pytest itself was launched once per rank by torchrun or srun.

The distributed engine is the launcher's; we only join the world it made. Every rank runs
the same collection in the same order (no xdist, no random order), a ``world_size(N)`` test
with N equal to the launched world runs its body directly in each rank's pytest process,
each rank writes its own JUnit file, and at the end rank 0 gathers them (over a gloo group,
so node-local report directories are fine) and writes one merged file.

srun is taken as cluster mode only when it started more than one task per node (one task
per GPU); one task per node is the per-node sweep, where each pytest runs on its own.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterWorld:
    launcher: str  # "torchrun" | "srun"
    rank: int
    world_size: int
    local_rank: int
    host: str


def detect(environ=None, mode: str = "auto") -> ClusterWorld | None:
    environ = os.environ if environ is None else environ
    host = environ.get("GPUCONFORM_HOST") or socket.gethostname()
    if mode == "off":
        return None
    if "TORCHELASTIC_RUN_ID" in environ or (mode == "on" and "RANK" in environ and "WORLD_SIZE" in environ):
        return ClusterWorld("torchrun", int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                            int(environ.get("LOCAL_RANK", 0)), host)
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        tasks, nodes = int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_NNODES", 1))
        if mode == "on" or (tasks > 1 and tasks != nodes):
            return ClusterWorld("srun", int(environ["SLURM_PROCID"]), tasks,
                                int(environ.get("SLURM_LOCALID", 0)), host)
    return None


def template_path(path: str, host: str, rank: int) -> str:
    """'reports/junit-{host}-r{rank}.xml' -> 'reports/junit-node1-r3.xml'."""
    return path.replace("{host}", host).replace("{rank}", str(rank))


def merged_path(template: str) -> str:
    return os.path.join(os.path.dirname(template) or ".", "junit-cluster.xml")


class ClusterSession:
    """Joins the launcher's world at start-up and merges the per-rank reports at the end."""

    PLUGIN_NAME = "gpuconform-cluster"

    def __init__(self, world: ClusterWorld, backend: str, timeout: float, xml_template: str | None) -> None:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        self.world = world
        self.backend = backend
        self.xml_template = xml_template
        os.environ.setdefault("RANK", str(world.rank))
        os.environ.setdefault("WORLD_SIZE", str(world.world_size))
        os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method="env://", rank=world.rank, world_size=world.world_size,
                                    timeout=timedelta(seconds=timeout + 30))
        # Reports travel over gloo even on NCCL clusters: it needs no GPU and no stream.
        self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(300.0, timeout * 2)))

    def device(self):
        import torch

        return torch.device("cuda", self.world.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def gather_reports(self, own_xml: str | None) -> list[tuple[str, int, str]]:
        """[(host, rank, xml text)] from every rank, on every rank: each one can then tell
        whether the cluster failed, so every rank's exit code says so (and torchrun does
        not leave a passing agent waiting at its exit barrier for a failed one)."""
        import torch.distributed as dist

        text = ""
        if own_xml and os.path.exists(own_xml):
            with open(own_xml, encoding="utf-8") as handle:
                text = handle.read()
        gathered = [None] * self.world.world_size
        dist.all_gather_object(gathered, (self.world.host, self.world.rank, text), group=self.control)
        return list(gathered)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def pytest_runtest_setup(self, item) -> None:
        """Same seed on every rank for multi-rank tests, derived from the test id."""
        if "world_size" in getattr(getattr(item, "callspec", None), "params", {}):
            import hashlib
            import random

            import torch

            seed = int.from_bytes(hashlib.sha256(item.nodeid.encode()).digest()[:4], "little")
            random.seed(seed)
            torch.manual_seed(seed)
