"""Inline-SVG charts of the report page, computed as plain shapes.

The page must work offline (a report copied off an air-gapped cluster), so there is no
charting library: the geometry is computed here and the template writes each shape as an
SVG element, with jinja2's escaping applied to every label and attribute.

Which numbers are charted follows measures.py's naming rule:
* ``*_ratio`` properties (memory ratios of checkpointing and AMP, ...): one bar per node,
  grouped by check, on a linear scale, with the bound drawn as a tick where there is one;
* other bounded properties (``X`` with ``X_bound`` / ``X_min`` ...): measured value against
  bound per dtype, on a log scale (errors span many decades), one dot per node. Exact zeros
  (bitwise-equal results) sit on the left edge as hollow dots; NaN and inf on the right edge.

Those two draw one shape per node and serve fleets of up to 32 nodes (html.py). For any
fleet, ``histogram`` draws one number across all nodes (and GPUs) as ~30 bins with its
bound, so its size does not grow with the fleet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .measures import RATIO_SUFFIX, Measure, number

PASS_COLOUR = "#2e7d32"
FAIL_COLOUR = "#c62828"
PLAIN_COLOUR = "#1565c0"
CHAR_WIDTH = 6.6  # px per character of the 11px labels, generous for proportional fonts
PLOT_WIDTH = 440
ROW = 16
HEADER = 20


@dataclass
class Shape:
    kind: str  # an SVG element name: rect, line, circle, text
    attrs: dict
    text: str = ""
    title: str = ""


@dataclass
class Chart:
    chart_id: str
    title: str
    caption: str
    width: int = 0
    height: int = 0
    shapes: list[Shape] = field(default_factory=list)


@dataclass(frozen=True)
class Point:
    """One measured number of one check on one node."""

    check: str  # the check's display name
    node: str
    dtype: str
    measure: Measure


def _label_width(labels: list[str]) -> float:
    return min(max(len(label) for label in labels) * CHAR_WIDTH + 12, 560)


def _colour(measure: Measure) -> str:
    if measure.within is None:
        return PLAIN_COLOUR
    return PASS_COLOUR if measure.within else FAIL_COLOUR


def _describe(point: Point) -> str:
    return f"{point.node}: {point.check} {point.measure.describe()}"


def _bound_mark(x: float, y: float, bound: float) -> Shape:
    """The black tick across one row of a chart where a measure's bound lies."""
    attributes = {"x1": f"{x:.1f}", "x2": f"{x:.1f}", "y1": f"{y:.1f}", "y2": f"{y + ROW:.1f}"}
    return Shape("line", {**attributes, "stroke": "#000", "stroke-width": "2"}, title=f"bound {number(bound)}")


def _text(x: float, y: float, text: str, anchor: str = "start", weight: str = "normal") -> Shape:
    return Shape(
        "text",
        {"x": f"{x:.1f}", "y": f"{y:.1f}", "text-anchor": anchor, "font-weight": weight, "font-size": "11"},
        text,
    )


def _grouped(points: list[Point], key) -> dict:
    groups: dict = {}
    for point in points:
        groups.setdefault(key(point), []).append(point)
    return groups


def ratio_chart(points: list[Point]) -> Chart | None:
    """Bars of every ``*_ratio`` measure, one per node, grouped by (check, measure)."""
    ratios = [p for p in points if p.measure.name.endswith(RATIO_SUFFIX)]
    if not ratios:
        return None
    finite = [v for p in ratios for v in (p.measure.value, p.measure.bound) if v is not None and math.isfinite(v)]
    top = max(finite + [1.0]) * 1.1
    left = _label_width([p.node for p in ratios] + ["0"])
    chart = Chart(
        "ratios",
        "Ratios per node",
        "Bars: measured ratio per node (green within its bound, red past it, blue "
        "when no bound is recorded). Black tick: the bound. Properties named *_ratio.",
    )

    def x_of(value: float) -> float:
        return left + PLOT_WIDTH * min(max(value, 0.0), top) / top

    y = 4.0
    for (check, name), group in _grouped(ratios, lambda p: (p.check, p.measure.name)).items():
        chart.shapes.append(_text(4, y + 13, f"{check} · {name}", weight="bold"))
        y += HEADER
        for point in group:
            measure = point.measure
            value = measure.value if math.isfinite(measure.value) else top
            chart.shapes.append(_text(left - 6, y + 11, point.node, anchor="end"))
            chart.shapes.append(
                Shape(
                    "rect",
                    {
                        "x": f"{left:.1f}",
                        "y": f"{y + 2:.1f}",
                        "width": f"{max(x_of(value) - left, 1.0):.1f}",
                        "height": f"{ROW - 4}",
                        "fill": _colour(measure),
                        "class": "bar",
                        "data-node": point.node,
                        "data-check": check,
                        "data-measure": name,
                        "data-value": repr(measure.value),
                    },
                    title=_describe(point),
                )
            )
            if measure.bound is not None and math.isfinite(measure.bound):
                chart.shapes.append(_bound_mark(x_of(measure.bound), y, measure.bound))
            chart.shapes.append(_text(left + PLOT_WIDTH + 6, y + 11, measure.describe()))
            y += ROW
        y += 4
    _axis_line(chart, left, y)
    chart.height = int(y + 16)
    chart.width = int(left + PLOT_WIDTH + _label_width([p.measure.describe() for p in ratios]))
    chart.shapes.append(_text(left, y + 13, "0"))
    chart.shapes.append(_text(left + PLOT_WIDTH, y + 13, number(top), anchor="end"))
    return chart


def _axis_line(chart: Chart, left: float, y: float) -> None:
    chart.shapes.append(
        Shape(
            "line",
            {
                "x1": f"{left:.1f}",
                "x2": f"{left + PLOT_WIDTH:.1f}",
                "y1": f"{y:.1f}",
                "y2": f"{y:.1f}",
                "stroke": "#888",
            },
        )
    )


def bound_charts(points: list[Point]) -> list[Chart]:
    """Per dtype: each bounded, non-ratio measure against its bound, one dot per node."""
    bounded = [p for p in points if p.measure.bound is not None and not p.measure.name.endswith(RATIO_SUFFIX)]
    charts = []
    for dtype, group in sorted(_grouped(bounded, lambda p: p.dtype).items()):
        charts.append(_bound_chart(dtype, group))
    return charts


def _bound_chart(dtype: str, points: list[Point]) -> Chart:
    positive = [
        v for p in points for v in (p.measure.value, p.measure.bound) if v is not None and math.isfinite(v) and v > 0
    ]
    low = math.floor(math.log10(min(positive))) - 1 if positive else -9
    high = math.ceil(math.log10(max(positive))) + 1 if positive else 1
    left = _label_width([f"{p.check} · {p.measure.name}" for p in points])
    chart = Chart(
        f"bounds-{dtype}",
        f"Measured against bound: {dtype}",
        "Log scale. Dots: one per node (green within the bound, red past it; hollow "
        "on the left edge: exactly 0; on the right edge: NaN or inf). Black tick: the "
        "bound. Pairs X / X_bound (upper) and X / X_min (lower).",
    )

    def x_of(value: float) -> float:
        if math.isnan(value) or value == math.inf:
            return left + PLOT_WIDTH
        if value <= 0:
            return left
        fraction = (math.log10(value) - low) / (high - low)
        return left + PLOT_WIDTH * min(max(fraction, 0.0), 1.0)

    y = 4.0
    for decade in range(low, high + 1):
        x = x_of(10.0**decade)
        chart.shapes.append(
            Shape("line", {"x1": f"{x:.1f}", "x2": f"{x:.1f}", "y1": "0", "y2": "100%", "stroke": "#eee"})
        )
    for (check, name), group in _grouped(points, lambda p: (p.check, p.measure.name)).items():
        chart.shapes.append(_text(left - 6, y + 11, f"{check} · {name}", anchor="end"))
        for bound in sorted({p.measure.bound for p in group}):
            chart.shapes.append(_bound_mark(x_of(bound), y, bound))
        for point in group:
            measure = point.measure
            zero = measure.value == 0
            chart.shapes.append(
                Shape(
                    "circle",
                    {
                        "cx": f"{x_of(measure.value):.1f}",
                        "cy": f"{y + ROW / 2:.1f}",
                        "r": "4",
                        "fill": "none" if zero else _colour(measure),
                        "stroke": _colour(measure),
                        "class": "dot",
                        "data-node": point.node,
                        "data-check": check,
                        "data-measure": name,
                        "data-value": repr(measure.value),
                    },
                    title=_describe(point),
                )
            )
        worst = max(group, key=lambda p: p.measure.use_of_bound or 0.0).measure
        chart.shapes.append(_text(left + PLOT_WIDTH + 6, y + 11, worst.describe()))
        y += ROW + 2
    _axis_line(chart, left, y)
    for decade in range(low, high + 1, max(1, (high - low) // 6)):
        chart.shapes.append(_text(x_of(10.0**decade), y + 13, f"1e{decade}", anchor="middle"))
    chart.height = int(y + 18)
    chart.width = int(left + PLOT_WIDTH + _label_width([p.measure.describe() for p in points]))
    return chart


HIST_WIDTH = 360
HIST_HEIGHT = 64
HIST_BINS = 30


def histogram(
    chart_id: str, values: list[float], bounds: list[float], bad: list[float], higher_is_better: bool
) -> Chart | None:
    """A small histogram of one measured number across the fleet: bars of how many nodes
    (or GPUs) measured each value, red where the bin holds a value past its bound, the
    bound(s) as black ticks. Log-scaled when positive values span more than two decades
    (errors), linear otherwise (throughputs, ratios)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    edges = finite + [b for b in bounds if math.isfinite(b)]
    low, high = min(edges), max(edges)
    log = low > 0 and high / low > 100
    if log:
        low, high = math.log10(low), math.log10(high)
    if high == low:
        low, high = low - 0.5, high + 0.5
    span = high - low

    def position(value: float) -> float:
        value = math.log10(value) if log else value
        return min(max((value - low) / span, 0.0), 1.0)

    counts = [0] * HIST_BINS
    red = [False] * HIST_BINS
    bad_set = set(bad)
    for value in finite:
        index = min(int(position(value) * HIST_BINS), HIST_BINS - 1)
        counts[index] += 1
        red[index] = red[index] or value in bad_set
    chart = Chart(chart_id, "", "", HIST_WIDTH + 8, HIST_HEIGHT + 16)
    tallest = max(counts)
    width = HIST_WIDTH / HIST_BINS
    for index, count in enumerate(counts):
        if not count:
            continue
        # a bin past its bound stays visible beside a tall majority, however few it holds
        height = max(HIST_HEIGHT * count / tallest, 8.0 if red[index] else 2.0)
        chart.shapes.append(
            Shape(
                "rect",
                {
                    "x": f"{4 + index * width:.1f}",
                    "y": f"{HIST_HEIGHT - height:.1f}",
                    "width": f"{width - 1:.1f}",
                    "height": f"{height:.1f}",
                    "fill": FAIL_COLOUR if red[index] else PLAIN_COLOUR,
                    "class": "bin",
                    "data-count": str(count),
                },
                title=f"{count} value(s)",
            )
        )
    for bound in bounds:
        x = 4 + HIST_WIDTH * position(bound)
        chart.shapes.append(
            Shape(
                "line",
                {
                    "x1": f"{x:.1f}",
                    "x2": f"{x:.1f}",
                    "y1": "0",
                    "y2": f"{HIST_HEIGHT}",
                    "stroke": "#000",
                    "stroke-width": "2",
                    "class": "bound",
                },
                title=f"bound {number(bound)}",
            )
        )
    axis = f"{'log scale, ' if log else ''}{'higher' if higher_is_better else 'lower'} is better"
    chart.shapes.append(_text(4, HIST_HEIGHT + 13, number(10**low if log else low)))
    chart.shapes.append(_text(4 + HIST_WIDTH / 2, HIST_HEIGHT + 13, axis, anchor="middle"))
    chart.shapes.append(_text(4 + HIST_WIDTH, HIST_HEIGHT + 13, number(10**high if log else high), anchor="end"))
    return chart
