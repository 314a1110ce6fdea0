"""Route tests to rank processes and give pytest back one report per phase.

A test goes to the ranks when it has a ``world_size`` parameter (N ranks with a process
group) or needs a GPU (one worker rank, no process group): the pytest controller never
creates a CUDA context itself. Everything else runs in the pytest process as usual.

For a routed test the controller resolves no fixture and runs no test code. In its setup
phase it sends the test to the ranks (node ids, not objects) and follows them to the end of
the test (attempt.py); the ranks' reports are folded into one report per phase
(verdict.py), which pytest gets from ``pytest_runtest_makereport`` in each phase. Whoever
drives the protocol (pytest, pytest-rerunfailures) therefore drives it as for any test,
and every plugin reading reports (JUnit, xdist, terminal, baselines) sees ordinary ones.

Pools of ranks are kept per (world size, backend, device kind) and reused until a test
fails, times out, crashes or leaves what cannot be put right in them, or fresh ranks are
asked for. Any exception that reaches the controller while it waits (another plugin's
timeout, KeyboardInterrupt, SystemExit) kills that pool before it goes on: no later test
can receive an earlier test's answers. pytest-timeout's timer is left to the ranks (they
run the same pytest-timeout); the controller waits that long plus a margin.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
from dataclasses import dataclass, replace
from typing import Any

import pytest

from .. import compat
from ..collection.plan import plan_of
from ..collection.policy import STRICT_FAILURE
from ..node.inventory import Inventory
from ..node.pinning import node_gpu_tokens
from ..reporting.extra_case import report_extra_case
from ..settings import Settings
from ..xdist_glue import XdistRole
from .attempt import Attempt
from .findings import announce
from .gpu_lease import LeaseTimeout, lease
from .interrupts import Interrupted, InterruptGuard
from .pool import RankPool, RankStartError, prestart
from .rank.collect import names_below_file
from .rank.environment import RankIdentity
from .rank.messages import RunTest
from .rank.spec import RankSpec
from .rank_args import rank_arguments
from .verdict import Context, Verdict, engine_error, fold, missing_report, placeholder

log = logging.getLogger(__name__)

START_DEADLINE_FLOOR = 120.0  # spawning ranks imports torch; slow shared nodes need a while
PYTEST_TIMEOUT_MARGIN = 5.0  # past pytest-timeout's own limit, the controller stops waiting
CLOSE_SECONDS = 30.0  # for ranks to tear down their session (an NCCL teardown, a coverage save) and leave
LEAVE_NODEID = "gpuconform/engine::ranks_left_cleanly"
# An xdist worker's leave problems travel to the controller in its workeroutput: xdist lets
# a worker send reports of the test it is running only (it asserts so).
LEAVE_OUTPUT_KEY = "gpuconform_leave_problems"


class _RanInRanks(pytest.skip.Exception):  # type: ignore[name-defined]
    """Ends a routed test's controller phase: its report comes from the ranks. A skip, so
    pytest never offers it to a debugger; the engine's makereport replaces it."""


@dataclass
class _Routed:
    nextitem: Any
    pytest_timeout: float | None = None
    verdict: Verdict | None = None


_ROUTED: pytest.StashKey[_Routed] = pytest.StashKey()


@dataclass
class _SessionOrder:
    """The session's run order: node id -> position, and each pool's positions, ascending."""

    items: list
    index: dict[str, int]
    by_pool: dict[Any, list[int]]


def gpus_to_lease(key: tuple) -> tuple[list[str], str | None]:
    """(GPU tokens to lease, CUDA_VISIBLE_DEVICES for the ranks or None to inherit).

    Only under xdist on a GPU node (the controller passed the node's GPU list): a one-rank
    CUDA test leases its worker's own GPU; an N-rank test leases the node's first N GPUs.
    """
    tokens = node_gpu_tokens()
    world_size, _, device_kind = key
    if tokens is None or device_kind != "cuda":
        return [], None
    if world_size == 1:
        own = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return [t for t in own.split(",") if t][:1], None
    chosen = tokens[:world_size]
    return chosen, ",".join(chosen)


class RankEngine:
    """The pytest-facing side of the engine (one per pytest process)."""

    PLUGIN_NAME = "gpuconform-engine"

    def __init__(self, config: pytest.Config, settings: Settings, inventory: Inventory) -> None:
        self.config = config
        self.settings = settings
        self.inventory = inventory
        self.pools: dict[tuple, RankPool] = {}
        self.retiring: list[RankPool] = []  # replaced pools whose ranks are leaving on their own
        self.guard = InterruptGuard()
        self.leave_problems: list[str] = []  # pool.py leave_problems, reported after the tests
        self._seq = itertools.count(1)
        self._template: RankSpec | None = None
        self._order: _SessionOrder | None = None

    # -- which tests go to ranks ---------------------------------------------------------------
    @staticmethod
    def routed(item: pytest.Item) -> bool:
        if plan_of(item).pool_key is None or item.stash.get(STRICT_FAILURE, None):
            return False
        return item.get_closest_marker("skip") is None  # skipped here, no ranks needed

    # -- session -------------------------------------------------------------------------------
    @staticmethod
    def prepare(config: pytest.Config) -> None:
        """Start the fork server of the ranks (pool.py) as early as possible: it imports torch
        while this process takes the inventory and collects. Not in runs that run no tests
        here (--collect-only, the xdist controller)."""
        if not config.option.collectonly and not XdistRole.is_controller(config):
            prestart()

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.guard.install()

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.close_pools(kill=bool(self.guard.received))

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.close_pools(kill=True)
        self.guard.uninstall()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session):
        """After the last test (or a stop): the pools leave while the run can still fail."""
        try:
            return (yield)
        finally:
            self.close_pools(kill=bool(self.guard.received))
            self.report_leave_problems()

    def report_leave_problems(self) -> None:
        """Ranks that failed their session's last fixture teardown (or did not leave) fail
        the run as a case of their own: no test is left to carry it."""
        if not self.leave_problems:
            return
        problems, self.leave_problems = self.leave_problems, []
        if XdistRole.is_worker(self.config):
            self.config.workeroutput.setdefault(LEAVE_OUTPUT_KEY, []).extend(problems)  # type: ignore[attr-defined]
        else:
            report_extra_case(self.config, LEAVE_NODEID, "\n\n".join(problems))

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        """The xdist controller: a worker whose ranks did not leave cleanly fails the run
        with a case of its own, named after the worker."""
        problems = getattr(node, "workeroutput", {}).get(LEAVE_OUTPUT_KEY)
        if problems:
            worker = node.gateway.id
            report_extra_case(
                self.config, f"{LEAVE_NODEID}[{worker}]", f"on worker {worker}:\n" + "\n\n".join(problems)
            )

    def close_pools(self, kill: bool = False) -> None:
        for key in list(self.pools):
            pool = self.pools.pop(key)
            if kill:
                self._stop(pool.kill, pool)
            else:
                pool.retire()
                self.retiring.append(pool)
        if kill:
            for pool in self.retiring:
                self._stop(pool.kill, pool)
            self.retiring.clear()
        self._finish_retiring(wait=True)

    def _stop(self, how, pool: RankPool, *args) -> None:
        """Close or kill a pool, keeping what its leaving ranks did wrong."""
        how(*args)
        self.leave_problems += pool.leave_problems
        pool.leave_problems = []

    def discard(self, key: tuple, why: str, graceful: bool = False) -> None:
        pool = self.pools.pop(key, None)
        if pool is None:
            return
        log.debug("discarding pool %s: %s", pool.name, why)
        if graceful and pool.device_kind == "cuda":
            self._stop(pool.close, pool, CLOSE_SECONDS)  # its GPUs must be free before the lease is released
        elif graceful:
            pool.retire()
            self.retiring.append(pool)
        else:
            self._stop(pool.kill, pool)
        self._finish_retiring(wait=False)

    def _finish_retiring(self, wait: bool) -> None:
        for pool in list(self.retiring):
            if wait:
                self._stop(pool.close, pool, CLOSE_SECONDS)  # already asked to leave: waits, kills stragglers
            elif pool.exited:
                self._stop(pool.kill, pool)  # reaps and removes the directory
            else:
                continue
            self.retiring.remove(pool)

    # -- the protocol --------------------------------------------------------------------------
    def next_in_pool(self, item: pytest.Item, nextitem: pytest.Item | None) -> pytest.Item | None:
        """The next test the ranks of ``item``'s pool will run, as far as this process knows:
        the first routed test of the same pool at or after ``nextitem`` in the session's
        order, None when there is none. The ranks hand it to pytest as ``nextitem``, so a
        module or session fixture is torn down in the teardown of the last test of its pool
        that uses it, as pytest would (not later, outside any test). Under xdist the order
        ahead is only a guess (another worker may run that test); the ranks then catch up
        at their next test (rank/session.py)."""
        if nextitem is None:
            return None
        order = self._session_order(item.session)
        start = order.index.get(nextitem.nodeid)
        if start is None:
            return nextitem
        ahead = order.by_pool.get(plan_of(item).pool_key, [])
        found = bisect.bisect_left(ahead, start)
        return order.items[ahead[found]] if found < len(ahead) else None

    def _session_order(self, session: pytest.Session) -> _SessionOrder:
        items = session.items
        if self._order is None or self._order.items is not items or len(self._order.index) != len(items):
            by_pool: dict[Any, list[int]] = {}
            for index, node in enumerate(items):
                if self.routed(node):
                    by_pool.setdefault(plan_of(node).pool_key, []).append(index)
            self._order = _SessionOrder(items, {node.nodeid: i for i, node in enumerate(items)}, by_pool)
        return self._order

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        if self.routed(item):
            item.stash[_ROUTED] = _Routed(self.next_in_pool(item, nextitem))
        try:
            return (yield)
        finally:
            if nextitem is None:
                # The session's last test: its fixtures of every scope are done, in the
                # ranks as here. Ranks leave now, so their coverage data is written before
                # pytest-cov combines it.
                self.close_pools(kill=bool(self.guard.received))
                self.report_leave_problems()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item):
        self.guard.enter_phase()
        try:
            routed = item.stash.get(_ROUTED, None)
            if routed is None:
                return (yield)
            routed.verdict = None
            self._run_in_ranks(item, routed)
            raise _RanInRanks("ran in ranks")
        finally:
            self.guard.leave_phase()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item):
        self.guard.enter_phase()
        try:
            if item.stash.get(_ROUTED, None) is None:
                return (yield)
            raise _RanInRanks("ran in ranks")
        finally:
            self.guard.leave_phase()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None):
        self.guard.enter_phase()
        try:
            routed = item.stash.get(_ROUTED, None)
            if routed is None:
                return (yield)
            if routed.verdict is not None:
                announce(item, routed.verdict.findings)
            # Nothing of this test was set up here, so the other plugins' teardowns (which
            # expect their setup to have run) are skipped; the controller's own fixtures of
            # earlier tests are torn down as pytest would, for the next test.
            compat.setup_state(item.session).teardown_exact(nextitem)
            raise _RanInRanks("ran in ranks")
        finally:
            self.guard.leave_phase()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        excinfo = call.excinfo
        if excinfo is not None and isinstance(excinfo.value, Interrupted):
            return self._interrupted_here(item, call, excinfo.value)
        routed = item.stash.get(_ROUTED, None)
        if routed is None:
            return None
        if excinfo is not None and not isinstance(excinfo.value, _RanInRanks):
            return None  # the controller's own failure (its teardown of earlier tests): pytest reports it
        if routed.verdict is None:
            return placeholder(item, call.when)  # the setup already failed here; nothing else ran
        report = routed.verdict.reports.get(call.when)
        if report is None:
            return missing_report(item, call.when, f"the ranks sent no {call.when} report")
        return report

    def _interrupted_here(self, item: pytest.Item, call: pytest.CallInfo, exc: Interrupted) -> pytest.TestReport:
        """A test running in the controller when SIGTERM/SIGINT came: reported, then the session
        stops. An error, not a failure, as for a test in ranks: the test did not finish, so it
        has no verdict; a report of a phase other than the call is what pytest and its JUnit
        count as an error."""
        item.session.shouldstop = str(exc)
        report = pytest.TestReport.from_item_and_call(item, call)
        if report.when == "call":
            report.when = "setup"
        headline = f"{exc} after {call.duration:.1f} s"
        path, lineno, _ = item.location
        report.longrepr = compat.text_longrepr(
            str(item.path), (lineno or 0) + 1, headline, [f"{path}:{(lineno or 0) + 1}: {headline}"]
        )
        return report

    # -- pytest-timeout: the ranks keep the time ----------------------------------------------
    @pytest.hookimpl(optionalhook=True, tryfirst=True)
    def pytest_timeout_set_timer(self, item: pytest.Item, settings) -> bool | None:
        routed = item.stash.get(_ROUTED, None)
        if routed is None:
            return None
        routed.pytest_timeout = settings.timeout
        return True

    @pytest.hookimpl(optionalhook=True, tryfirst=True)
    def pytest_timeout_cancel_timer(self, item: pytest.Item) -> bool | None:
        return True if item.stash.get(_ROUTED, None) is not None else None

    # -- running one test ------------------------------------------------------------------------
    def _run_in_ranks(self, item: pytest.Item, routed: _Routed) -> None:
        plan = plan_of(item)
        key = plan.pool_key
        assert key is not None
        deadline = plan.deadline
        if routed.pytest_timeout:
            deadline = min(deadline, routed.pytest_timeout + PYTEST_TIMEOUT_MARGIN)
        leased, gpus = gpus_to_lease(key)
        try:
            with lease(leased, timeout=max(START_DEADLINE_FLOOR, deadline) * 2):
                pool, started = self._pool(key, deadline, gpus)
                request = self._request(item, routed.nextitem, plan.seed)
                routed.verdict = self._attempt(item, request, pool, deadline, started)
                # Still holding the lease: a CUDA pool closed or killed here frees its GPUs
                # before another worker's test is handed them.
                self._discard_after(key, routed.verdict, plan.fresh)
        except LeaseTimeout as exc:
            routed.verdict = engine_error(item, str(exc), [])  # the pool did nothing: kept as it is
        except RankStartError as exc:
            headline = f"could not start {key[0]} rank(s) ({key[1] or 'no process group'}, {key[2]})"
            routed.verdict = engine_error(item, headline, str(exc).splitlines())

    def _discard_after(self, key: tuple, verdict: Verdict, fresh: bool) -> None:
        if not verdict.reusable or fresh:
            why = "fresh ranks asked for" if verdict.reusable else "ranks not reusable"
            self.discard(key, why, graceful=verdict.reusable or verdict.can_retire)

    def _attempt(self, item: pytest.Item, request: RunTest, pool: RankPool, deadline: float, started) -> Verdict:
        attempt = Attempt(pool, request, deadline, self._deserialize)
        try:
            record = attempt.run()
        except Interrupted as exc:
            item.session.shouldstop = str(exc)
            record = attempt.interrupted(exc.signal_name)  # output first: the kill removes the logs
            self.discard(pool.key, str(exc))
        except BaseException:
            self.discard(pool.key, "the controller was interrupted while waiting")
            raise
        context = Context(
            deadline=deadline,
            strict_isolation=self.settings.strict_isolation,
            pool_start=started,
            pool_start_detail=self._start_detail(pool) if started is not None else "",
        )
        return fold(item, record, context)

    @staticmethod
    def _start_detail(pool: RankPool) -> str:
        ready = [r.ready for r in pool.ranks if r.ready is not None]
        if not ready:
            return ""
        worst = {part: max(r.seconds.get(part, 0.0) for r in ready) for part in ("torch", "process_group", "pytest")}
        return (
            f"import torch {worst['torch']:.2f} s, process group {worst['process_group']:.2f} s, "
            f"pytest session {worst['pytest']:.2f} s"
        )

    def _request(self, item: pytest.Item, nextitem, seed: int) -> RunTest:
        return RunTest(
            seq=next(self._seq),
            nodeid=item.nodeid,
            path=str(item.path),
            names=names_below_file(item),
            seed=seed,
            next_path=str(nextitem.path) if nextitem is not None else None,
            next_names=names_below_file(nextitem) if nextitem is not None else (),
        )

    def _deserialize(self, data: dict):
        return self.config.hook.pytest_report_from_serializable(config=self.config, data=data)

    # -- pools -----------------------------------------------------------------------------------
    def _pool(self, key: tuple, deadline: float, gpus: str | None) -> tuple[RankPool, float | None]:
        """A live pool for this key, and its start-up time when this test started it."""
        pool = self.pools.get(key)
        if pool is not None and pool.alive and pool.pg_timeout >= deadline + 60.0 and pool.cuda_visible_devices == gpus:
            return pool, None
        if pool is not None:
            # A live pool leaves gracefully: its ranks tear down the fixtures they kept up.
            self.discard(key, "dead, or its process-group timeout or GPUs do not suit this test", graceful=pool.alive)
        pool = RankPool(key, self.template(deadline), str(compat.basetemp(self.config)), gpus, self.settings.rank_logs)
        try:
            pool.spawn()
            seconds = pool.wait_ready(max(START_DEADLINE_FLOOR, deadline))
        except BaseException:
            pool.kill()  # never leave half-started ranks or their directory behind
            raise
        log.debug("started pool %s in %.2f s (pids %s)", pool.name, seconds, [r.pid for r in pool.ranks])
        self.pools[key] = pool
        return pool, seconds

    def template(self, deadline: float) -> RankSpec:
        """What every rank starts with; rank, paths and world are filled in by the pool."""
        if self._template is None:
            self._template = RankSpec(
                identity=RankIdentity(0, 1, None, "cpu"),
                store_path="",
                log_path="",
                stack_path="",
                phase_path="",
                pg_timeout=0.0,
                invocation_dir=str(self.config.invocation_params.dir),
                pytest_args=rank_arguments(self.config),
                shared_dir="",
                cpu_threads=1,
                settings=self.settings,
                # torch.__version__ is a TorchVersion: as a plain str the rank can unpickle
                # its spec before importing torch (and time that import on its own).
                inventory=replace(self.inventory, torch=str(self.inventory.torch)),
            )
        return replace(self._template, pg_timeout=deadline + 60.0)
