"""How state a test left behind in its ranks is told, per node and in cluster mode alike:
a JUnit property on the test (``gpuconform_isolation``), a warning in pytest's warnings
summary pointing at the test's own line, and under ``--gpuconform-strict-isolation`` a
failure of its teardown."""

from __future__ import annotations

import warnings

import pytest

ISOLATION_PROPERTY = "gpuconform_isolation"


class RankIsolationWarning(pytest.PytestWarning):
    """A multi-rank test left state behind in its ranks (see --gpuconform-strict-isolation)."""


def announce(item: pytest.Item, findings: list[str]) -> None:
    """Warn, at the test's line; called inside the test's teardown so pytest files the
    warning under the test."""
    if not findings:
        return
    warning = RankIsolationWarning(f"left state behind in its ranks: {'; '.join(findings)}")
    warnings.warn_explicit(warning, RankIsolationWarning, str(item.path), (item.location[1] or 0) + 1)


def strict_headline(findings: list[str]) -> str:
    return f"left state behind in its ranks (--gpuconform-strict-isolation): {findings[0]}"
