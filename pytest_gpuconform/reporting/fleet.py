"""The results of a fleet, held compactly: what ``gpuconform report`` (and ``verdict``) read.

A thousand nodes of ~400 checks are 400,000 results; as objects they would need gigabytes,
so the model keeps one byte per (node, check) for the outcome, one int for the index of its
(interned) reason, and the measured numbers that matter (measures.py's key numbers and
throughputs) as one float array per (check, measure), indexed by node. Suites are read one
at a time (suites.py), so raw per-node files and merged files of any size both work.

Columns are hosts: the per-rank suites of a cluster run fold into their host, each cell
showing the worst outcome of that host's ranks (and which rank), the measured numbers of the
lowest rank (the one whose records the plugin reports).
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from . import junit
from .measures import Measure, shown_measures
from .suites import NodeSuite, iter_suites

INVENTORY_PREFIX = "gpuconform."
_SUITE_PREFIXES = ("pytest_gpuconform.conformance.", "conformance.")
MAX_REASON = 300
# Outcome codes of a cell; the order of _SEVERITY decides which rank's result a host shows.
ABSENT, PASSED, SKIPPED, FAILED, ERROR = 0, 1, 2, 3, 4
CODE = {"passed": PASSED, "skipped": SKIPPED, "failed": FAILED, "error": ERROR}
OUTCOME = {ABSENT: "absent", PASSED: "passed", SKIPPED: "skipped", FAILED: "failed", ERROR: "error"}
_SEVERITY = {ABSENT: -1, SKIPPED: 0, PASSED: 1, FAILED: 2, ERROR: 3}
NO_RANK = -1


def natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


@dataclass
class Check:
    index: int
    key: tuple[str, str]  # (classname without the node label, test name)
    area: str
    display: str
    dtype: str


@dataclass
class Series:
    """One measured number of one check across the fleet (NaN where a node has none)."""

    check: int
    name: str
    kind: str | None  # "upper" | "lower" | None, as measures.py reads the bound
    values: array = field(default_factory=lambda: array("d"))
    bounds: array = field(default_factory=lambda: array("d"))
    recorded: bytearray = field(default_factory=bytearray)

    def put(self, node: int, measure: Measure) -> None:
        missing = node + 1 - len(self.values)
        if missing > 0:
            self.values.extend([math.nan] * missing)
            self.bounds.extend([math.nan] * missing)
            self.recorded.extend(bytes(missing))
        self.recorded[node] = 1
        self.values[node] = measure.value
        self.bounds[node] = math.nan if measure.bound is None else measure.bound
        if measure.kind:
            self.kind = measure.kind

    def present(self) -> Iterator[tuple[int, float, float]]:
        """(node index, value, bound or NaN) of every node that recorded it."""
        for node, (value, bound, recorded) in enumerate(zip(self.values, self.bounds, self.recorded, strict=True)):
            if recorded:
                yield node, value, bound

    def measure(self, node: int) -> Measure | None:
        if node >= len(self.recorded) or not self.recorded[node]:
            return None
        bound = self.bounds[node]
        return Measure(self.name, self.values[node], None if math.isnan(bound) else bound, self.kind)


@dataclass
class FleetNode:
    index: int
    label: str  # the host
    inventory: dict[str, str] = field(default_factory=dict)
    ranks: set[str] = field(default_factory=set)
    sources: list[str] = field(default_factory=list)
    outcomes: bytearray = field(default_factory=bytearray)  # per check index
    reasons: array = field(default_factory=lambda: array("i"))  # reason id per check, -1 none
    reason_ranks: array = field(default_factory=lambda: array("i"))  # rank of the shown result
    measure_ranks: dict[int, int] = field(default_factory=dict)

    def outcome(self, check: int) -> int:
        return self.outcomes[check] if check < len(self.outcomes) else ABSENT

    def grow(self, checks: int) -> None:
        missing = checks - len(self.outcomes)
        if missing > 0:
            self.outcomes.extend(bytes(missing))
            self.reasons.extend([-1] * missing)
            self.reason_ranks.extend([NO_RANK] * missing)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("passed", "failed", "error", "skipped"), 0)
        for code in (PASSED, SKIPPED, FAILED, ERROR):
            counts[OUTCOME[code]] = self.outcomes.count(code)
        return counts

    def rank_text(self) -> str:
        if not self.ranks:
            return "—"
        ranks = sorted(self.ranks, key=natural_key)
        return f"{len(ranks)}: r{ranks[0]}" + (f"–r{ranks[-1]}" if len(ranks) > 1 else "")

    def gpu_names(self) -> list[str]:
        items = sorted(self.inventory.items(), key=lambda item: natural_key(item[0]))
        return [value for key, value in items if re.fullmatch(r"gpu\d+_name", key)]

    def gpus(self) -> str:
        names = self.gpu_names()
        if not names:
            return "none" if self.inventory.get("gpu_count", "0") == "0" else "unknown"
        groups: dict[str, int] = {}
        for name in names:
            groups[name] = groups.get(name, 0) + 1
        return ", ".join(f"{count} × {name}" for name, count in groups.items())

    def fact(self, name: str) -> str:
        value = self.inventory.get(name)
        return value if value and value != "none" else "—"


def one_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= MAX_REASON else line[: MAX_REASON - 1] + "…"
    return ""


def display_name(classname: str, name: str) -> str:
    for prefix in _SUITE_PREFIXES:
        classname = classname.removeprefix(prefix)
    parts = classname.split(".")
    module_at = max((i for i, part in enumerate(parts) if part.startswith("test_")), default=len(parts) - 1)
    return "::".join(parts[module_at + 1 :] + [name])


def area_of(classname: str, properties: dict[str, str]) -> str:
    if properties.get("feature"):
        return properties["feature"]
    module = classname.split(".")
    modules = [part for part in module if part.startswith("test_")]
    return (modules[-1] if modules else module[-1]).removeprefix("test_") or "tests"


class Fleet:
    """The model (see module docstring); fill it with ``add_suite`` or ``read``."""

    def __init__(self) -> None:
        self.inputs: list[str] = []
        self.nodes: list[FleetNode] = []
        self.by_host: dict[str, FleetNode] = {}
        self.checks: list[Check] = []
        self.by_key: dict[tuple[str, str], Check] = {}
        self.reasons: list[str] = []
        self._reason_ids: dict[str, int] = {}
        self.series: dict[tuple[int, str], Series] = {}
        self.series_of_check: dict[int, list[Series]] = {}

    @classmethod
    def read(cls, paths: Iterable[str]) -> Fleet:
        fleet = cls()
        for path in paths:
            fleet.inputs.append(path)
            for suite in iter_suites(path):
                fleet.add_suite(suite)
        return fleet

    def reason_id(self, text: str) -> int:
        found = self._reason_ids.get(text)
        if found is None:
            found = self._reason_ids[text] = len(self.reasons)
            self.reasons.append(text)
        return found

    def _node(self, suite: NodeSuite) -> tuple[FleetNode, int]:
        inventory = {
            name.removeprefix(INVENTORY_PREFIX): value
            for name, value in suite.properties
            if name.startswith(INVENTORY_PREFIX)
        }
        host = inventory.get("host") or suite.label
        node = self.by_host.get(host)
        if node is None:
            node = self.by_host[host] = FleetNode(len(self.nodes), host)
            self.nodes.append(node)
        for name, value in inventory.items():
            node.inventory.setdefault(name, value)
        rank = inventory.get("rank") if inventory.get("rank") is not None else suite.rank
        if rank is not None:
            node.ranks.add(rank)
        source = inventory.get("source") or suite.path
        if source not in node.sources:
            node.sources.append(source)
        return node, int(rank) if rank is not None and rank.isdigit() else NO_RANK

    def _check(self, classname: str, name: str, properties: dict[str, str]) -> Check:
        key = (classname, name)
        check = self.by_key.get(key)
        if check is None:
            check = Check(
                len(self.checks),
                key,
                area_of(classname, properties),
                display_name(classname, name),
                properties.get("dtype", "no dtype"),
            )
            self.checks.append(check)
            self.by_key[key] = check
        return check

    def add_suite(self, suite: NodeSuite) -> None:
        node, rank = self._node(suite)
        label = suite.label
        for case in suite.element.iterfind("testcase"):
            classname = (case.get("classname") or "").removeprefix(label + ".")
            if classname == label:
                classname = ""
            properties = [(p.get("name", ""), p.get("value", "")) for p in case.iterfind("properties/property")]
            check = self._check(classname, case.get("name", ""), dict(properties))
            node.grow(len(self.checks))
            outcome, element = junit.case_outcome(case)
            code = CODE[outcome]
            self._put_outcome(node, check.index, code, rank, element)
            self._put_measures(node, check.index, rank, properties)

    def _put_outcome(self, node: FleetNode, check: int, code: int, rank: int, element) -> None:
        had = node.outcomes[check]
        had_rank = node.reason_ranks[check]
        worse = _SEVERITY[code] > _SEVERITY[had]
        tie_lower_rank = code == had and rank != NO_RANK and (had_rank == NO_RANK or rank < had_rank)
        if had != ABSENT and not (worse or tie_lower_rank):
            return
        node.outcomes[check] = code
        node.reason_ranks[check] = rank
        reason = "" if element is None else one_line(element.get("message")) or one_line(element.text)
        node.reasons[check] = self.reason_id(reason) if reason else -1

    def _put_measures(self, node: FleetNode, check: int, rank: int, properties) -> None:
        kept = node.measure_ranks.get(check)
        if kept is not None and (rank == NO_RANK or rank >= kept):
            return
        node.measure_ranks[check] = rank
        for measure in shown_measures(properties):
            series = self.series.get((check, measure.name))
            if series is None:
                series = self.series[(check, measure.name)] = Series(check, measure.name, measure.kind)
                self.series_of_check.setdefault(check, []).append(series)
            series.put(node.index, measure)

    # -- reading the model ----------------------------------------------------------------
    def sorted_nodes(self) -> list[FleetNode]:
        return sorted(self.nodes, key=lambda n: natural_key(n.label))

    def reason(self, node: FleetNode, check: int) -> str:
        """The cell's one-line reason; with several ranks, which rank's result it is."""
        reason_id = node.reasons[check] if check < len(node.reasons) else -1
        text = self.reasons[reason_id] if reason_id >= 0 else ""
        rank = node.reason_ranks[check] if check < len(node.reason_ranks) else NO_RANK
        if text and len(node.ranks) > 1 and rank != NO_RANK:
            return f"rank {rank}: {text}"
        return text

    def totals(self) -> dict[str, int]:
        totals = dict.fromkeys(("passed", "failed", "error", "skipped"), 0)
        for node in self.nodes:
            for name, count in node.counts().items():
                totals[name] += count
        return totals

    def node_measures(self, node: FleetNode, check: int) -> list[Measure]:
        """The key measures of one cell (for the small-fleet charts)."""
        found = (series.measure(node.index) for series in self.series_of_check.get(check, ()))
        return [measure for measure in found if measure is not None and measure.is_key]
