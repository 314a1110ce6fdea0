"""Find, in the rank's own pytest session, the item the controller asks for.

The rank collects lazily: at start only the top of the controller's collection (its
arguments, without importing any test module); a test file is imported and expanded the
first time one of its tests is asked for. Importing every module up front would apply
module-level patches (tests/faults plants torch faults that way) of files whose tests run
elsewhere or later.

Directory nodes are collected once and reused, so directory- and package-scoped fixtures
and the setup stack see the same nodes across files. Items are matched by their file and
their names below it, not by node id: node ids of files outside the rootdir depend on the
collection arguments, names do not.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest


class CollectionProblem(Exception):
    """The rank cannot provide the asked-for item; the text says why."""


def names_below_file(item: pytest.Item) -> tuple[str, ...]:
    """('TestX', 'test_y[ws2-cpu]'): the item's chain under its file node."""
    chain = item.listchain()
    files = [i for i, node in enumerate(chain) if isinstance(node, pytest.File)]
    start = files[-1] + 1 if files else 1
    return tuple(node.name for node in chain[start:])


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


class LazyItems:
    def __init__(self, session: pytest.Session) -> None:
        self.session = session
        self.tops: list[pytest.Collector] = []
        self._children: dict[pytest.Collector, list] = {}
        self._items: dict[tuple[str, tuple[str, ...]], pytest.Item] = {}
        self._files: dict[Path, str | None] = {}  # expanded files -> None, or why they failed
        self.bootstrapping = False
        self.last_collect_seconds = 0.0
        self._failed_reports: list = []

    # -- start -------------------------------------------------------------------------------
    def bootstrap(self) -> None:
        """The session's top collectors for the controller's arguments, nothing imported:
        node-id arguments (``file.py::test_x``) are cut to their file, or collecting them
        would import every module they name at once."""
        args = list(dict.fromkeys(str(arg).split("::")[0] for arg in self.session.config.args))
        self.bootstrapping = True
        try:
            found = self.session.perform_collect(args, genitems=False)
        finally:
            self.bootstrapping = False
        self.tops = [self._as_collector(node) for node in found]

    @staticmethod
    def _as_collector(node) -> pytest.Collector:
        """A node-id argument yields an item or a class: start from its file instead."""
        if isinstance(node, (pytest.Directory, pytest.File)):
            return node
        for parent in reversed(node.listchain()):
            if isinstance(parent, (pytest.File, pytest.Directory)):
                return parent
        return node

    def add(self, items) -> None:
        """Index items (collected, or deselected by -k/-m/--lf in this rank: the controller
        already chose them)."""
        for item in items:
            if isinstance(item, pytest.Item) and item.path is not None:
                self._items[(str(item.path), names_below_file(item))] = item

    # -- lookup ------------------------------------------------------------------------------
    def find(self, path: str, names: tuple[str, ...]) -> pytest.Item:
        self.last_collect_seconds = 0.0
        item = self._items.get((path, names))
        if item is not None:
            return item
        target = Path(path)
        if target in self._files:
            why = self._files[target]
            raise CollectionProblem(why or f"{'::'.join(names)} is not among the tests the rank collected from {path}")
        started = time.perf_counter()
        try:
            self._expand(self._file_node(target))
            self._files[target] = None
        except CollectionProblem as exc:
            self._files[target] = str(exc)
            raise
        finally:
            self.last_collect_seconds = time.perf_counter() - started
        return self.find(path, names)

    def next_item(self, current: pytest.Item, path: str | None, names: tuple[str, ...]):
        """What to hand pytest as ``nextitem``: the next test when this rank has it, else the
        deepest node of the current chain the next test shares (its session, directories),
        so that pytest tears down exactly what the next test will not reuse; None at the
        end of the session."""
        if path is None:
            return None
        known = self._items.get((path, names))
        if known is not None:
            return known
        target = Path(path)
        keep: Any = current.session
        for node in current.listchain()[1:]:
            if isinstance(node, pytest.Directory) and _inside(target, node.path):
                keep = node
            elif isinstance(node, pytest.File) and node.path == target:
                keep = node
            else:
                break
        return keep

    # -- walking -----------------------------------------------------------------------------
    def _file_node(self, target: Path) -> pytest.Collector:
        for top in self.tops:
            found = self._descend(top, target)
            if found is not None:
                return found
        # Not below the controller's arguments (a plugin added it): collect it on its own.
        extra = [self._as_collector(n) for n in self.session.perform_collect([str(target)], genitems=False)]
        self.tops.extend(extra)
        for top in extra:
            found = self._descend(top, target)
            if found is not None:
                return found
        raise CollectionProblem(f"no collector for {target} in the rank")

    def _descend(self, node, target: Path):
        while True:
            if isinstance(node, pytest.File):
                return node if node.path == target else None
            if not isinstance(node, pytest.Directory) or not _inside(target, node.path):
                return None
            below = [c for c in self._collect(node) if isinstance(c, (pytest.Directory, pytest.File))]
            node = next(
                (c for c in below if (c.path == target if isinstance(c, pytest.File) else _inside(target, c.path))),
                None,
            )
            if node is None:
                return None

    def _collect(self, collector: pytest.Collector) -> list:
        if collector in self._children:
            return self._children[collector]
        report = collector.ihook.pytest_make_collect_report(collector=collector)
        collector.ihook.pytest_collectreport(report=report)
        if not report.passed:
            raise CollectionProblem(f"collecting {collector.nodeid or collector.path} failed:\n{report.longreprtext}")
        self._children[collector] = list(report.result)
        return self._children[collector]

    def _expand(self, file_node: pytest.Collector) -> None:
        self._failed_reports.clear()
        items = list(self.session.genitems(file_node))
        failures = [report.longreprtext for report in self._failed_reports]
        self._failed_reports.clear()
        self.session.config.hook.pytest_collection_modifyitems(
            session=self.session, config=self.session.config, items=items
        )
        self.add(items)
        if failures and not items:
            raise CollectionProblem(f"collecting {file_node.path} failed in the rank:\n" + "\n".join(failures))

    def collect_failed(self, report) -> None:
        """pytest_collectreport of the rank: failed reports explain a missing item."""
        if not report.passed:
            self._failed_reports.append(report)
