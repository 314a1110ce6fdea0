"""Tests still running when the session ended get a result of their own.

Under pytest-xdist the controller learns of a test through its workers' reports. When the
run is stopped (SIGTERM from Slurm's time limit or a cancelled CI job, Ctrl-C), the
controller leaves its loop at once: a test whose setup report arrived but whose teardown
report never did is left half open in pytest's JUnit writer, which then writes it as
``<testcase time="0.000"/>``, with no name (the name is filled in by the call or teardown
report) and no result, so it is schema-invalid and counts as passed.

Here every test whose setup was reported is remembered until its teardown is; at the end
of the session (before the JUnit file is written) each one still open gets the missing
teardown report through the ordinary hook, so the JUnit writer, the terminal, the summary
and the JSON all see it: an error "interrupted by SIGTERM after N s on worker gwK, before
its result arrived" where nothing said how it ended (sent as a failed setup, see
``_report``), and a plain teardown that closes the case. Without xdist the engine reports the interrupted test itself
(engine/interrupts.py); then nothing is open at the end and nothing is added.
"""

from __future__ import annotations

import time

import pytest

OpenKey = tuple[str, object]  # (nodeid, the xdist worker's node): pytest's JUnit writer keys its cases so


class InFlightTests:
    """Registered in the process that writes the reports (reporting/plugin.py)."""

    PLUGIN_NAME = "gpuconform-in-flight"

    def __init__(self) -> None:
        self.open: dict[OpenKey, pytest.TestReport] = {}  # the setup report of each open test
        self.result_known: set[OpenKey] = set()  # open tests whose failure was already reported
        self.reason = ""  # what stopped the session: "interrupted by SIGTERM"

    @staticmethod
    def _key(report: pytest.TestReport) -> OpenKey:
        return report.nodeid, getattr(report, "node", None)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        key = self._key(report)
        if report.when == "setup":
            self.open[key] = report
            self.result_known.discard(key)
            if report.failed:  # a setup error is the test's result
                self.result_known.add(key)
        elif report.when == "teardown":
            self.open.pop(key, None)
            self.result_known.discard(key)
        elif report.failed:  # a failed call, or xdist's report for a worker that crashed ("???")
            self.result_known.add(key)

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo) -> None:
        self.reason = str(excinfo.value) or excinfo.typename

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Before pytest's JUnit writer (a plain hook) writes the file."""
        now = time.time()
        hook = session.config.hook
        for key, setup in list(self.open.items()):
            if key not in self.result_known:  # nothing said how it ended
                hook.pytest_runtest_logreport(report=self._report(setup, "setup", self._interruption(setup, now), now))
            hook.pytest_runtest_logreport(report=self._report(setup, "teardown", None, now))

    def _interruption(self, setup: pytest.TestReport, now: float) -> str:
        started = float(getattr(setup, "start", 0.0) or 0.0)
        ran = f" after {now - started:.1f} s" if started else ""
        worker_id = getattr(getattr(getattr(setup, "node", None), "gateway", None), "id", None)
        where = f" on worker {worker_id}" if worker_id else ""
        why = self.reason or "the session ended"
        return f"{why}{ran}{where}, before its result arrived (its setup had passed; the test did not finish)"

    @staticmethod
    def _report(setup: pytest.TestReport, when: str, error: str | None, now: float) -> pytest.TestReport:
        """A failed ``setup`` report is an error that pytest's JUnit writer counts once; a
        failed ``teardown`` after no call would be taken for a passed call's teardown
        error and the suite's ``tests`` come out one short."""
        started = float(getattr(setup, "start", 0.0) or 0.0) or now
        report = pytest.TestReport(
            setup.nodeid,
            setup.location,
            setup.keywords,
            "failed" if error is not None else "passed",
            error,
            when,  # type: ignore[arg-type]
            duration=(now - started) if error is not None else 0.0,  # the case's time: how long it had run
            start=started,
            stop=now,
            user_properties=list(setup.user_properties),
        )
        worker = getattr(setup, "node", None)
        if worker is not None:
            report.node = worker  # type: ignore[attr-defined]  # xdist's: the JUnit writer's key
        for name in ("worker_id", "item_index", "testrun_uid"):
            if hasattr(setup, name):
                setattr(report, name, getattr(setup, name))
        return report
