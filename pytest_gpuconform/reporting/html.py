"""``gpuconform report``: one self-contained HTML page from JUnit reports.

What a person acceptance-testing a cluster needs on one page: which check failed on which
node (a node x check matrix), why (each failure's one-line reason), what each node runs
(GPU model, driver, CUDA, torch, NCCL from the suite properties the plugin writes), and
how close the measured numbers are to their bounds (charts, see charts.py).

The inputs go through the same reader as ``gpuconform merge`` (so raw per-node files and a
merged file both work, and a bad file is the same clear error). The page has no scripts
and loads nothing from the network: a report copied off an air-gapped cluster still opens.
jinja2 with autoescaping writes it, since test names and failure messages are arbitrary text.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

from . import junit, merge
from .charts import Chart, Point, bound_charts, ratio_chart
from .measures import Measure, key_measures

INVENTORY_PREFIX = "gpuconform."
_SUITE_PREFIXES = ("pytest_gpuconform.conformance.", "conformance.")
MAX_REASON = 300
OUTCOME_TEXT = {"passed": "pass", "failed": "FAIL", "error": "ERROR", "skipped": "skip"}


@dataclass
class Cell:
    outcome: str  # passed, failed, error, skipped
    reason: str
    measures: list[Measure]


@dataclass
class Check:
    key: tuple[str, str]  # (classname without the node label, test name)
    area: str
    display: str
    dtype: str


@dataclass
class Node:
    label: str  # the host
    inventory: dict[str, str]
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOME_TEXT, 0))
    ranks: set[str] = field(default_factory=set)

    def rank_text(self) -> str:
        if not self.ranks:
            return "—"
        ranks = sorted(self.ranks, key=_natural_key)
        return f"{len(ranks)}: r{ranks[0]}" + (f"–r{ranks[-1]}" if len(ranks) > 1 else "")

    def gpus(self) -> str:
        names = [
            value for key, value in sorted(self.inventory.items(), key=_natural) if re.fullmatch(r"gpu\d+_name", key)
        ]
        if not names:
            return "none" if self.inventory.get("gpu_count", "0") == "0" else "unknown"
        groups: dict[str, int] = {}
        for name in names:
            groups[name] = groups.get(name, 0) + 1
        return ", ".join(f"{count} × {name}" for name, count in groups.items())

    def fact(self, name: str) -> str:
        value = self.inventory.get(name)
        return value if value and value != "none" else "—"


@dataclass
class ReportModel:
    inputs: list[str]
    nodes: list[Node]
    checks: list[Check]
    cells: dict[tuple[tuple[str, str], str], Cell]

    def areas(self) -> list[tuple[str, list[Check]]]:
        grouped: dict[str, list[Check]] = {}
        for check in self.checks:
            grouped.setdefault(check.area, []).append(check)
        return list(grouped.items())

    def totals(self) -> dict[str, int]:
        totals = dict.fromkeys(OUTCOME_TEXT, 0)
        for cell in self.cells.values():
            totals[cell.outcome] += 1
        return totals

    def problems(self) -> list[tuple[Node, Check, Cell]]:
        """Every failed or errored cell, in matrix order."""
        found = []
        for check in self.checks:
            for node in self.nodes:
                cell = self.cells.get((check.key, node.label))
                if cell and cell.outcome in ("failed", "error"):
                    found.append((node, check, cell))
        return found

    def skip_reasons(self) -> list[tuple[str, int, list[str]]]:
        reasons: dict[str, list[str]] = {}
        for (_, label), cell in self.cells.items():
            if cell.outcome == "skipped":
                reasons.setdefault(cell.reason or "(no reason given)", []).append(label)
        return sorted(
            ((r, len(labels), sorted(set(labels), key=_natural_key)) for r, labels in reasons.items()),
            key=lambda item: -item[1],
        )

    def points(self) -> list[Point]:
        """Every key measurement, in check order then node order (the charts' order)."""
        points = []
        for check in self.checks:
            for node in self.nodes:
                cell = self.cells.get((check.key, node.label))
                for measure in cell.measures if cell else ():
                    points.append(Point(check.display, node.label, check.dtype, measure))
        return points


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _natural(item: tuple[str, str]) -> list:
    return _natural_key(item[0])


def _one_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= MAX_REASON else line[: MAX_REASON - 1] + "…"
    return ""


def _cell(case: ElementTree.Element) -> tuple[Cell, dict[str, str]]:
    properties = [(p.get("name", ""), p.get("value", "")) for p in case.iterfind("properties/property")]
    outcome, element = junit.case_outcome(case)
    reason = "" if element is None else _one_line(element.get("message")) or _one_line(element.text)
    return Cell(outcome, reason, key_measures(properties)), dict(properties)


def _display(classname: str, name: str) -> str:
    for prefix in _SUITE_PREFIXES:
        classname = classname.removeprefix(prefix)
    parts = classname.split(".")
    module_at = max((i for i, part in enumerate(parts) if part.startswith("test_")), default=len(parts) - 1)
    classes = parts[module_at + 1 :]
    return "::".join(classes + [name])


def _area(classname: str, properties: dict[str, str]) -> str:
    if properties.get("feature"):
        return properties["feature"]
    module = classname.split(".")
    modules = [part for part in module if part.startswith("test_")]
    return (modules[-1] if modules else module[-1]).removeprefix("test_") or "tests"


_SEVERITY = {"skipped": 0, "passed": 1, "failed": 2, "error": 3}


def _fold(ranked: list[tuple[str | None, Cell]]) -> Cell:
    """One node's cell from its ranks' cells: the worst outcome, naming its rank; the
    measured numbers of the lowest rank (the one whose records the plugin reports)."""
    if len(ranked) == 1:
        return ranked[0][1]
    ranked = sorted(ranked, key=lambda item: _natural_key(item[0] or ""))
    rank, worst = max(ranked, key=lambda item: _SEVERITY[item[1].outcome])
    reason = f"rank {rank}: {worst.reason}" if rank is not None and worst.reason else worst.reason
    return Cell(worst.outcome, reason, ranked[0][1].measures)


def build_model(paths: list[str]) -> ReportModel:
    """Read ``paths`` (raw or merged JUnit files) into the page's model; BadReport if unusable.

    Columns are hosts: the per-rank suites of a cluster run fold into their host's column,
    each cell showing the worst outcome of that host's ranks and naming the rank.
    """
    root = merge.merge_reports(paths)
    nodes: dict[str, Node] = {}
    checks: dict[tuple[str, str], Check] = {}
    ranked: dict[tuple[tuple[str, str], str], list[tuple[str | None, Cell]]] = {}
    for suite in root.findall("testsuite"):
        label = suite.get("name", "")
        inventory = {}
        for prop in suite.iterfind("properties/property"):
            name = prop.get("name", "")
            if name.startswith(INVENTORY_PREFIX):
                inventory[name.removeprefix(INVENTORY_PREFIX)] = prop.get("value", "")
        host = inventory.get("host") or label
        rank = inventory.get("rank")
        node = nodes.setdefault(host, Node(host, {}))
        for name, value in inventory.items():
            node.inventory.setdefault(name, value)
        if rank is not None:
            node.ranks.add(rank)
        for case in suite.findall("testcase"):
            classname = (case.get("classname") or "").removeprefix(label + ".")
            if classname == label:
                classname = ""
            key = (classname, case.get("name", ""))
            cell, properties = _cell(case)
            if key not in checks:
                checks[key] = Check(
                    key, _area(classname, properties), _display(classname, key[1]), properties.get("dtype", "no dtype")
                )
            ranked.setdefault((key, host), []).append((rank, cell))
    cells = {where: _fold(cells_of_ranks) for where, cells_of_ranks in ranked.items()}
    for (_, host), cell in cells.items():
        nodes[host].counts[cell.outcome] += 1
    ordered_checks: list[Check] = []
    for area in dict.fromkeys(check.area for check in checks.values()):
        ordered_checks += [check for check in checks.values() if check.area == area]
    ordered_nodes = sorted(nodes.values(), key=lambda n: _natural_key(n.label))
    return ReportModel(list(paths), ordered_nodes, ordered_checks, cells)


def charts(model: ReportModel) -> list[Chart]:
    points = model.points()
    found = [ratio_chart(points)] + bound_charts(points)
    return [chart for chart in found if chart is not None]


def render(model: ReportModel, title: str) -> str:
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
        title=title,
        model=model,
        charts=charts(model),
        totals=model.totals(),
        outcome_text=OUTCOME_TEXT,
        generated=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        inputs=[Path(p).name for p in model.inputs],
    )


def run(paths: list[str], output: str, title: str) -> str:
    """Write the page for ``paths`` to ``output``; returns a one-line account."""
    merge.check_output_not_input(paths, output)
    model = build_model(paths)
    junit.write_atomically(render(model, title), output)
    totals = model.totals()
    return (
        f"report of {len(model.nodes)} node(s) x {len(model.checks)} check(s): "
        f"{totals['passed']} passed, {totals['failed']} failed, {totals['error']} errors, "
        f"{totals['skipped']} skipped -> {output}"
    )


def add_command(commands) -> None:
    """Register ``gpuconform report`` on the CLI's subparsers (cli.py)."""
    parser = commands.add_parser(
        "report",
        help="write one self-contained HTML page (node x check matrix, inventory, charts)",
        description="Render JUnit XML files (per node, or merged) as one self-contained HTML page. "
        "Exit 2 on a missing, empty or corrupt input; nothing is written then.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="JUnit XML files (raw or merged)")
    parser.add_argument("-o", "--output", required=True, metavar="HTML", help="page to write")
    parser.add_argument("--title", default="GPU conformance report", help="page title")
    parser.set_defaults(func=_command)


def _command(args) -> int:
    import sys

    try:
        print(run(args.files, args.output, args.title))
    except merge.BadReport as exc:
        print(f"gpuconform report: error: {exc}", file=sys.stderr)
        return 2
    return 0
