"""Cluster mode: join the launcher's world, keep the ranks in step, merge their reports.

Every rank runs the same collection in the same order (no xdist, no random order); a
``world_size(N)`` test with N equal to the launched world runs its body directly in each
rank's pytest process (plan placement ``cluster``); each rank writes its own JUnit file; at
the end every rank gathers all of them over a gloo group (node-local report directories are
fine), so every rank's exit code says whether the cluster failed, and rank 0 writes the
merged file (fold.py).

A multi-rank test runs with the same rank-side machinery as the engine's ranks
(engine/rank/): the state it changes is put back afterwards and the RNGs are seeded from the
test id (isolation.py), what it leaves behind is found and reported on it (findings.py), and
the default group is the engine's ``DefaultGroup``, so a ported body that calls
``init_process_group`` for this world or destroys the group at its end works here too.
"""

from __future__ import annotations

import hashlib
import os
import signal
import traceback
from typing import Any

import pytest

from ..collection.plan import CLUSTER, plan_of
from ..engine import findings as isolation_findings
from ..settings import SETTINGS_KEY
from . import fold
from .faults import ClusterFaults
from .world import MERGED_JUNIT_KEY, ClusterWorld, merged_path

_FAILED_HERE = pytest.StashKey[bool]()


def check_rendezvous_environment(world: ClusterWorld) -> None:
    """MASTER_ADDR and MASTER_PORT name the store every rank meets at; a usage error without."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise pytest.UsageError(
            f"cluster mode under {world.launcher}: {' and '.join(missing)} not set. Under srun, export them "
            'before the step, e.g. MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) '
            "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000)); or pass --gpuconform-cluster off for "
            "independent per-node runs"
        )


class ClusterMode:
    """The pytest plugin of one rank of a cluster run (registered by plugin.py)."""

    PLUGIN_NAME = "gpuconform-cluster"

    def __init__(
        self,
        config: pytest.Config,
        world: ClusterWorld,
        timeout: float,
        xml_template: str | None,
        merged_junit: str | None,
    ) -> None:
        self.config = config
        self.world = world
        self.backend = world.backend
        self.timeout = timeout
        self.xml_template = xml_template
        self.merged_junit = merged_junit  # --gpuconform-cluster-junit, else beside the per-rank files
        self.store = None
        self.control = None
        self.group: Any = None  # engine/rank/groups.py DefaultGroup
        self.boundary: Any = None  # engine/rank/isolation.py TestBoundary, made at the first multi-rank test
        self._multi_rank_test: str | None = None
        settings = config.stash.get(SETTINGS_KEY, None)
        self.strict_isolation = bool(settings and settings.strict_isolation)
        # hangs in C, lost hosts and partitions: faults.py
        self.faults = ClusterFaults(self)
        config.pluginmanager.register(self.faults, ClusterFaults.PLUGIN_NAME)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Join the world before collection, so the ranks can compare what they collected."""
        os.environ.setdefault("RANK", str(self.world.rank))
        os.environ.setdefault("WORLD_SIZE", str(self.world.world_size))
        os.environ.setdefault("LOCAL_RANK", str(self.world.local_rank))
        if self.backend == "nccl":
            import torch

            torch.cuda.set_device(self.world.local_rank)
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
        gathered: list[Any] = [None] * self.world.world_size
        dist.all_gather_object(gathered, (self.world.host, self.world.rank, text), group=self.control)
        return list(gathered)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Gather every rank's JUnit file; fail this rank if another one failed; rank 0
        writes the merged file."""
        xmlpath = getattr(self.config.option, "xmlpath", None)
        reports, missing = self.faults.reports(
            self.gather_reports, xmlpath
        )  # bounded in time; a lost rank's report salvaged through the store
        if not any(text for _, _, text in reports):
            return
        merged = fold.merge(reports, missing)
        if fold.failed(merged) and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED  # another rank failed: so does this one
        if self.world.rank == 0 and self.xml_template:
            target = self.merged_junit or merged_path(self.xml_template)
            fold.write(merged, target)
            self.config.stash[MERGED_JUNIT_KEY] = target

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    # -- keeping the ranks in step ------------------------------------------------------------
    def pytest_collection_finish(self, session) -> None:
        """Every rank must run the same tests in the same order, or collectives pair up wrongly."""
        import torch.distributed as dist

        digest = hashlib.sha256("\n".join(item.nodeid for item in session.items).encode()).hexdigest()
        digests: list[Any] = [None] * self.world.world_size
        dist.all_gather_object(
            digests, (self.world.host, self.world.rank, digest, len(session.items)), group=self.control
        )
        if len({d for _, _, d, _ in digests}) != 1:
            ranks = ", ".join(f"{h}/r{r}: {n} tests ({d[:8]})" for h, r, d, n in digests)
            pytest.exit(
                f"cluster ranks collected different tests ({ranks}); every rank needs the same "
                "arguments, no test randomisation (-p no:randomly) and no -n",
                returncode=4,
            )

    @staticmethod
    def _is_multi_rank(item) -> bool:
        return plan_of(item).placement == CLUSTER

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        """Capture the process state and seed every RNG (the same seed on every rank, from the
        test id) before a multi-rank test; the teardown puts the state back."""
        if self._is_multi_rank(item):
            if self.boundary is None:
                import torch

                from ..engine.rank.isolation import TestBoundary

                self.boundary = TestBoundary(torch, self.world.device_kind)
            self.boundary.begin(plan_of(item).seed)
            self._multi_rank_test = item.nodeid
        try:
            return (yield)
        finally:
            self._multi_rank_test = None

    def pytest_runtest_logreport(self, report) -> None:
        """What exists once a multi-rank test's setup is done belongs to its fixtures."""
        if report.when == "setup" and self.boundary is not None and report.nodeid == self._multi_rank_test:
            self.boundary.setup_done()
            self.group.setup_done()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        """A deadline for the body: SIGALRM interrupts Python-level hangs with the stack;
        a collective stuck in C is cut by faults.py's watchdog just after the deadline."""
        if not self._is_multi_rank(item):
            return (yield)
        deadline = plan_of(item).deadline

        def expire(signum, frame):
            stack = "".join(traceback.format_stack(frame))
            pytest.fail(
                f"timed out after {deadline:g} s on host {self.world.host} rank {self.world.rank} "
                f"(--gpuconform-timeout or world_size(timeout=...)); stack:\n{stack}",
                pytrace=False,
            )

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

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item):
        """After the test's own teardown, put this rank's state back and meet all ranks. If
        any rank failed the test, the process group may hold half-done collectives (or broken
        gloo pairs): every rank then builds a new one, so the next test starts clean instead
        of inheriting the wreck. A default group the test destroyed or replaced is rebuilt
        the same way. What the test left behind is reported on it."""
        result = yield
        if not self._is_multi_rank(item) or self.faults.lost:  # no exchange with a broken world
            return result
        found = self.boundary.end() if self.boundary is not None else []
        state = self.group.state()
        if state == "ok":
            found += self.group.drop_extra_groups()
            import torch.distributed as dist

            failed = [None] * self.world.world_size
            dist.all_gather_object(failed, bool(item.stash.get(_FAILED_HERE, False)), group=self.control)
            if any(failed):
                self._rebuild_process_groups()
        else:
            # destroy_process_group() took the control group too: every rank ran the same
            # body, so every rank rebuilds both, in step.
            found.append(self.group.describe_damage(state))
            self.group.rebuild()
            self._new_control_group()
        self._report(item, [f.text for f in found])
        return result

    def _report(self, item, texts: list[str]) -> None:
        if not texts:
            return
        lines = [f"host {self.world.host} rank {self.world.rank}: {text}" for text in texts]
        item.user_properties.append((isolation_findings.ISOLATION_PROPERTY, "; ".join(lines)))
        isolation_findings.announce(item, lines)
        if self.strict_isolation:
            pytest.fail(isolation_findings.strict_headline(lines), pytrace=False)

    def _join(self) -> None:
        """Join (or re-join) the world. Each generation uses its own key prefix in one store
        we keep for the whole run, so a rebuilt group never reads its predecessor's
        rendezvous keys, and destroying a group never takes the store's server with it."""
        from datetime import timedelta

        import torch.distributed as dist

        if self.store is None:
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            self.store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                self.world.world_size,
                is_master=self.world.rank == 0 and not agent_store,
                timeout=timedelta(seconds=max(300.0, self.timeout * 2)),
            )
        from ..engine.rank.groups import DefaultGroup

        if self.group is None:
            self.group = DefaultGroup(
                self.store, self.world.rank, self.world.world_size, self.backend, self.timeout + 30
            )
            self.group.join()
            self.group.guard_reinit()
        else:
            self.group.rebuild()
        self._new_control_group()

    def _new_control_group(self) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        # Reports and outcomes travel over gloo even on NCCL clusters: no GPU, no stream.
        with self.faults.protect():  # a deadline's cut never takes these connections
            self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(300.0, self.timeout * 2)))

    def _rebuild_process_groups(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.control)  # nobody still uses the old groups
        self._join()
