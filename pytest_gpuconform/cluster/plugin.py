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
# What ends a run, and so skips the meeting after a teardown; anything else a teardown raises
# (an exception, pytest.fail/skip, an exception group of several failing finalizers) is
# that test's error and still meets the other ranks, who are waiting for this one.
_RUN_ENDERS = (KeyboardInterrupt, SystemExit, pytest.exit.Exception)


def _failed_tests(session: pytest.Session) -> int:
    """How many tests failed in this rank (at least 1 when its exit status says it failed)."""
    if session.testsfailed:
        return int(session.testsfailed)
    return 0 if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED) else 1


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
        self._boundary_open = False  # begun for a multi-rank test and not yet ended
        self.failed_elsewhere: list[tuple[str, int, int]] = []  # (host, rank, failed tests) of the others
        self._sigterm_installed = False
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
        self._install_soft_sigterm(session)
        self._join()

    def _install_soft_sigterm(self, session: pytest.Session) -> None:
        """torchrun's agent sends its rank SIGTERM as soon as it loses the rendezvous store
        (the store's host died), often while the rank is still failing the test in flight
        for that very reason; schedulers send it at a time limit. Python's default would end
        the rank at once, without its JUnit file. Here the first SIGTERM lets the test in
        flight finish (its deadline bounds it) and stops the session after it, every report
        written (exit code 2); a second one stops at once. The agent waits 30 s before it
        kills."""
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def stop_after_this_test(signum, frame):
            if session.shouldstop:
                raise KeyboardInterrupt("interrupted by a second SIGTERM")
            session.shouldstop = f"interrupted by SIGTERM on host {self.world.host} rank {self.world.rank}"

        try:
            signal.signal(signal.SIGTERM, stop_after_this_test)
        except ValueError:  # not the main thread: leave the default
            return
        self._sigterm_installed = True

    def _nccl_setup(self) -> dict:
        """On an NCCL world, what the engine gives its CUDA ranks (node/nccl.py): error
        handling that ends a hung rank, NCCL's warnings in a per-rank file (in
        --gpuconform-rank-logs, else the temporary directory), deterministic cuBLAS, and
        the rank's GPU as ``device_id``. Values the job script exported are kept. Returns
        the ``init_process_group`` options."""
        if self.backend != "nccl":
            return {}
        import tempfile

        from ..node import nccl

        settings = self.config.stash.get(SETTINGS_KEY, None)
        log_dir = (settings and settings.rank_logs) or tempfile.gettempdir()
        env, options = nccl.cluster_rank_setup(self.world.rank, self.world.host, self.device(), log_dir)
        os.environ.update(env)
        return options

    def device(self):
        import torch

        return torch.device("cuda", self.world.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def gather_reports(self, own_xml: str | None, session: pytest.Session) -> list[tuple[str, int, str]]:
        """[(host, rank, xml text)] from every rank, on every rank, and each rank's own
        verdict (``self.failed_elsewhere``): every rank can then tell whether the cluster
        failed, so every rank's exit code says so (and torchrun does not leave a passing
        agent waiting at its exit barrier for a failed one). The verdicts travel beside the
        reports, so this holds without --junitxml too."""
        import torch.distributed as dist

        text = ""
        if own_xml and os.path.exists(own_xml):
            with open(own_xml, encoding="utf-8") as handle:
                text = handle.read()
        mine = (self.world.host, self.world.rank, text, _failed_tests(session))
        gathered: list[Any] = [None] * self.world.world_size
        dist.all_gather_object(gathered, mine, group=self.control)
        self.failed_elsewhere = [
            (host, rank, failed) for host, rank, _, failed in gathered if failed and rank != self.world.rank
        ]
        return [(host, rank, text) for host, rank, text, _ in gathered]

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Gather every rank's verdict and JUnit file; fail this rank if another one failed;
        rank 0 writes the merged file."""
        xmlpath = getattr(self.config.option, "xmlpath", None)
        reports, missing = self.faults.reports(
            lambda own_xml: self.gather_reports(own_xml, session), xmlpath
        )  # bounded in time; a lost rank's report salvaged through the store
        merged = fold.merge(reports, missing) if any(text for _, _, text in reports) else None
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            if self.failed_elsewhere:
                self._say(
                    "gpuconform cluster: this rank exits non-zero because tests failed on "
                    + ", ".join(f"host {h} rank {r} ({n})" for h, r, n in self.failed_elsewhere)
                )
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
            elif missing or self.faults.lost:
                # A rank's results are missing (lost, or its report never came): whatever it
                # found is unknown, so the cluster did not pass, with or without JUnit files.
                gone = ", ".join(f"rank {r}" for r in sorted(missing)) or self.faults.lost_text()
                self._say(f"gpuconform cluster: this rank exits non-zero because results are missing: {gone}")
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
            elif merged is not None and fold.failed(merged):
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if merged is not None and self.world.rank == 0 and self.xml_template:
            target = self.merged_junit or merged_path(self.xml_template)
            fold.write(merged, target)
            self.config.stash[MERGED_JUNIT_KEY] = target

    def _say(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(line)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self._sigterm_installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
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
        test id) before a multi-rank test; the teardown puts the state back, and if it never
        got there (a phase raised past it, the session stopped) it is put back here."""
        try:
            if self._is_multi_rank(item):
                if self.boundary is None:
                    import torch

                    from ..engine.rank.isolation import TestBoundary

                    self.boundary = TestBoundary(torch, self.world.device_kind)
                self._multi_rank_test = item.nodeid
                self.boundary.begin(plan_of(item).seed)
                self._boundary_open = True
            return (yield)
        finally:
            self._multi_rank_test = None
            self._end_boundary()

    def _end_boundary(self) -> list:
        """Put the state captured before the test back, once; what it left behind."""
        if not self._boundary_open or self.boundary is None:
            return []
        self._boundary_open = False
        return list(self.boundary.end())

    def pytest_runtest_logreport(self, report) -> None:
        """What exists once a multi-rank test's setup is done belongs to its fixtures."""
        if report.when == "setup" and self.boundary is not None and report.nodeid == self._multi_rank_test:
            self.boundary.setup_done()
            self.group.setup_done()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item):
        """The same deadline for the fixtures (setup) of a multi-rank test as for its body."""
        return (yield from self._deadline(item, "in setup "))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        """A deadline for the body: SIGALRM interrupts Python-level hangs with the stack;
        a collective stuck in C is cut by faults.py's watchdog just after the deadline."""
        return (yield from self._deadline(item, ""))

    def _deadline(self, item, phase: str):
        if not self._is_multi_rank(item):
            return (yield)
        deadline = plan_of(item).deadline

        def expire(signum, frame):
            stack = "".join(traceback.format_stack(frame))
            pytest.fail(
                f"timed out after {deadline:g} s {phase}on host {self.world.host} rank {self.world.rank} "
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
        """A failure in any phase counts: a fixture that failed on one rank leaves the
        others' collectives (in the fixture or the body) without their partner."""
        report = yield
        if report.failed and self._is_multi_rank(item):
            item.stash[_FAILED_HERE] = True
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item):
        """After the test's own teardown, put this rank's state back and meet all ranks,
        also when that teardown failed here (the others are waiting to meet this rank). If
        any rank failed the test, in any phase, the process group may hold half-done
        collectives (or broken gloo pairs): every rank then builds a new one, so the next
        test starts clean instead of inheriting the wreck. A default group the test
        destroyed or replaced is rebuilt the same way. What the test left behind is
        reported on it."""
        failed_teardown: BaseException | None = None
        try:
            result = yield
        except BaseException as exc:
            if isinstance(exc, _RUN_ENDERS):
                raise
            failed_teardown, result = exc, None
        if self._is_multi_rank(item) and not self.faults.lost:  # no exchange with a broken world
            failed_here = failed_teardown is not None or bool(item.stash.get(_FAILED_HERE, False))
            texts = self._settle(failed_here)
            if failed_teardown is None:
                self._report(item, texts)
            elif texts:  # the teardown's own error is the report; the findings go with it
                self._report(item, texts, strict=False)
        if failed_teardown is not None:
            raise failed_teardown
        return result

    def _settle(self, failed_here: bool) -> list[str]:
        """Every rank: end the boundary, then leave the process groups fit for the next test."""
        found = self._end_boundary()
        state = self.group.state()
        if state == "ok":
            found += self.group.drop_extra_groups()
            import torch.distributed as dist

            failed = [None] * self.world.world_size
            dist.all_gather_object(failed, failed_here, group=self.control)
            if any(failed):
                self._rebuild_process_groups()
        else:
            # destroy_process_group() took the control group too: every rank ran the same
            # body, so every rank rebuilds both, in step.
            found.append(self.group.describe_damage(state))
            self.group.rebuild()
            self._new_control_group()
        return [f.text for f in found]

    def _report(self, item, texts: list[str], strict: bool = True) -> None:
        if not texts:
            return
        lines = [f"host {self.world.host} rank {self.world.rank}: {text}" for text in texts]
        item.user_properties.append((isolation_findings.ISOLATION_PROPERTY, "; ".join(lines)))
        isolation_findings.announce(item, lines)
        if strict and self.strict_isolation:
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
                self.store, self.world.rank, self.world.world_size, self.backend, self.timeout + 30, self._nccl_setup()
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
