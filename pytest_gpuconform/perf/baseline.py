"""Baselines: save this run's measured throughputs, fail later runs that fell behind them.

Floors (perf_floors.json) say what any healthy GPU of a model must reach; a baseline says
what *this* node reached on a day it was accepted, so it catches a slow drift that is
still above the floor (SuperBench's and Megatron's golden values work the same way).

Which numbers: every number a test records (``record(name, value)``) whose name ends in a
throughput unit, ``_tflops`` or ``_gbps``; bigger is better for both. So users' own tests
get baselines by naming their records that way. A number is keyed by test module, test
name with parameters, and record name (``test_performance::test_gemm_throughput[bf16]::
gpu0_bf16_tflops``), which does not depend on where the suite was installed.

``--gpuconform-save-baseline FILE`` writes them at the end of the run (by the controller
under xdist); ``--gpuconform-baseline FILE`` turns a passed test into a failure when one
of its numbers is more than ``--gpuconform-regression-fraction`` below the baseline.
Numbers absent from the baseline are not compared (new tests, other GPUs).
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import pytest

from ..reporting import junit
from ..xdist_glue import XdistRole

TRACKED_UNITS = {"_tflops": "TFLOP/s", "_gbps": "GB/s"}
FORMAT = "pytest-gpuconform baseline"
VERSION = 1


class BadBaseline(ValueError):
    pass


def tracked_unit(name: str, value) -> str | None:
    """The unit of a baseline-tracked record, or None when the record is not tracked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return next((unit for suffix, unit in TRACKED_UNITS.items() if name.endswith(suffix)), None)


def metric_key(nodeid: str, name: str) -> str:
    path, _, rest = nodeid.partition("::")
    return f"{Path(path).stem}::{rest}::{name}"


def load(path: str) -> dict[str, float]:
    """The metrics of a baseline file; BadBaseline with a one-line reason when unusable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise BadBaseline(f"cannot read baseline {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadBaseline(f"baseline {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BadBaseline(
            f"baseline {path} is not a pytest-gpuconform baseline "
            f'(expected "format": "{FORMAT}"; write one with --gpuconform-save-baseline)'
        )
    if data.get("version") != VERSION:
        raise BadBaseline(f"baseline {path} has version {data.get('version')!r}; this plugin reads version {VERSION}")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise BadBaseline(f'baseline {path}: "metrics" must be an object of name -> number')
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise BadBaseline(f"baseline {path}: metric {key!r} = {value!r} is not a positive number")
    return {k: float(v) for k, v in metrics.items()}


def regressions(
    measured: dict[str, float], reference: dict[str, float], allowed: float
) -> list[tuple[str, float, float, float]]:
    """(key, measured, baseline, lowest allowed) for every number below its bound. Pure."""
    found = []
    for key, value in measured.items():
        base = reference.get(key)
        if base is None:
            continue
        bound = base * (1 - allowed)
        if value < bound:
            found.append((key, value, base, bound))
    return found


class BaselineState:
    """The baseline plugin of one run (registered by plugin.py in enabled runs)."""

    def __init__(self, settings, inventory) -> None:
        self.allowed = settings.regression_fraction
        self.save_path = settings.save_baseline
        self.reference = settings.baseline
        self.inventory = inventory
        self.collected: dict[str, float] = {}

    def gpu_label(self, name: str) -> str:
        """'GPU 0 (uuid, bus id): ' for records named gpu<index>_..., from the NVML inventory."""
        head = name.split("_", 1)[0]
        if not (head.startswith("gpu") and head[3:].isdigit()):
            return ""
        for gpu in self.inventory.node.gpus:
            if gpu.index == int(head[3:]):
                return f"{gpu.label()}: "
        return f"GPU {head[3:]}: "

    def failures(self, nodeid: str, properties) -> list[str]:
        if self.reference is None:
            return []
        measured = {metric_key(nodeid, n): float(v) for n, v in properties if tracked_unit(n, v)}
        lines = []
        for key, value, base, bound in regressions(measured, self.reference, self.allowed):
            name = key.rsplit("::", 1)[-1]
            unit = tracked_unit(name, value)
            lines.append(
                f"{self.gpu_label(name)}{name} = {value:.4g} {unit}, {1 - value / base:.1%} below baseline "
                f"{base:.4g}; bound >= {bound:.4g} (--gpuconform-regression-fraction {self.allowed:g})"
            )
        return lines

    def write(self) -> None:
        inventory = self.inventory
        data = {
            "format": FORMAT,
            "version": VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": inventory.host,
            "torch": inventory.torch,
            "driver": inventory.node.driver_version or None,
            "gpus": [g.as_dict() for g in inventory.node.visible],
            "metrics": dict(sorted(self.collected.items())),
        }
        junit.write_atomically(json.dumps(data, indent=2) + "\n", self.save_path)

    def saved_line(self) -> str:
        """What the terminal says about the saved file; a baseline with nothing in it says why."""
        if self.collected:
            return f"gpuconform: wrote {len(self.collected)} baseline number(s) to {self.save_path}"
        why = (
            "this node has no GPU, so no performance check measured anything"
            if not self.inventory.node.count
            else "no test recorded a number named *_tflops or *_gbps"
        )
        return f"gpuconform: wrote a baseline with 0 numbers to {self.save_path}: {why}"

    # -- hooks ----------------------------------------------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call):
        report = yield
        if report.when != "call":
            return report
        lines = self.failures(item.nodeid, item.user_properties)
        if lines:
            text = "baseline regression: " + "\n".join(lines)
            if report.passed:
                report.outcome = "failed"
                report.longrepr = text
            else:
                report.sections.append(("gpuconform baseline", text))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Collect tracked numbers where reports meet: the controller under xdist."""
        if report.when != "call" or not self.save_path:
            return
        for name, value in report.user_properties:
            if tracked_unit(name, value):
                self.collected[metric_key(report.nodeid, name)] = float(value)  # type: ignore[arg-type]

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.save_path and not XdistRole.is_worker(session.config):
            self.write()

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.save_path and not XdistRole.is_worker(terminalreporter.config):
            terminalreporter.write_line(self.saved_line())
