"""What an enabled run adds to pytest's own reporting: the header, suite properties, a
schema-safe JUnit file and the gpuconform summary table.

The header and the suite properties carry the node inventory (``gpuconform.*``), so a
report says what ran where; ``make_schema_safe`` rewrites pytest's ``<error>`` elements
(junit.py says why); the summary is summary.py's table.
"""

from __future__ import annotations

import os

import pytest

from ..cluster.world import MERGED_JUNIT_KEY
from ..node.inventory import Inventory
from ..settings import Settings
from ..xdist_glue import XdistRole
from . import junit


class ReportingPlugin:
    PLUGIN_NAME = "gpuconform-reporting"

    def __init__(self, config: pytest.Config, settings: Settings, inventory: Inventory) -> None:
        self.config = config
        self.settings = settings
        self.inventory = inventory

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        lines = self.inventory.header_lines()
        if self.settings.expect_gpus:
            lines.append(f"gpuconform: strict acceptance: expecting >= {self.settings.expect_gpus} GPU(s)")
        return lines

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if not XdistRole.is_worker(self.config):
            junit.add_suite_properties(self.config, self.inventory.properties())

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        xmlpath = getattr(self.config.option, "xmlpath", None)
        if xmlpath and not XdistRole.is_worker(self.config) and os.path.exists(xmlpath):
            junit.make_schema_safe(xmlpath)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        from .summary import summary_lines_from_stats

        terminalreporter.section("gpuconform summary")
        junit_path = getattr(self.config.option, "xmlpath", None)
        merged = self.config.stash.get(MERGED_JUNIT_KEY, None)
        for line in summary_lines_from_stats(terminalreporter.stats, junit_path, merged):
            terminalreporter.write_line(line)
