"""Command-line options of the health, performance-floor and baseline checks.

Kept apart from baseline.py (a plugin module, imported only in enabled runs) because
options.py calls ``add_health_options`` in every pytest run, enabled or not.
"""

from __future__ import annotations

import argparse

import pytest


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (exclusive), got {value}")
    return value


def add_health_options(group, parser: pytest.Parser) -> None:
    """Options of the health / performance / baseline checks (called from options.py)."""
    group.addoption("--gpuconform-save-baseline", default=None, metavar="FILE",
                    help="Write this run's measured throughputs (records named *_tflops, *_gbps) to FILE as JSON.")
    group.addoption("--gpuconform-baseline", default=None, metavar="FILE",
                    help="Fail tests whose throughputs regressed against FILE (written by --gpuconform-save-baseline).")
    group.addoption("--gpuconform-regression-fraction", type=fraction, default=0.1, metavar="F",
                    help="With --gpuconform-baseline: a number more than F below its baseline fails (default 0.1).")
    group.addoption("--gpuconform-peer-fraction", type=fraction, default=0.1, metavar="F",
                    help="A GPU more than F below the median of the node's GPUs fails the peer comparison (default 0.1).")
    group.addoption("--gpuconform-perf-floors", default=None, metavar="FILE",
                    help="Performance floors file replacing the shipped pytest_gpuconform/data/perf_floors.json.")
