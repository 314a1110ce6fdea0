"""Route tests to rank processes and turn what the ranks did into pytest outcomes.

A test goes to the ranks when it has a ``world_size`` parameter (N ranks with a process
group) or when it needs a GPU (one worker rank, no process group): the pytest controller
never creates a CUDA context itself. Everything else runs in the pytest process as usual.

Pools of ranks are kept per (world size, backend, device kind) and reused until a test
fails, times out or crashes in them, or fresh ranks are asked for.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle

import pytest

from .. import compat
from ..collection.plan import TestPlan, plan_of
from ..node.pinning import node_gpu_tokens
from .gpu_lease import LeaseTimeout, lease
from .pool import RankPool, RankStartError
from .rank.fixtures import RANK_SIDE
from .rank.messages import RunTest
from .verdict import Verdict, judge

log = logging.getLogger(__name__)

START_DEADLINE_FLOOR = 120.0  # spawning ranks imports torch; slow shared nodes need a while


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


class UnsendableFixture(Exception):
    pass


VERDICT_KEY: pytest.StashKey[Verdict] = pytest.StashKey()


class _Crash:
    def __init__(self, path: str, lineno: int, message: str) -> None:
        self.path, self.lineno, self.message = path, lineno, message


class RankFailureRepr:
    """A failure report whose one-line message is the verdict's headline.

    JUnit's ``message`` attribute and pytest's short summary show the headline (rank,
    exception, measured value vs bound); the body holds the rank's traceback and the
    per-rank summary.
    """

    def __init__(self, location: tuple, headline: str, text: str) -> None:
        path, lineno, _ = location
        self.reprcrash = _Crash(path, (lineno or 0) + 1, headline)
        self.text = text

    def toterminal(self, tw) -> None:
        for line in self.text.splitlines():
            tw.line(line)

    def __str__(self) -> str:
        return self.text


def _rank_side_dependencies(item: pytest.Function, name: str, seen: set | None = None) -> set[str]:
    """Rank-side fixtures a controller-resolved fixture depends on, directly or not."""
    seen = set() if seen is None else seen
    found: set[str] = set()
    for fixturedef in compat.fixture_definitions(item, name):  # overrides and what they override
        for arg in fixturedef.argnames:
            if arg in RANK_SIDE:
                found.add(arg)
            elif arg not in seen:
                seen.add(arg)
                found |= _rank_side_dependencies(item, arg, seen)
    return found


def controller_kwargs(item: pytest.Function) -> tuple[dict, tuple[str, ...]]:
    """Fixture values resolved here and pickled to the ranks, plus the names ranks provide."""
    kwargs, rank_side = {}, []
    for name in compat.fixture_argnames(item):
        if name in RANK_SIDE:
            rank_side.append(name)
            continue
        depends = _rank_side_dependencies(item, name)
        if depends:
            raise UnsendableFixture(
                f"fixture {name!r} of {item.nodeid} depends on {', '.join(sorted(depends))}, which only exist "
                f"inside the ranks; fixtures of multi-rank tests are resolved once in the controller, so compute "
                f"per-rank values in the test body instead"
            )
        kwargs[name] = _pickled(item, f"fixture {name!r}", item.funcargs[name])
    return kwargs, tuple(rank_side)


def _pickled(item: pytest.Function, what: str, value) -> bytes:
    """Pickled on its own, so the rank can name exactly what failed to arrive."""
    try:
        return pickle.dumps(value)
    except Exception as exc:
        raise UnsendableFixture(
            f"{what} of {item.nodeid} has a value of type {type(value).__name__} that cannot be "
            f"sent to the rank processes ({type(exc).__name__}: {exc}); multi-rank tests can only "
            f"receive picklable values (paths, numbers, strings, tensors, dataclasses)"
        ) from None


def build_request(item: pytest.Function, plan: TestPlan) -> RunTest:
    import sys

    function = item.obj
    if (
        inspect.iscoroutinefunction(function)
        or inspect.isasyncgenfunction(function)
        or inspect.isgeneratorfunction(function)
    ):
        raise UnsendableFixture(
            f"{item.nodeid} is a coroutine or generator function; multi-rank test bodies "
            "must be plain functions (nothing would run them to completion in the ranks)"
        )
    kwargs, rank_side = controller_kwargs(item)
    instance = _pickled(item, "the test class instance", item.instance) if item.cls is not None else None
    module = item.module
    qualname = item.originalname if item.cls is None else f"{item.cls.__qualname__}.{item.originalname}"
    return RunTest(
        nodeid=item.nodeid,
        module_name=module.__name__,
        module_file=module.__file__,
        function=qualname,
        kwargs=kwargs,
        instance=instance,
        rank_fixtures=rank_side,
        sys_path=tuple(sys.path),
        seed=plan.seed,
    )


class RankEngine:
    """The pytest-facing side of the engine (one per pytest process)."""

    PLUGIN_NAME = "gpuconform-engine"

    def __init__(self) -> None:
        self.pools: dict[tuple, RankPool] = {}

    def pool_for(self, key: tuple, timeout: float, gpus: str | None = None) -> RankPool:
        pool = self.pools.get(key)
        if pool is not None and pool.alive and pool.pg_timeout >= timeout + 60.0:
            return pool
        if pool is not None:
            pool.kill()
        world_size, backend, device_kind = key
        pool = RankPool(world_size, backend, device_kind, pg_timeout=timeout + 60.0, cuda_visible_devices=gpus)
        try:
            seconds = pool.start(deadline_seconds=max(START_DEADLINE_FLOOR, timeout))
        except BaseException as exc:
            pool.kill()  # never leave half-started ranks or their directory behind
            if isinstance(exc, RankStartError):
                raise
            raise RankStartError(f"{type(exc).__name__}: {exc}") from exc
        log.debug("started pool %s in %.2f s (pids %s)", key, seconds, [r.process.pid for r in pool.ranks])
        self.pools[key] = pool
        return pool

    def discard(self, key: tuple, why: str) -> None:
        pool = self.pools.pop(key, None)
        if pool is not None:
            log.debug("discarding pool %s: %s", key, why)
            pool.kill()

    @pytest.hookimpl(tryfirst=True)
    def pytest_pyfunc_call(self, pyfuncitem: pytest.Function):
        plan = plan_of(pyfuncitem)
        key = plan.pool_key
        if key is None:
            return None
        try:
            request = build_request(pyfuncitem, plan)
        except UnsendableFixture as exc:
            pytest.fail(str(exc), pytrace=False)
        timeout = plan.deadline
        leased, gpus = gpus_to_lease(key)
        try:
            with lease(leased, timeout=max(START_DEADLINE_FLOOR, timeout) * 2):
                try:
                    pool = self.pool_for(key, timeout, gpus)
                except RankStartError as exc:
                    self.discard(key, "start-up failed")
                    pytest.fail(
                        f"could not start {key[0]} rank(s) ({key[1] or 'no process group'}, {key[2]}): {exc}",
                        pytrace=False,
                    )
                result = pool.run(request, timeout)
        except LeaseTimeout as exc:
            pytest.fail(str(exc), pytrace=False)
        verdict = judge(result, key[0], timeout)
        if not verdict.reusable or plan.fresh:
            why = "fresh ranks asked for" if verdict.reusable else f"test {verdict.outcome}: ranks not reusable"
            self.discard(key, why)
        self._report(pyfuncitem, result.output, verdict)
        return True

    def _report(self, item: pytest.Function, output: dict[int, str], verdict: Verdict) -> None:
        for rank in sorted(output):
            if output[rank].strip():
                item.add_report_section("call", "stdout", f"[rank {rank}]\n{output[rank]}")
        item.user_properties.extend(verdict.records)
        if verdict.outcome == "skipped":
            raise compat.skip_at_item_location(verdict.headline)
        if verdict.outcome == "failed":
            item.stash[VERDICT_KEY] = verdict
            pytest.fail(verdict.longrepr(), pytrace=False)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call):
        report = yield
        verdict = item.stash.get(VERDICT_KEY, None)
        if verdict is not None and call.when == "call" and report.failed:
            report.longrepr = RankFailureRepr(item.location, verdict.headline, verdict.longrepr())
            # Plain attributes survive xdist's report serialisation; the repr object does not.
            report.gpuconform_headline = verdict.headline
        return report

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """On the xdist controller: give a rank failure back its one-line JUnit message."""
        headline = getattr(report, "gpuconform_headline", None)
        if headline and isinstance(report.longrepr, str):
            report.longrepr = RankFailureRepr(report.location, headline, report.longrepr)  # type: ignore[assignment]

    def pytest_sessionfinish(self) -> None:
        for key in list(self.pools):
            pool = self.pools.pop(key)
            pool.close()
