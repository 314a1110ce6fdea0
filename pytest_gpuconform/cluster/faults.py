"""Cluster mode when a rank hangs in C, a host dies or a link goes down.

Without this, a collective blocked in C ends only at the process group's timeout (the
deadline + 30 s), and a lost peer leaves the survivors waiting in the next exchange for the
control group's timeout (5 minutes or more) before they crash without a merged report.
With it (measured on namespace hosts, tests/cluster/test_host_faults.py):

* a multi-rank test still inside its body ``CUT_GRACE`` after its deadline is blocked in C
  (SIGALRM would have ended a Python-level hang): the watchdog takes the main thread's
  stack and cuts this rank's test connections (connections.py), so the blocked collective
  raises; the test fails with "timed out after N s ... inside a C-level call" and the run
  goes on with rebuilt process groups;
* after a failed multi-rank test, and when an exchange between ranks breaks or overruns,
  every peer's beacon is probed (peers.py); a lost peer fails the test naming its host and
  rank and why it counts as lost, and the session stops: no exchange is attempted with a
  world that lost a member;
* the reports then travel through the rendezvous store instead of the broken control group:
  each survivor sends its JUnit to rank 0, which writes junit-cluster.xml with "no report
  from host X rank R" errors for the ranks it did not hear from (fold.py); every survivor
  exits non-zero.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest

from ..collection.plan import CLUSTER, plan_of
from . import connections, peers
from .watchdog import Watchdog

if TYPE_CHECKING:
    from .plugin import ClusterMode

CUT_GRACE = 0.5  # after the deadline SIGALRM has had its chance: a body still running is blocked in C
EXCHANGE_GRACE = 5.0  # a slow peer's own cut, probe and fixture teardown fit in this
SALVAGE_SECONDS = 10.0  # rank 0 waits this long for the survivors' reports
SALVAGE_KEY = "gpuconform/salvage/{rank}"

Reports = list[tuple[str, int, str]]


@dataclass(frozen=True)
class Cut:
    """What the watchdog did to a test blocked in C."""

    deadline: float
    stack: str
    connections: tuple[str, ...]


def annotate(report: pytest.TestReport, headline: str, details: str) -> None:
    """Make ``headline`` the failure's message (JUnit message attribute, short summary) and
    add ``details`` to its text, keeping the traceback of what the test raised."""
    longrepr = report.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    add_section = getattr(longrepr, "addsection", None)  # pytest's exception reprs have one
    if crash is not None and callable(add_section):
        raised = crash.message.splitlines()[0] if crash.message else ""
        crash.message = headline
        add_section("gpuconform cluster", f"{details}\n\nthe test raised: {raised}")
    else:  # a plain text failure (pytest.fail(pytrace=False), as the SIGALRM deadline raises)
        report.longrepr = f"{headline}\n{details}\n\nthe test raised: {longrepr}"


def _main_thread_stack() -> str:
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    return "".join(traceback.format_stack(frame)) if frame is not None else "(main thread's stack unavailable)"


class ClusterFaults:
    """Companion plugin of ClusterMode (registered by it); owns the watchdog and the beacon."""

    PLUGIN_NAME = "gpuconform-cluster-faults"

    def __init__(self, cluster: ClusterMode) -> None:
        self.cluster = cluster
        self.world = cluster.world
        self.table: dict[int, peers.Peer] = {}
        self.lost: dict[int, str] = {}  # rank -> why it counts as lost
        self.protected: set[int] = set()  # socket inodes of the control group
        self.watchdog: Watchdog | None = None
        self.beacon: peers.Beacon | None = None
        self._cut: Cut | None = None
        self._call_started: float | None = None

    # -- start-up ----------------------------------------------------------------------------
    @contextmanager
    def protect(self) -> Iterator[None]:
        """Around the control group's creation: its connections are never cut by a test's
        deadline (they carry the verdicts and reports afterwards)."""
        with connections.capture() as opened:
            yield
        self.protected = set(opened)

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """After ClusterMode joined the world (its hook is tryfirst): start the beacon and
        exchange every rank's host, rank and beacon address once."""
        import torch.distributed as dist

        address = peers.local_address(os.environ["MASTER_ADDR"], self._store_port())
        token = f"gpuconform pid {os.getpid()} host {self.world.host} rank {self.world.rank}"
        self.beacon = peers.Beacon(address, token)
        me = peers.Peer(self.world.host, self.world.rank, address, self.beacon.port, token)
        table: list[Any] = [None] * self.world.world_size
        dist.all_gather_object(table, me, group=self.cluster.control)
        self.table = {peer.rank: peer for peer in table}
        self.watchdog = Watchdog()

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
        if self.beacon is not None:
            self.beacon.close()

    @staticmethod
    def _store_port() -> int:
        return int(os.environ["MASTER_PORT"])

    # -- finding lost peers --------------------------------------------------------------------
    def check_peers(self) -> dict[int, str]:
        """Probe every peer not yet known lost; remember and return the newly lost ones."""
        others = [p for r, p in self.table.items() if r != self.world.rank and r not in self.lost]
        found = peers.probe(others)
        self.lost.update(found)
        return found

    def lost_text(self) -> str:
        return peers.describe(self.lost, self.table)

    def _stop_session(self, session: pytest.Session) -> None:
        """Stop after this test (exit code 1, as for -x: tests failed)."""
        session.shouldfail = f"cluster mode: {self.lost_text()}; the world cannot continue without it"

    # -- a test blocked in C -----------------------------------------------------------------
    @staticmethod
    def _is_multi_rank(item: pytest.Item) -> bool:
        return plan_of(item).placement == CLUSTER

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item):
        """The fixtures of a multi-rank test get the deadline too: a fixture waiting in a
        collective for a peer whose own fixture failed is cut like a body would be."""
        return (yield from self._watched(item))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        return (yield from self._watched(item))

    def _watched(self, item: pytest.Item):
        if not self._is_multi_rank(item) or self.watchdog is None:
            return (yield)
        deadline = plan_of(item).deadline
        self._cut = None
        self._call_started = time.monotonic()
        self.watchdog.arm(deadline + CUT_GRACE, lambda: self._cut_test(deadline))
        try:
            return (yield)
        finally:
            self.watchdog.disarm()

    def _cut_test(self, deadline: float) -> None:
        """In the watchdog thread: the body is past its deadline and not in Python."""
        stack = _main_thread_stack()
        if self.cluster.backend == "nccl":
            self._abort_nccl()
        cut = connections.cut(keep=self.protected, keep_ports={self._store_port()})
        self._cut = Cut(deadline, stack, tuple(cut))
        return None

    @staticmethod
    def _abort_nccl() -> None:
        """NCCL's communicators can be aborted (ncclCommAbort), which wakes a kernel-side wait.
        Not yet run on a GPU cluster."""
        import torch.distributed.distributed_c10d as c10d

        abort = getattr(c10d, "_abort_process_group", None)
        if abort is not None:
            try:
                abort()
            except Exception:  # noqa: BLE001 -- the socket cut below still runs
                pass

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call):
        report = yield
        if report.when == "teardown" or not report.failed or not self._is_multi_rank(item) or not self.table:
            return report
        cut, self._cut = self._cut, None
        # A peer can be the cause only if communication failed: the watchdog cut a blocked
        # call, or a collective raised (torch's distributed errors are RuntimeErrors). An
        # assertion does not set a whole world probing each other.
        if cut is not None or (call.excinfo is not None and call.excinfo.errisinstance((RuntimeError, OSError))):
            self.check_peers()
        if cut is None and not self.lost:
            return report  # an ordinary failure: ClusterMode rebuilds the groups as usual
        lines = []
        where = f"host {self.world.host} rank {self.world.rank}"
        if self.lost:
            lines.append(f"{self.lost_text()} (seen from {where} during this test)")
        if cut is not None:
            pg_timeout = cut.deadline + 30
            lines.append(
                f"timed out after {cut.deadline:g} s on {where}, blocked inside a C-level call "
                f"(a collective waiting for a peer): {CUT_GRACE:g} s after the deadline the watchdog cut "
                f"{len(cut.connections)} process-group connection(s) instead of waiting for the group's "
                f"own timeout ({pg_timeout:g} s)"
            )
        details = [*lines]
        if cut is not None:
            details += ["", "stack of the main thread at the deadline:", cut.stack.rstrip()]
        annotate(report, lines[0], "\n".join(details))
        if self.lost:
            self._stop_session(item.session)
        return report

    # -- the exchange after each multi-rank test ---------------------------------------------
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item):
        """Bound ClusterMode's exchange of verdicts: a peer that is gone fails the test (a
        teardown error naming it) instead of leaving this rank waiting."""
        if not self._is_multi_rank(item) or self.watchdog is None:
            return (yield)
        started = self._call_started if self._call_started is not None else time.monotonic()
        due = started + plan_of(item).deadline + EXCHANGE_GRACE - time.monotonic()
        self.watchdog.arm(max(1.0, due), self._exchange_overrun)
        lost_before = bool(self.lost)
        try:
            return (yield)
        except Exception:
            if not self.lost:
                self.check_peers()
            if not self.lost or lost_before:
                raise
            self._stop_session(item.session)
            pytest.fail(f"{self.lost_text()} (seen from host {self.world.host} rank {self.world.rank})", pytrace=False)
        finally:
            self.watchdog.disarm()
            self._call_started = None

    def _exchange_overrun(self) -> float | None:
        """In the watchdog thread: an exchange outlived every peer's deadline. Lost peers:
        cut the control group so the exchange raises. All alive: wait longer."""
        self.check_peers()
        if not self.lost:
            return EXCHANGE_GRACE
        connections.cut(only=self.protected)
        return None

    # -- the reports at the end -------------------------------------------------------------
    def reports(self, gather: Callable[[str | None], Reports], own_xml: str | None) -> tuple[Reports, dict[int, str]]:
        """Every rank's JUnit text for the merge, and why some are missing: over the control
        group while the world is whole (bounded: a peer lost now is found), else through the
        store from the survivors."""
        if not self.lost and self.watchdog is not None:
            self.watchdog.arm(self.cluster.timeout + EXCHANGE_GRACE, self._exchange_overrun)
            try:
                return gather(own_xml), {}
            except Exception:
                self.check_peers()
                if not self.lost:
                    raise
            finally:
                self.watchdog.disarm()
        elif not self.lost:
            return gather(own_xml), {}
        return self._salvage(own_xml), dict(self.lost)

    def _salvage(self, own_xml: str | None) -> Reports:
        text = ""
        if own_xml and os.path.exists(own_xml):
            with open(own_xml, encoding="utf-8") as handle:
                text = handle.read()
        texts = {self.world.rank: text}
        store = self.cluster.store
        survivors = [r for r in self.table if r not in self.lost and r != self.world.rank]
        if store is not None:
            store.set_timeout(timedelta(seconds=SALVAGE_SECONDS))
            if self.world.rank != 0 and 0 not in self.lost:
                try:
                    store.set(SALVAGE_KEY.format(rank=self.world.rank), text)
                except Exception:  # noqa: BLE001 -- rank 0 then lists this rank as missing
                    pass
            elif self.world.rank == 0 and survivors:
                keys = [SALVAGE_KEY.format(rank=r) for r in survivors]
                try:
                    store.wait(keys, timedelta(seconds=SALVAGE_SECONDS))
                except Exception:  # noqa: BLE001 -- whoever did not send is listed as missing
                    pass
                for rank, key in zip(survivors, keys, strict=True):
                    try:
                        if store.check([key]):
                            texts[rank] = store.get(key).decode("utf-8")
                    except Exception:  # noqa: BLE001
                        pass
        for rank in survivors:
            if rank not in texts and self.world.rank == 0:
                self.lost.setdefault(
                    rank, f"alive when the loss was found, but sent no report in {SALVAGE_SECONDS:g} s"
                )
        return [(peer.host, rank, texts.get(rank, "")) for rank, peer in sorted(self.table.items())]
