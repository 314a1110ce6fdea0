"""Command-line and ini options of the plugin, and the parsers that validate them.

Validation happens inside argparse ``type=`` callables so that bad values are pytest
usage errors (exit code 4) before anything else runs.
"""

from __future__ import annotations

import argparse

import pytest


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a whole number >= 1, got 0")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("gpuconform", "GPU / PyTorch training conformance (pytest-gpuconform)")
    group.addoption(
        "--gpuconform",
        action="store_true",
        default=False,
        help="Enable the plugin. Without paths, run the shipped conformance suite; with paths, "
        "run those tests with the gpu/world_size/dtype markers and fixtures active.",
    )
    group.addoption(
        "--gpuconform-expect-gpus",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="Strict acceptance: this node must have at least N visible GPUs. With fewer, "
        "the GPU checks fail instead of skipping. Default: from ini gpuconform_expect_gpus, else 0.",
    )
    group.addoption(
        "--gpuconform-cpu-ranks",
        type=positive_int,
        default=None,
        metavar="N",
        help="How many gloo ranks a CPU node may host for world_size tests "
        "(default: ini gpuconform_cpu_ranks, else max(2, CPU cores)).",
    )
    group.addoption(
        "--gpuconform-timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="Deadline of one multi-rank test (default: ini gpuconform_timeout, else 120).",
    )
    group.addoption(
        "--gpuconform-fresh-ranks",
        action="store_true",
        default=False,
        help="Start new rank processes for every multi-rank test instead of reusing them.",
    )
    group.addoption(
        "--gpuconform-tolerance",
        action="append",
        default=[],
        metavar="DTYPE:KEY=VALUE[,KEY=VALUE]",
        help="Override a tolerance, e.g. 'bf16:rtol=2e-2,rel_l2=1e-2'. Repeatable; wins over "
        "ini gpuconform_tolerances.",
    )
    group.addoption(
        "--gpuconform-cluster",
        choices=("auto", "on", "off"),
        default="auto",
        help="Cluster mode (one pytest per rank, launched by torchrun or srun): auto detects torchrun, "
        "and srun with more than one task per node; on/off force it. Default: auto.",
    )
    group.addoption(
        "--gpuconform-cluster-junit",
        default=None,
        metavar="PATH",
        help="Cluster mode: where rank 0 writes the merged JUnit file "
        "(default: junit-cluster.xml beside the per-rank --junitxml files).",
    )
    parser.addini("gpuconform", "Enable the plugin as if --gpuconform was given.", type="bool", default=False)
    parser.addini("gpuconform_expect_gpus", "Minimum number of GPUs this node must have.", default="")
    parser.addini("gpuconform_cpu_ranks", "Gloo ranks a CPU node may host.", default="")
    parser.addini("gpuconform_timeout", "Deadline in seconds of one multi-rank test.", default="")
    parser.addini(
        "gpuconform_tolerances",
        "Tolerance overrides, one 'DTYPE:KEY=VALUE[,KEY=VALUE]' per line (site policy).",
        type="linelist",
        default=[],
    )
    from .health_options import add_health_options  # issue 7: performance floors and baselines

    add_health_options(group, parser)


def ini_or_option(config: pytest.Config, name: str, parse, default):
    """CLI wins over ini, ini over the default (the pytest-timeout convention)."""
    value = config.getoption(name)
    if value is not None:
        return value
    raw = config.getini(name).strip()
    if not raw:
        return default
    try:
        return parse(raw)
    except argparse.ArgumentTypeError as exc:
        raise pytest.UsageError(f"ini option {name} = {raw!r}: {exc}") from None
