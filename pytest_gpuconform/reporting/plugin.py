"""What an enabled run adds to pytest's own reporting: the header, suite properties, the
finished JUnit file, the verdict and summary, and the operators' outputs.

* The header and the suite properties carry the node inventory (``gpuconform.*``) and the
  acceptance spec, so a report says what ran where and against what.
* After the run, pytest's JUnit file gets ``hostname`` = the host the report names
  (``GPUCONFORM_HOST``) and stable classnames for the shipped suite (stable_ids.py); a node
  id pasted after ``pytest --gpuconform`` reruns that test from any directory.
* The terminal gets the verdict line and the summary table (summary.py); strict-acceptance
  failures that share one cause are listed once in pytest's own failure sections, with
  their count in the summary (the counts on pytest's last line are untouched).
* ``--gpuconform-json`` / ``--gpuconform-prometheus`` files (node_json.py, prometheus.py).
* A test still running when a stopped run ends (an xdist worker's test at SIGTERM) gets
  an error instead of a nameless, passing JUnit case (in_flight.py).

Everything is written by the process that writes the JUnit file: the xdist controller,
or each rank in cluster mode (``{host}`` / ``{rank}`` in the paths are filled in).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from ..acceptance.verdict import SPEC_GPU_COUNT, SPEC_NAME, Verdict, node_verdict
from ..cluster.world import CLUSTER_KEY, MERGED_JUNIT_KEY, template_path
from ..collection.suite import suite_dir
from ..node.inventory import Inventory
from ..settings import Settings
from ..xdist_glue import XdistRole
from . import junit, node_json, prometheus, stable_ids
from .causes import cause_of, unwrap
from .in_flight import InFlightTests
from .outcomes import CaseOutcome, first_line, outcomes_from_reports
from .summary import row_key

STRICT_PREFIX = "strict acceptance ("


class ReportingPlugin:
    PLUGIN_NAME = "gpuconform-reporting"

    def __init__(self, config: pytest.Config, settings: Settings, inventory: Inventory) -> None:
        self.config = config
        self.settings = settings
        self.inventory = inventory
        self.reports: list = []  # every TestReport and failed CollectReport this process saw
        self.classnames: dict[str, str] = {}  # pytest's JUnit classname -> stable one
        self.test_ids: dict[str, str] = {}  # nodeid -> stable test id
        self.started = time.time()
        self._suite_dir = suite_dir()
        self._collapsed: dict[str, list] | None = None
        self._selection: stable_ids.SuiteSelection | None = None
        self._collected: dict[str, Path] = {}  # nodeid -> the module file it was collected from

    @property
    def writes_reports(self) -> bool:
        return not XdistRole.is_worker(self.config)

    # -- facts ----------------------------------------------------------------------------
    def facts(self) -> dict[str, str]:
        """The node's facts as flat properties (what the JUnit suite properties say)."""
        return dict(self.inventory.properties() + self.spec_properties())

    def spec_properties(self) -> list[tuple[str, str]]:
        spec = self.settings.spec
        if spec is None:
            return []
        props = [(SPEC_NAME, spec.name), ("spec_file", spec.path)]
        count = spec.gpu_count
        if count is not None:
            props.append((SPEC_GPU_COUNT, count.text() if count.high != 0 else "0"))
        return props

    def outcomes(self) -> list[CaseOutcome]:
        return outcomes_from_reports(self.reports)

    def verdict(self, tests: list[CaseOutcome]) -> Verdict:
        counts = dict.fromkeys(("passed", "failed", "error", "skipped"), 0)
        for test in tests:
            counts[test.outcome] += 1
        counts["gpu_passed"] = sum(t.outcome == "passed" and dict(t.properties).get("device") == "cuda" for t in tests)
        causes = {cause_of(t.message) for t in tests if t.outcome in ("failed", "error")}
        return node_verdict(self.facts(), counts, len(causes))

    # -- header, collection, properties ---------------------------------------------------
    def pytest_configure(self, config: pytest.Config) -> None:
        config.pluginmanager.register(_SummarySection(self), _SummarySection.PLUGIN_NAME)
        if self.writes_reports:  # tests a stopped run left open get a result (in_flight.py)
            config.pluginmanager.register(InFlightTests(), InFlightTests.PLUGIN_NAME)

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        lines = self.inventory.header_lines()
        if self.settings.expect_gpus:
            lines.append(f"gpuconform: strict acceptance: expecting >= {self.settings.expect_gpus} GPU(s)")
        spec = self.settings.spec
        if spec is not None:
            keys = ", ".join(r.key for r in spec.requirements)
            lines.append(f"gpuconform: acceptance spec {spec.name} ({spec.path}): {keys}")
        return lines

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session) -> None:
        config = session.config
        if config.args_source == pytest.Config.ArgsSource.ARGS:
            self._selection = stable_ids.resolve_pasted_args(
                list(config.args), config.invocation_params.dir, self._suite_dir
            )
            config.args[:] = self._selection.args

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._collected = {item.nodeid: item.path for item in session.items}

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        selection = self._selection
        if selection is None or not selection.wanted:
            return
        kept: list[pytest.Item] = []
        dropped: list[pytest.Item] = []
        for item in items:
            module = stable_ids.suite_module(item.path, self._suite_dir)
            if module is None:
                kept.append(item)
                continue
            relative = module.replace(".", "/") + ".py" + item.nodeid[len(item.nodeid.split("::")[0]) :]
            (kept if selection.keeps(relative) else dropped).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.writes_reports:
            junit.add_suite_properties(self.config, self.inventory.properties() + self.spec_properties())

    # -- results --------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not self.writes_reports:
            return
        self.reports.append(report)
        if report.nodeid not in self.test_ids:
            self._name(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if self.writes_reports and report.failed:
            self.reports.append(report)

    def _test_file(self, nodeid: str) -> Path | None:
        """The module a test was collected from (not where its function is defined: a
        module may re-export shipped tests). Known from the items where this process
        collected them; an xdist controller resolves the node id's path instead, against the
        rootdir, the arguments and the suite directory, as pytest formed it."""
        known = self._collected.get(nodeid)
        if known is not None:
            return known
        part = nodeid.split("::")[0]
        bases = [self.config.rootpath] + [Path(arg.split("::")[0]) for arg in self.config.args] + [self._suite_dir]
        for base in bases:
            candidate = (base / part) if part else base
            if candidate.is_file():
                return candidate
        return None

    def _name(self, report: pytest.TestReport) -> None:
        prefix = getattr(self.config.option, "junitprefix", None)
        nodeid = report.nodeid
        path = self._test_file(nodeid)
        module = None if path is None else stable_ids.suite_module(path, self._suite_dir)
        if module is None:
            self.test_ids[nodeid] = nodeid
            return
        stable = stable_ids.stable_classname(nodeid, module, prefix)
        self.classnames[stable_ids.pytest_classname(nodeid, prefix)] = stable
        unprefixed = stable_ids.stable_classname(nodeid, module, None)
        self.test_ids[nodeid] = f"{unprefixed}::{nodeid.split('::')[-1]}"

    # -- end of the run -------------------------------------------------------------------
    def _path(self, template: str) -> str:
        world = self.config.stash.get(CLUSTER_KEY, None)
        return template_path(template, world.host if world else self.inventory.host, world.rank if world else 0)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.writes_reports:
            return
        xmlpath = getattr(self.config.option, "xmlpath", None)
        if xmlpath and os.path.exists(xmlpath):
            junit.finish_pytest_report(xmlpath, self.inventory.host, socket.gethostname(), self.classnames)
        if self.settings.json_path or self.settings.prometheus_path:
            self._write_outputs()

    def _cases(self, tests: list[CaseOutcome]) -> list[tuple[CaseOutcome, str, str]]:
        return [(test, self.test_ids.get(test.nodeid, test.nodeid), row_key(test)[0]) for test in tests]

    def _write_outputs(self) -> None:
        tests = self.outcomes()
        verdict = self.verdict(tests)
        cases = self._cases(tests)
        if self.settings.json_path:
            spec = self.settings.spec
            described = None
            if spec is not None:
                described = {
                    "name": spec.name,
                    "path": spec.path,
                    "requirements": {r.key: r.expected_text() for r in spec.requirements},
                }
            document = node_json.document(
                self.inventory.host,
                self.inventory.properties() + self.spec_properties(),
                verdict,
                [node_json.case(test, test_id, area) for test, test_id, area in cases],
                described,
            )
            junit.write_atomically(node_json.dumps(document), self._path(self.settings.json_path))
        if self.settings.prometheus_path:
            from ..health.watch import WATCH_KEY

            watch = self.config.stash.get(WATCH_KEY, None)
            health = (watch.start or []) if watch is not None else []
            text = prometheus.textfile(self.facts(), verdict, cases, health, time.time() - self.started)
            junit.write_atomically(text, self._path(self.settings.prometheus_path))

    # -- terminal -------------------------------------------------------------------------
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_terminal_summary(self, terminalreporter):
        """Around pytest's own summary sections: strict failures of one cause appear once
        there (see collapse_strict); the stats are put back before pytest counts them."""
        stats = terminalreporter.stats
        saved = {key: stats.get(key) for key in ("failed", "error")}
        self._collapsed = {}
        seen: set[str] = set()  # one cause is shown once, among failures and errors together
        for key in saved:
            if stats.get(key):
                stats[key], self._collapsed[key] = collapse_strict(stats[key], seen)
        try:
            return (yield)
        finally:
            for key, value in saved.items():
                if value is not None:
                    stats[key] = value

    def _summary(self, terminalreporter) -> list[str]:
        from .summary import summary_lines

        reports = [report for category in terminalreporter.stats.values() for report in category]
        for hidden in (self._collapsed or {}).values():
            reports += hidden
        tests = outcomes_from_reports(reports)
        junit_path = getattr(self.config.option, "xmlpath", None)
        merged = self.config.stash.get(MERGED_JUNIT_KEY, None)
        return summary_lines(tests, junit_path, merged, self.verdict(tests).text())

    def write_summary(self, terminalreporter) -> None:
        terminalreporter.section("gpuconform summary")
        for line in self._summary(terminalreporter):
            terminalreporter.write_line(line)
        hidden = sum(len(reports) for reports in (self._collapsed or {}).values())
        if hidden:
            terminalreporter.write_line(
                f"({hidden} strict-acceptance result(s) of a cause listed above are left out of pytest's "
                "failure lists; JUnit has each)"
            )


class _SummarySection:
    """Prints the gpuconform section: a plain (non-wrapper) terminal_summary hook, so it
    runs inside the collapse wrapper of ReportingPlugin."""

    PLUGIN_NAME = "gpuconform-summary"

    def __init__(self, owner: ReportingPlugin) -> None:
        self.owner = owner

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.owner.config.option.collectonly or not self.owner.writes_reports:
            return  # --co: nothing ran, nothing to summarise; an xdist worker's view is partial
        self.owner.write_summary(terminalreporter)


def collapse_strict(reports: list, seen: set[str]) -> tuple[list, list]:
    """(reports to show, reports left out): of the strict-acceptance failures sharing one
    cause (``seen``: causes already shown), only the first is shown."""
    shown, hidden = [], []
    for report in reports:
        message = unwrap(first_line(report))
        if message.startswith(STRICT_PREFIX):
            cause = cause_of(message)
            if cause in seen:
                hidden.append(report)
                continue
            seen.add(cause)
        shown.append(report)
    return shown, hidden
