"""Every use of a private pytest API, in one place, each with why it is needed.

pytest offers no public way to do these; if a pytest release changes one, this is the
only module to mend. Everything else in the plugin uses public names (``pytest.TestReport``,
``pytest.fail.Exception``, ``pytest.skip.Exception``, ``pytest.StashKey``).
"""

from __future__ import annotations

import ast
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


def rewrite_asserts(tree: ast.Module, source: bytes) -> None:
    """Apply pytest's assertion rewriting to a parsed module, in place.

    Why: rank processes import test modules themselves; without rewriting a failing
    ``assert a == b`` there says only "AssertionError".
    """
    from _pytest.assertion.rewrite import rewrite_asserts as rewrite

    rewrite(tree, source, module_path=None, config=None)


def fixture_argnames(item: pytest.Function) -> tuple[str, ...]:
    """The fixtures a test function requests directly (its signature, usefixtures aside).

    Why: the engine decides per fixture whether the controller or the rank provides it.
    """
    return tuple(item._fixtureinfo.argnames)


def fixture_definitions(item: pytest.Function, name: str) -> tuple[Any, ...]:
    """The FixtureDefs visible to ``item`` under ``name`` (overrides and what they override).

    Why: a controller-side fixture that depends on a rank-side one cannot be sent to ranks;
    the engine walks the dependency graph to say so by name.
    """
    return tuple(item._fixtureinfo.name2fixturedefs.get(name, ()))


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


def skip_at_item_location(reason: str) -> BaseException:
    """A skip exception reported at the test's own location, not at the raising frame.

    Why: a skip decided by the ranks is raised by the engine; without this the report
    would point into the plugin (pytest's own ``skip`` marker sets the same flag).
    """
    skip = pytest.skip.Exception(reason)
    skip._use_item_location = True
    return skip
