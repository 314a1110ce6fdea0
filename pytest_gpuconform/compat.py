"""Every use of a private pytest API, in one place, each with why it is needed.

pytest offers no public way to do these; if a pytest release changes one, this is the
only module to mend. Everything else in the plugin uses public names (``pytest.TestReport``,
``pytest.fail.Exception``, ``pytest.skip.Exception``, ``pytest.StashKey``).
"""

from __future__ import annotations

from typing import Any

import pytest


def junit_xml(config: pytest.Config) -> Any | None:
    """pytest's LogXML object of this run, or None without ``--junitxml``.

    Why: suite-level properties must be added by the process that writes the XML (the
    xdist controller), where ``record_testsuite_property`` cannot run (pytest#7767).
    ``_pytest.junitxml.xml_key`` has been stable since pytest 7.
    """
    from _pytest.junitxml import xml_key

    return config.stash.get(xml_key, None)


def unresolved_fixtures(item: pytest.Item) -> set[str]:
    """Names a test requests (directly or through other fixtures) that no plugin or
    conftest defines: pytest will fail its setup with "fixture '...' not found".

    Why: when pytest-gpuconform is installed but not enabled, a test that uses its fixtures
    gets that bare error; the plugin adds how to enable it.
    """
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {name for name in info.names_closure if name not in info.name2fixturedefs and name != "request"}


def setup_state(session: pytest.Session) -> Any:
    """The session's stack of set-up nodes (``SetupState``: ``stack``, ``teardown_exact``).

    Why: a rank runs items one at a time as the controller sends them, so before each test
    it tears down what an earlier test set up and this one does not share, and at the end
    of the pool everything (pytest's own loop does this through ``nextitem``).
    """
    return session._setupstate


def basetemp(config: pytest.Config) -> Any:
    """The run's base temporary directory (what ``tmp_path_factory.getbasetemp()`` gives).

    Why: each rank's own ``tmp_path`` base is made below the controller's, so a run's
    temporary files stay in one place and pytest's retention of old runs covers them.
    """
    return config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]


def text_longrepr(path: str, lineno: int, headline: str, lines: list[str]) -> Any:
    """A failure representation built from text, with ``headline`` as its crash message.

    Why: a failure the engine itself states (a rank crashed, hung, or ranks disagree) must
    look like any other to JUnit (message attribute = headline), to the terminal's short
    summary, and to xdist, which serialises only pytest's own representation classes.
    """
    from _pytest._code.code import ReprExceptionInfo, ReprFileLocation, ReprTracebackNative

    text = [line if line.endswith("\n") else line + "\n" for line in lines]
    return ReprExceptionInfo(ReprTracebackNative(text), ReprFileLocation(path, lineno, headline))
