"""``gpuconform report``: one self-contained HTML page for one node or a thousand.

What an operator acceptance-testing a fleet needs, in the order they need it:

1. the verdict: nodes passed / failed / not verified, and what was verified, in one line
   per kind of node ("960 × 8 × H100 80GB HBM3 verified: 389 checks");
2. failures grouped by root cause and by check, with the hosts that share each (a
   Slurm hostlist, pasteable into ``scontrol``);
3. inventory outliers: every field where some nodes differ from the majority;
4. measured numbers across nodes as distributions (throughputs with their floors first),
   naming the nodes at the bad end;
5. an area x node view, and a drill-down per node (its verdict, what differs from the
   fleet, each result that is not the fleet's majority for that check);
6. every check's fleet-wide counts (with 5., every result is on the page).

Small fleets (up to ``MATRIX_NODES``) also get the check x node matrix, the full inventory
table and per-node charts; above that a 400 x 1,000 matrix would be 30 MB that nobody reads.

The page has no scripts and loads nothing from the network: a report copied off an
air-gapped cluster still opens. jinja2 with autoescaping writes it, since test names and
failure messages are arbitrary text. Inputs are read one suite at a time (fleet.py).
"""

from __future__ import annotations

import datetime
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import insights, junit
from .causes import cause_of
from .charts import Chart, Point, bound_charts, histogram, ratio_chart
from .fleet import ABSENT, OUTCOME, Fleet, FleetNode
from .hostlist import shortened
from .measures import number
from .suites import check_inputs

MATRIX_NODES = 32
OUTCOME_TEXT = {"passed": "pass", "failed": "FAIL", "error": "ERROR", "skipped": "skip", "absent": "—"}
EXCEPTION_CHECKS_SHOWN = 12
FAILING_CHECKS_SHOWN = 25  # rows of "Failures by check" before the rest fold away
FAILED_NODE_LINES = 5  # failed nodes whose verdict line the summary shows one by one
WORST_SHOWN = 5


@dataclass
class DrillDown:
    result: insights.NodeResult
    facts: str
    differs: list[tuple[str, str, str]]  # (field, this node's value, the majority's)
    groups: list[tuple[str, str, int, list[str]]]  # (outcome, reason, count, checks)
    areas: dict[str, dict[str, int]]


@dataclass
class DistributionView:
    distribution: insights.Distribution
    chart: Chart | None
    stats: dict[str, str]
    worst: list[insights.Sample]
    past: list[insights.Sample]
    slow: list[insights.Sample]


def _facts(node: FleetNode) -> str:
    parts = [f"GPUs {node.gpus()}", f"driver {node.fact('driver')}", f"CUDA {node.fact('driver_cuda')}"]
    parts += [f"torch {node.fact('torch')}", f"NCCL {node.fact('nccl')}"]
    return ", ".join(parts)


def _exception_groups(fleet: Fleet, node: FleetNode, rows) -> list[tuple[str, str, int, list[str]]]:
    grouped: dict[tuple[str, str], list[str]] = {}
    reasons: dict[tuple[str, str], str] = {}
    for row, outcome, reason in insights.node_exceptions(fleet, node, rows):
        key = (outcome, cause_of(reason, node.label) if reason else "")
        grouped.setdefault(key, []).append(row.display)
        reasons.setdefault(key, reason)
    order = {"error": 0, "failed": 1, "skipped": 2, "absent": 3, "passed": 4}
    return sorted(
        ((outcome, reasons[(outcome, cause)], len(checks), checks) for (outcome, cause), checks in grouped.items()),
        key=lambda g: (order[g[0]], -g[2]),
    )


def _drill_downs(fleet: Fleet, results, outliers) -> list[DrillDown]:
    rows = insights.check_rows(fleet)
    majority = {o.field: o.majority for o in outliers}
    views = []
    for result in results:
        node = result.node
        fields = insights.node_fields(node)
        differs = [(name, fields.get(name, "(not reported)"), value) for name, value in majority.items()]
        differs = [d for d in differs if d[1] != d[2]]
        views.append(
            DrillDown(
                result, _facts(node), differs, _exception_groups(fleet, node, rows), insights.area_counts(fleet, node)
            )
        )
    return views


def _distribution_views(fleet: Fleet) -> list[DistributionView]:
    views = []
    for index, distribution in enumerate(insights.distributions(fleet)):
        if not distribution.varies:
            continue
        past = distribution.past_bound()
        chart = histogram(
            f"dist-{index}",
            distribution.values,
            distribution.bounds,
            [s.value for s in past],
            distribution.higher_is_better,
        )
        stats = {
            name: (str(int(value)) if name == "n" else number(value)) for name, value in distribution.stats().items()
        }
        views.append(
            DistributionView(distribution, chart, stats, distribution.worst(WORST_SHOWN), past, distribution.slow())
        )
    views.sort(key=lambda v: (not v.distribution.higher_is_better, not v.past, not v.slow, v.distribution.area))
    return views


def _constant_numbers(fleet: Fleet) -> list[tuple[insights.Distribution, str]]:
    constant = []
    for distribution in insights.distributions(fleet):
        if not distribution.varies and distribution.values:
            bounds = distribution.bounds
            bound = f" (bound {', '.join(number(b) for b in bounds)})" if bounds else ""
            constant.append((distribution, f"{number(distribution.values[0])}{bound}"))
    return constant


def _small_fleet_charts(fleet: Fleet) -> list[Chart]:
    points = []
    nodes = fleet.sorted_nodes()
    for check in fleet.checks:
        for node in nodes:
            for measure in fleet.node_measures(node, check.index):
                points.append(Point(check.display, node.label, check.dtype, measure))
    found = [ratio_chart(points)] + bound_charts(points)
    return [chart for chart in found if chart is not None]


class Page:
    """Everything the template shows, computed once (the template only lays it out)."""

    def __init__(self, fleet: Fleet, title: str) -> None:
        self.fleet = fleet
        self.title = title
        self.results = insights.node_verdicts(fleet)
        self.verdict = insights.fleet_verdict(self.results)
        self.verified = insights.verified_lines(self.results)
        self.causes = insights.failures_by_cause(fleet)
        self.failing_checks = insights.failures_by_check(fleet)
        self.outliers, self.varied = insights.inventory_outliers(fleet)
        self.distributions = _distribution_views(fleet)
        self.constant_numbers = _constant_numbers(fleet)
        self.check_rows = insights.check_rows(fleet)
        self.drill_downs = _drill_downs(fleet, self.results, self.outliers)
        self.areas = list(dict.fromkeys(check.area for check in fleet.checks))
        self.totals = fleet.totals()
        self.small = len(fleet.nodes) <= MATRIX_NODES
        self.charts = _small_fleet_charts(fleet) if self.small else []
        self.nodes = fleet.sorted_nodes()
        self.skip_reasons = self._skip_reasons()

    def area_rows(self) -> list[DrillDown]:
        """Nodes for the area x node view: failed first, then not verified, then passed."""
        order = {"failed": 0, "nothing": 1, "cpu": 2, "passed": 3}
        return sorted(self.drill_downs, key=lambda view: order[view.result.verdict.kind])

    def inputs_text(self) -> str:
        names = [Path(p).name for p in self.fleet.inputs]
        if len(names) <= 6:
            return ", ".join(names)
        return f"{len(names)} files ({', '.join(names[:3])}, …, {names[-1]})"

    @staticmethod
    def hosts(hosts: list[str], limit: int = 400) -> str:
        return shortened(hosts, limit)

    def cell(self, check, node: FleetNode) -> tuple[str, str]:
        code = node.outcome(check.index)
        return OUTCOME[code], self.fleet.reason(node, check.index) if code != ABSENT else "not in this node's report"

    def areas_of_checks(self) -> list[tuple[str, list]]:
        grouped: dict[str, list] = {}
        for check in self.fleet.checks:
            grouped.setdefault(check.area, []).append(check)
        return list(grouped.items())

    def _skip_reasons(self) -> list[tuple[str, int, list[str]]]:
        reasons: dict[str, list[str]] = {}
        counts: Counter = Counter()
        for node in self.nodes:
            for check, code in enumerate(node.outcomes):
                if OUTCOME[code] == "skipped":
                    reason = self.fleet.reason(node, check) or "(no reason given)"
                    counts[reason] += 1
                    hosts = reasons.setdefault(reason, [])
                    if not hosts or hosts[-1] != node.label:
                        hosts.append(node.label)
        return sorted(((r, counts[r], hosts) for r, hosts in reasons.items()), key=lambda item: (-item[1], item[0]))


def render(fleet: Fleet, title: str) -> str:
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    template = environment.get_template("report.html.j2")
    return template.render(
        page=Page(fleet, title),
        outcome_text=OUTCOME_TEXT,
        exception_checks_shown=EXCEPTION_CHECKS_SHOWN,
        checks_shown=FAILING_CHECKS_SHOWN,
        failed_lines=FAILED_NODE_LINES,
        generated=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def run(paths: list[str], output: str, title: str) -> str:
    """Write the page for ``paths`` to ``output``; returns a one-line account."""
    check_inputs(paths, output)
    with junit.AtomicOutput(output) as stream:  # an unwritable output fails before the work
        fleet = Fleet.read(paths)
        html = render(fleet, title)
        stream.write(html.encode("utf-8"))
    totals = fleet.totals()
    verdict = insights.fleet_verdict(insights.node_verdicts(fleet))
    return (
        f"report of {len(fleet.nodes)} node(s) x {len(fleet.checks)} check(s): {verdict.word}: "
        f"{verdict.headline()}; {totals['passed']} passed, {totals['failed']} failed, "
        f"{totals['error']} errors, {totals['skipped']} skipped -> {output} ({len(html.encode()) / 1e6:.1f} MB)"
    )
