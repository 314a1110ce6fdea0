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
import signal
import socket
import traceback
from dataclasses import dataclass

import pytest


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
    # SLURM_STEP_ID: a real srun step (the batch script itself also sees SLURM_PROCID/NTASKS).
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and (mode == "on" or "SLURM_STEP_ID" in environ):
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


_FAILED_HERE = pytest.StashKey[bool]()


class ClusterSession:
    """Joins the launcher's world at start-up and merges the per-rank reports at the end."""

    PLUGIN_NAME = "gpuconform-cluster"

    def __init__(self, world: ClusterWorld, backend: str, timeout: float, xml_template: str | None) -> None:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise pytest.UsageError(
                f"cluster mode under {world.launcher}: {' and '.join(missing)} not set. Under srun, export them "
                "before the step, e.g. MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1) "
                "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000)); or pass --gpuconform-cluster off for "
                "independent per-node runs"
            )
        self.world = world
        self.backend = backend
        self.timeout = timeout
        self.xml_template = xml_template
        os.environ.setdefault("RANK", str(world.rank))
        os.environ.setdefault("WORLD_SIZE", str(world.world_size))
        os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        self.store = None
        self.generation = 0
        self._join()

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

    # -- keeping the ranks in step ------------------------------------------------------------
    def pytest_collection_finish(self, session) -> None:
        """Every rank must run the same tests in the same order, or collectives pair up wrongly."""
        import hashlib

        import torch.distributed as dist

        digest = hashlib.sha256("\n".join(item.nodeid for item in session.items).encode()).hexdigest()
        digests = [None] * self.world.world_size
        dist.all_gather_object(digests, (self.world.host, self.world.rank, digest, len(session.items)),
                               group=self.control)
        if len({d for _, _, d, _ in digests}) != 1:
            ranks = ", ".join(f"{h}/r{r}: {n} tests ({d[:8]})" for h, r, d, n in digests)
            pytest.exit(f"cluster ranks collected different tests ({ranks}); every rank needs the same "
                        "arguments, no test randomisation (-p no:randomly) and no -n", returncode=4)

    @staticmethod
    def _is_multi_rank(item) -> bool:
        return "world_size" in getattr(getattr(item, "callspec", None), "params", {})

    def pytest_runtest_setup(self, item) -> None:
        """Same seed on every rank for multi-rank tests, derived from the test id."""
        if self._is_multi_rank(item):
            import hashlib
            import random

            import torch

            seed = int.from_bytes(hashlib.sha256(item.nodeid.encode()).digest()[:4], "little")
            random.seed(seed)
            torch.manual_seed(seed)

    def _deadline_of(self, item) -> float:
        marker = item.get_closest_marker("world_size")
        value = marker.kwargs.get("timeout") if marker else None
        return float(value) if value else self.timeout

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        """A deadline for the body: SIGALRM interrupts Python-level hangs with the stack;
        a collective stuck in C is ended by the process group's own timeout."""
        if not self._is_multi_rank(item):
            return (yield)
        deadline = self._deadline_of(item)

        def expire(signum, frame):
            stack = "".join(traceback.format_stack(frame))
            pytest.fail(f"timed out after {deadline:g} s on host {self.world.host} rank {self.world.rank} "
                        f"(--gpuconform-timeout or world_size(timeout=...)); stack:\n{stack}", pytrace=False)

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, deadline)
        try:
            return (yield)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        if report.when == "call" and report.failed and self._is_multi_rank(item):
            item.stash[_FAILED_HERE] = True
        return report

    def pytest_runtest_teardown(self, item) -> None:
        """Meet all ranks after each multi-rank test. If any rank failed it, the process
        group may hold half-done collectives (or broken gloo pairs): every rank then builds
        a new one, so the next test starts clean instead of inheriting the wreck."""
        if not self._is_multi_rank(item):
            return
        import torch.distributed as dist

        failed = [None] * self.world.world_size
        dist.all_gather_object(failed, bool(item.stash.get(_FAILED_HERE, False)), group=self.control)
        if any(failed):
            self._rebuild_process_groups()

    def _join(self) -> None:
        """Join (or re-join) the world. Each generation uses its own key prefix in one store
        we keep for the whole run, so a rebuilt group never reads its predecessor's
        rendezvous keys, and destroying a group never takes the store's server with it."""
        from datetime import timedelta

        import torch.distributed as dist

        if self.store is None:
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            self.store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world.world_size,
                is_master=self.world.rank == 0 and not agent_store, timeout=timedelta(seconds=max(300.0, self.timeout * 2)),
            )
        self.generation += 1
        dist.init_process_group(self.backend, store=dist.PrefixStore(f"gpuconform/pg{self.generation}", self.store),
                                rank=self.world.rank, world_size=self.world.world_size,
                                timeout=timedelta(seconds=self.timeout + 30))
        # Reports and outcomes travel over gloo even on NCCL clusters: no GPU, no stream.
        self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(300.0, self.timeout * 2)))

    def _rebuild_process_groups(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.control)  # nobody still uses the old groups
        dist.destroy_process_group()
        self._join()
