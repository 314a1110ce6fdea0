"""A failed test case that no test function stands for: a problem found between or after
the tests (GPU counters that moved, ranks that failed their last fixture teardown) must
still fail the run, reach JUnit and the terminal, and set the exit status. Reported the
way xdist reports a crashed item: through the ordinary report hooks."""

from __future__ import annotations

from typing import Literal

import pytest


def report_extra_case(config: pytest.Config, nodeid: str, failure: str) -> None:
    """Report ``nodeid`` as a test whose call failed with the text ``failure``."""
    location = (nodeid.split("::")[0], None, nodeid.split("::")[-1])
    config.hook.pytest_runtest_logstart(nodeid=nodeid, location=location)
    phases: tuple[tuple[Literal["setup", "call", "teardown"], Literal["passed", "failed"], str | None], ...] = (
        ("setup", "passed", None),
        ("call", "failed", failure),
        ("teardown", "passed", None),
    )
    for when, outcome, longrepr in phases:
        report = pytest.TestReport(nodeid, location, {}, outcome, longrepr, when)
        config.hook.pytest_runtest_logreport(report=report)
    config.hook.pytest_runtest_logfinish(nodeid=nodeid, location=location)
