"""The rank's pytest session: a pytest worker that runs the controller's items one by one.

Each rank runs ``pytest.main`` with the controller's arguments and these two plugins.
Instead of collecting and running everything, the session waits for the controller: for
each ``RunTest`` it finds the item (collect.py), runs pytest's own runtest protocol on it
(setup, call, teardown: fixtures of every scope resolved here, markers, assertion
rewriting, capsys/caplog/monkeypatch, xfail, warnings filters, unittest classes), and
sends pytest's serialised phase reports back, then what the test left behind. Session- and
module-scoped fixtures live as long as the rank: the controller names the next test of the
same pool, so pytest tears them down in the teardown of the last test of the pool that
needs them (and reports a failure there). What an inexact hint left up is torn down before
the next test (a failure is that test's error) or when the pool leaves (a failure ends the
rank with TEARDOWN_FAILED, which the controller reports as a failed case).

Rank mode differs from a normal session in what would clash with the controller: files the
controller writes (JUnit, HTML, report logs, JSON reports: CONTROLLER_FILES; the cache) are
not written here, the terminal prints nothing (the rank's output is the test's output),
``--pdb`` and xdist are off, and pytest-rerunfailures is unregistered (the controller reruns the whole multi-rank test).
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import traceback
from dataclasses import dataclass, field

import pytest

from ... import compat
from .collect import CollectionProblem, LazyItems
from .isolation import TestBoundary
from .messages import CLOSE, Finding, Finished, RankError, Ready, Rejoined, Reports, RunTest
from .spec import ATTEMPT_KEY, RANK_SPEC_KEY, RankSpec

# Options of plugins whose output files belong to the controller alone: JUnit (pytest),
# pytest-html, pytest-reportlog, pytest-json-report. Only these are cleared in ranks; a
# plugin that writes another report file from a per-session option would write it once per
# rank as well (add its option's dest here).
CONTROLLER_FILES = ("xmlpath", "htmlpath", "report_log", "json_report_file")
# A rank's exit status when its session's last fixture teardown failed (see _teardown_all).
TEARDOWN_FAILED = 70
# Plugins that drive the protocol from the controller and must not drive it again here.
CONTROLLER_DRIVERS = ("rerunfailures",)


class RankOptions:
    """Rank mode's option changes, made before any other plugin configures itself."""

    PLUGIN_NAME = "gpuconform-rank-options"

    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        option = config.option
        for dest in CONTROLLER_FILES:
            if getattr(option, dest, None):
                setattr(option, dest, None)
        for dest in ("usepdb", "trace"):
            if getattr(option, dest, False):
                setattr(option, dest, False)
        if getattr(option, "numprocesses", None):  # pytest-xdist: a rank never fans out
            option.numprocesses = None
        if getattr(option, "dist", "no") != "no":
            option.dist = "no"
        if getattr(option, "tx", None):
            option.tx = []


class _SilentTerminal:
    """Stands in for the terminal reporter: it defines no hooks, so nothing is printed per
    test, yet plugins that write through the terminal writer (pytest-timeout's stack dumps)
    still reach the rank log."""

    def __init__(self, reporter) -> None:
        self._reporter = reporter

    def __getattr__(self, name: str):
        return getattr(self._reporter, name)


@dataclass
class _Current:
    seq: int
    buffer: list[dict] = field(default_factory=list)


def _plain(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


def _sendable(data: dict) -> dict:
    """pytest's serialised report, guaranteed to pickle: user properties may hold anything."""
    try:
        pickle.dumps(data)
        return data
    except Exception:
        pass
    data = dict(data)
    data["user_properties"] = [(str(n), _plain(v)) for n, v in data.get("user_properties", ())]
    try:
        pickle.dumps(data)
        return data
    except Exception:
        return {k: (v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)) for k, v in data.items()}


class PhaseFile:
    """One word, overwritten in place: where the controller looks when the rank cannot answer
    (a crash, a hang), without a message per phase on the pipe."""

    WIDTH = 8

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if path else -1

    def set(self, word: str) -> None:
        if self.fd >= 0:
            os.pwrite(self.fd, word.ljust(self.WIDTH).encode(), 0)


def read_phase(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read(PhaseFile.WIDTH).decode(errors="replace").strip()
    except OSError:
        return ""


def _log_offset() -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        return os.fstat(1).st_size
    except OSError:
        return 0


class RankSession:
    PLUGIN_NAME = "gpuconform-rank"

    def __init__(self, spec: RankSpec, conn, torch, group, started: dict[str, float]) -> None:
        self.spec = spec
        self.conn = conn
        self.torch = torch
        self.group = group  # groups.DefaultGroup, or None for a one-rank worker
        self.seconds = started
        self.boundary = TestBoundary(torch, spec.identity.device_kind)
        self.phase = PhaseFile(spec.phase_path)
        self.items: LazyItems | None = None
        self.current: _Current | None = None
        self.ready_sent = False
        self.teardown_failed = False
        self.config: pytest.Config | None = None
        self._pytest_started = time.perf_counter()

    # -- configuration -----------------------------------------------------------------------
    @pytest.hookimpl(trylast=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        self.config = config
        config.stash[RANK_SPEC_KEY] = self.spec
        manager = config.pluginmanager
        reporter = manager.get_plugin("terminalreporter")
        if reporter is not None:
            manager.unregister(reporter, name="terminalreporter")
            manager.register(_SilentTerminal(reporter), "terminalreporter")
        for name in CONTROLLER_DRIVERS:
            plugin = manager.get_plugin(name)
            if plugin is not None:
                manager.unregister(plugin, name=name)

    # -- collection: lazily, per file --------------------------------------------------------
    def pytest_collection(self, session: pytest.Session) -> bool:
        self.items = LazyItems(session)
        self.items.bootstrap()
        return True

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_collection_modifyitems(self, session, config, items):
        """While the bootstrap collects only directories and files, other plugins see no items."""
        if self.items is None or not self.items.bootstrapping:
            return (yield)
        hidden = list(items)
        items[:] = []
        try:
            return (yield)
        finally:
            items[:] = hidden

    def pytest_deselected(self, items) -> None:
        if self.items is not None:
            self.items.add(items)

    def pytest_collectreport(self, report) -> None:
        if self.items is not None:
            self.items.collect_failed(report)

    # -- the loop ------------------------------------------------------------------------------
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        self.seconds["pytest"] = time.perf_counter() - self._pytest_started
        self.conn.send(Ready(self.spec.rank, os.getpid(), dict(self.seconds)))
        self.ready_sent = True
        while True:
            try:
                request = self.conn.recv()
            except (EOFError, OSError):  # the controller is gone
                break
            if request is CLOSE:
                break
            if isinstance(request, RunTest) and not self._run(session, request):
                break
        self._teardown_all(session)
        return True

    def _run(self, session: pytest.Session, request: RunTest) -> bool:
        """Run one test; False when the rank cannot go on."""
        rank = self.spec.rank
        assert self.items is not None
        # The previous test's "done" must not stand for this one: a rank that dies from here
        # until its setup starts has not run this test at all.
        self.phase.set("begin")
        try:
            item = self.items.find(request.path, request.names)
            nextitem = self.items.next_item(item, request.next_path, request.next_names)
        except CollectionProblem as exc:
            self.conn.send(RankError(request.seq, rank, f"rank {rank} could not collect {request.nodeid}: {exc}"))
            return True
        except Exception:
            self.conn.send(RankError(request.seq, rank, f"rank {rank} failed collecting:\n{traceback.format_exc()}"))
            return True
        self.current = _Current(request.seq)
        item.stash[ATTEMPT_KEY] = request.seq
        problem = self._catch_up(session, item)
        if problem is not None:
            self.current = None
            self.conn.send(RankError(request.seq, rank, problem))
            return True
        findings: list[Finding] = []
        start = _log_offset()
        self.boundary.begin(request.seed)
        try:
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        except BaseException:  # KeyboardInterrupt, pytest.exit(), a plugin's internal error
            self._flush()
            text = f"rank {rank} stopped inside pytest's protocol:\n{traceback.format_exc()}"
            self.conn.send(RankError(request.seq, rank, text, fatal=True))
            return False
        self.phase.set("done")
        findings += self.boundary.end()
        state = "ok"
        if self.group is not None:
            findings += self.group.drop_extra_groups()
            state = self.group.state()
            if state != "ok":
                findings.append(self.group.describe_damage(state))
        buffered, self.current = self.current.buffer, None
        self.conn.send(
            Finished(
                request.seq,
                rank,
                buffered,
                findings,
                (start, _log_offset()),
                self.items.last_collect_seconds,
                rejoining=state != "ok",
            )
        )
        if state != "ok":
            return self._rebuild_group(request.seq)
        return True

    def _rebuild_group(self, seq: int) -> bool:
        try:
            self.group.rebuild()
        except Exception:
            self.conn.send(Rejoined(seq, self.spec.rank, traceback.format_exc()))
            return False
        self.conn.send(Rejoined(seq, self.spec.rank))
        return True

    def _catch_up(self, session: pytest.Session, item: pytest.Item) -> str | None:
        """Tear down what earlier tests set up and this one does not share (the controller's
        hint of the next test is only a guess under xdist: another worker may have run it).
        A failure there is this test's setup error, naming what was torn down: no test of
        this pool is left to carry it, and a fixture checking device health at teardown
        must not be lost. None when all went well."""
        state = compat.setup_state(session)
        chain = item.listchain()
        leaving = [node for node in state.stack if node not in chain]
        if not leaving:
            return None
        try:
            state.teardown_exact(item)
        except BaseException as exc:  # noqa: B036 - reported as this test's error; the rank is replaced
            where = ", ".join(node.nodeid or "the session" for node in reversed(leaving))
            return (
                f"rank {self.spec.rank}: tearing down the fixtures of earlier tests ({where}) raised "
                f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            )
        return None

    def _teardown_all(self, session: pytest.Session) -> None:
        """The session's last teardown, when the pool leaves. A failure is printed to the
        rank's log and ends the rank with TEARDOWN_FAILED, which the controller reports."""
        try:
            compat.setup_state(session).teardown_exact(None)
        except BaseException:  # noqa: B036 - reported through the exit code and the log
            traceback.print_exc()
            self.teardown_failed = True

    # -- where the rank is -------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item) -> None:
        self.phase.set("setup")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self, item) -> None:
        self.phase.set("call")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_teardown(self, item) -> None:
        self.phase.set("teardown")

    # -- reports -----------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        current = self.current
        if current is None or self.config is None:
            return
        if report.when == "setup":
            self.boundary.setup_done()
            if self.group is not None:
                self.group.setup_done()
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        current.buffer.append(_sendable(data))
        if not report.passed or hasattr(report, "wasxfail"):
            self._flush()  # peers may now wait forever: let the controller know at once

    def _flush(self) -> None:
        current = self.current
        if current is not None and current.buffer:
            self.conn.send(Reports(current.seq, self.spec.rank, current.buffer))
            current.buffer = []
