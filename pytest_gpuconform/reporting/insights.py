"""What an operator reads off a fleet before anything else, computed from the model.

* ``node_verdicts``: each node's verdict (acceptance/verdict.py) and the fleet's counts of
  nodes passed / failed / not verified.
* ``failures_by_cause`` / ``failures_by_check``: every failed or errored result grouped by
  its root cause (causes.py) and by check, with the hosts that share it.
* ``inventory_outliers``: every inventory field where some nodes differ from the majority
  (GPU model, count, memory, driver, CUDA, NCCL, torch, ... and whatever suite properties
  the node reports), per value with its hosts. Per-GPU fields fold into one per node
  ("8 × 80.0"), so a node with one smaller board stands out. Identifiers (UUIDs, bus ids,
  the host itself) are not compared.
* ``distributions``: each measured number across the fleet (GPU-indexed names such as
  ``gpu3_bf16_tflops`` pooled per check as ``gpu*_bf16_tflops``), with its bound, its
  spread and the nodes at the bad end, so a slow node stands out.
* ``check_rows``: every check's fleet-wide counts and majority outcome, which with each
  node's exceptions (``node_exceptions``) describes every result without a 400 x 1,000 table.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field

from ..acceptance.verdict import Verdict, node_verdict
from .causes import cause_of
from .fleet import ABSENT, ERROR, FAILED, OUTCOME, PASSED, SKIPPED, Fleet, FleetNode, natural_key

# Suite properties that name or locate rather than describe a node: never outliers.
IDENTITY_FIELDS = frozenset({"host", "rank", "source", "machine_hostname", "nvml_message", "spec_file"})
_PER_GPU = re.compile(r"^gpu(\d+)_(.+)$")
PER_GPU_IDENTITY = frozenset({"uuid", "pci_bus_id"})
SLOW_FRACTION = 0.1  # a throughput this far below the fleet median is named


@dataclass
class NodeResult:
    node: FleetNode
    verdict: Verdict
    counts: dict[str, int]
    causes: list[str]


def _node_causes(fleet: Fleet, node: FleetNode) -> list[str]:
    causes = []
    for check, code in enumerate(node.outcomes):
        if code in (FAILED, ERROR):
            causes.append(cause_of(fleet.reason(node, check), node.label))
    return causes


def node_verdicts(fleet: Fleet) -> list[NodeResult]:
    results = []
    for node in fleet.sorted_nodes():
        counts = node.counts()
        causes = _node_causes(fleet, node)
        results.append(NodeResult(node, node_verdict(node.inventory, counts, len(set(causes))), counts, causes))
    return results


@dataclass
class FleetVerdict:
    kind: str  # failed | not-verified | passed
    failed: list[NodeResult]
    not_verified: list[NodeResult]
    passed: list[NodeResult]

    @property
    def word(self) -> str:
        return {"failed": "FAIL", "not-verified": "NOT VERIFIED", "passed": "PASS"}[self.kind]

    def headline(self) -> str:
        total = len(self.failed) + len(self.not_verified) + len(self.passed)
        parts = [f"{len(self.passed)} passed", f"{len(self.failed)} failed", f"{len(self.not_verified)} not verified"]
        return f"{total} node(s): " + ", ".join(parts)


def fleet_verdict(results: list[NodeResult]) -> FleetVerdict:
    failed = [r for r in results if r.verdict.kind == "failed"]
    not_verified = [r for r in results if r.verdict.kind != "failed" and not r.verdict.verified]
    passed = [r for r in results if r.verdict.kind != "failed" and r.verdict.verified]
    kind = "failed" if failed else "not-verified" if not_verified or not results else "passed"
    return FleetVerdict(kind, failed, not_verified, passed)


def verified_lines(results: list[NodeResult]) -> list[tuple[int, str, list[str]]]:
    """(how many nodes, what they verified, their hosts): nodes that verified the same
    thing share a line ("960 nodes: 8 × H100 80GB HBM3 verified: 389 checks")."""
    groups: dict[str, list[str]] = {}
    for result in results:
        if result.verdict.kind != "failed":
            groups.setdefault(result.verdict.text(), []).append(result.node.label)
    return sorted(((len(h), text, h) for text, h in groups.items()), key=lambda g: (-g[0], g[1]))


# -- failures ------------------------------------------------------------------------------
@dataclass
class CauseGroup:
    cause: str
    example: str  # one real message of the group
    results: int = 0
    hosts: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    errors: int = 0


def failures_by_cause(fleet: Fleet) -> list[CauseGroup]:
    groups: dict[str, CauseGroup] = {}
    for node in fleet.sorted_nodes():
        for check, code in enumerate(node.outcomes):
            if code not in (FAILED, ERROR):
                continue
            reason = fleet.reason(node, check)
            cause = cause_of(reason, node.label)
            group = groups.get(cause)
            if group is None:
                group = groups[cause] = CauseGroup(cause, reason or "(no message)")
            group.results += 1
            group.errors += code == ERROR
            if not group.hosts or group.hosts[-1] != node.label:
                group.hosts.append(node.label)
            display = fleet.checks[check].display
            if display not in group.checks:
                group.checks.append(display)
    return sorted(groups.values(), key=lambda g: (-len(g.hosts), -g.results, g.cause))


@dataclass
class CheckFailures:
    display: str
    area: str
    hosts: list[str]
    causes: Counter
    examples: dict[str, str] = field(default_factory=dict)  # cause -> one real message of it

    def commonest(self) -> str:
        cause = self.causes.most_common(1)[0][0]
        return self.examples.get(cause, cause)


def failures_by_check(fleet: Fleet) -> list[CheckFailures]:
    found: dict[int, CheckFailures] = {}
    for node in fleet.sorted_nodes():
        for check, code in enumerate(node.outcomes):
            if code in (FAILED, ERROR):
                info = fleet.checks[check]
                entry = found.setdefault(check, CheckFailures(info.display, info.area, [], Counter()))
                entry.hosts.append(node.label)
                reason = fleet.reason(node, check)
                cause = cause_of(reason, node.label)
                entry.causes[cause] += 1
                entry.examples.setdefault(cause, reason or "(no message)")
    return sorted(found.values(), key=lambda c: (-len(c.hosts), c.area, c.display))


# -- inventory -----------------------------------------------------------------------------
def node_fields(node: FleetNode) -> dict[str, str]:
    """The node's comparable facts: suite properties, per-GPU ones folded per node."""
    fields: dict[str, str] = {}
    per_gpu: dict[str, list[str]] = {}
    for name, value in node.inventory.items():
        if name in IDENTITY_FIELDS:
            continue
        match = _PER_GPU.match(name)
        if match:
            if match.group(2) not in PER_GPU_IDENTITY:
                per_gpu.setdefault(f"gpu {match.group(2)}", []).append(value)
            continue
        fields[name] = value
    for name, values in per_gpu.items():
        counts = Counter(values)
        fields[name] = ", ".join(f"{n} × {v}" for v, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    return fields


@dataclass
class Outlier:
    field: str
    majority: str
    majority_count: int
    others: list[tuple[str, list[str]]]  # (value, hosts), most common first


def inventory_outliers(fleet: Fleet) -> tuple[list[Outlier], list[tuple[str, int]]]:
    """(fields where a minority of nodes differs, fields that vary too much to have a
    majority: (name, distinct values))."""
    nodes = fleet.sorted_nodes()
    per_node = [node_fields(node) for node in nodes]
    names = sorted({name for fields in per_node for name in fields}, key=natural_key)
    outliers, varied = [], []
    for name in names:
        by_value: dict[str, list[str]] = {}
        for node, fields in zip(nodes, per_node, strict=True):
            by_value.setdefault(fields.get(name, "(not reported)"), []).append(node.label)
        if len(by_value) < 2:
            continue
        ranked = sorted(by_value.items(), key=lambda item: (-len(item[1]), item[0]))
        majority, hosts = ranked[0]
        if len(hosts) * 2 <= len(nodes) and len(ranked) > 3:
            varied.append((name, len(ranked)))
            continue
        outliers.append(Outlier(name, majority, len(hosts), ranked[1:]))
    return outliers, varied


# -- measured numbers ----------------------------------------------------------------------
@dataclass
class Sample:
    host: str
    where: str  # "" or "GPU 3"
    value: float
    bound: float | None

    @property
    def label(self) -> str:
        return f"{self.host} {self.where}".strip()


@dataclass
class Distribution:
    check: str
    area: str
    name: str  # gpu*_bf16_tflops for pooled GPU series
    kind: str | None  # upper | lower | None
    samples: list[Sample]

    @property
    def values(self) -> list[float]:
        return [s.value for s in self.samples if math.isfinite(s.value)]

    @property
    def bounds(self) -> list[float]:
        return sorted({s.bound for s in self.samples if s.bound is not None and math.isfinite(s.bound)})

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "lower" or (
            self.kind is None and re.search(r"_(tflops|gbps)$", self.name, re.I) is not None
        )

    def past_bound(self) -> list[Sample]:
        bad = []
        for sample in self.samples:
            if sample.bound is None:
                continue
            within = sample.value >= sample.bound if self.kind == "lower" else sample.value <= sample.bound
            if not within:  # NaN is never within
                bad.append(sample)
        return bad

    def worst(self, count: int = 5) -> list[Sample]:
        def badness(sample: Sample) -> float:
            if math.isnan(sample.value):
                return math.inf
            return -sample.value if self.higher_is_better else sample.value

        return sorted(self.samples, key=badness, reverse=True)[:count]

    def slow(self) -> list[Sample]:
        """Throughputs more than SLOW_FRACTION below the fleet median (peer comparison)."""
        values = self.values
        if not self.higher_is_better or len(values) < 3:
            return []
        median = statistics.median(values)
        return [s for s in self.samples if math.isfinite(s.value) and s.value < median * (1 - SLOW_FRACTION)]

    @property
    def varies(self) -> bool:
        values = self.values
        return bool(self.past_bound()) or (len(values) > 1 and max(values) != min(values))

    def stats(self) -> dict[str, float]:
        values = sorted(self.values)
        if not values:
            return {}
        return {"n": len(self.samples), "min": values[0], "median": statistics.median(values), "max": values[-1]}


def distributions(fleet: Fleet) -> list[Distribution]:
    pooled: dict[tuple[int, str], Distribution] = {}
    hosts = [node.label for node in fleet.nodes]
    for (check, name), series in fleet.series.items():
        match = _PER_GPU.match(name)
        pooled_name, where = (f"gpu*_{match.group(2)}", f"GPU {match.group(1)}") if match else (name, "")
        info = fleet.checks[check]
        found = pooled.get((check, pooled_name))
        if found is None:
            found = pooled[(check, pooled_name)] = Distribution(info.display, info.area, pooled_name, series.kind, [])
        for node, value, bound in series.present():
            found.samples.append(Sample(hosts[node], where, value, None if math.isnan(bound) else bound))
    for distribution in pooled.values():
        distribution.samples.sort(key=lambda s: (natural_key(s.host), natural_key(s.where)))
    return list(pooled.values())  # in check order; the page sorts what it shows


# -- checks and each node's exceptions ------------------------------------------------------
@dataclass
class CheckRow:
    index: int
    display: str
    area: str
    counts: dict[str, int]
    majority: int  # outcome code most nodes have
    common_reason: str

    @property
    def majority_name(self) -> str:
        return OUTCOME[self.majority]


def check_rows(fleet: Fleet) -> list[CheckRow]:
    rows = []
    for check in fleet.checks:
        codes: Counter = Counter()
        reasons: Counter = Counter()
        for node in fleet.nodes:
            code = node.outcome(check.index)
            codes[code] += 1
            if code == SKIPPED:
                reasons[fleet.reason(node, check.index)] += 1
        majority = max(codes, key=lambda code: (codes[code], -code))
        common = min(reasons, key=lambda text: (-reasons[text], text)) if reasons else ""
        counts = {OUTCOME[code]: codes.get(code, 0) for code in (PASSED, FAILED, ERROR, SKIPPED, ABSENT)}
        rows.append(CheckRow(check.index, check.display, check.area, counts, majority, common))
    return rows


def node_exceptions(fleet: Fleet, node: FleetNode, rows: list[CheckRow]) -> list[tuple[CheckRow, str, str]]:
    """(check, outcome, reason) of every check whose outcome on ``node`` differs from the
    fleet's majority, failures always (even where most nodes failed too)."""
    found = []
    for row in rows:
        code = node.outcome(row.index)
        if code != row.majority or code in (FAILED, ERROR):
            found.append((row, OUTCOME[code], fleet.reason(node, row.index)))
    return found


def area_counts(fleet: Fleet, node: FleetNode) -> dict[str, dict[str, int]]:
    """Per area: outcome counts of the node (the area x node view)."""
    areas: dict[str, dict[str, int]] = {}
    for check in fleet.checks:
        counts = areas.setdefault(check.area, dict.fromkeys(("passed", "failed", "error", "skipped", "absent"), 0))
        counts[OUTCOME[node.outcome(check.index)]] += 1
    return areas
