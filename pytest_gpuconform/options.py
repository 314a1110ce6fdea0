"""Every option of the plugin, declared once: flag, ini key, parser, default and help text.

Loaded in every pytest run of an environment where the plugin is installed, so this module
imports nothing heavy. Each option's default lives here and only here: ``--help`` shows
it, settings.py resolves it (command line over ini over default, pytest-timeout's rule),
and tests/plugin/test_options.py holds the README's option table to it.

Values are validated by argparse ``type=`` callables, so a bad command-line value is a
pytest usage error (exit code 4) before anything runs; a bad ini value is the same usage
error, raised when settings are resolved.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

GROUP = "gpuconform"
GROUP_TITLE = "GPU / PyTorch training conformance (pytest-gpuconform)"


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


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (exclusive), got {value}")
    return value


def default_cpu_ranks() -> int:
    """Gloo ranks of small tensors share cores well; two ranks even on a one-core node.
    Counted as the cores this process may use (affinity, a container's CPU quota), not the
    host's: a 2-CPU pod on a 128-core host hosts 2."""
    from .node.host import read

    return max(2, read().cpu_cores_usable)


@dataclass(frozen=True)
class Option:
    """One option. ``default`` may be a callable (computed when settings are resolved);
    ``default_text`` is how the default reads in ``--help`` and the README."""

    flag: str
    help: str
    default: Any = None
    default_text: str = ""
    parse: Callable[[str], Any] | None = None
    ini: str | None = None
    metavar: str | None = None
    action: str | None = None  # "store_true" or "append"
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def resolved_default(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def help_text(self) -> str:
        sources = f"ini {self.ini}, else " if self.ini else ""
        if self.default_text:
            return f"{self.help} (default: {sources}{self.default_text})"
        return self.help


OPTIONS: tuple[Option, ...] = (
    Option(
        "--gpuconform-expect-gpus",
        "Strict acceptance: this node must have at least N visible GPUs; with fewer, "
        "the GPU checks fail instead of skipping",
        default=0,
        default_text="0",
        parse=non_negative_int,
        ini="gpuconform_expect_gpus",
        metavar="N",
    ),
    Option(
        "--gpuconform-cpu-ranks",
        "How many gloo ranks a CPU node may host for world_size tests",
        default=default_cpu_ranks,
        default_text="max(2, usable CPU cores)",
        parse=positive_int,
        ini="gpuconform_cpu_ranks",
        metavar="N",
    ),
    Option(
        "--gpuconform-timeout",
        "Deadline in seconds of one multi-rank test",
        default=120.0,
        default_text="120",
        parse=positive_float,
        ini="gpuconform_timeout",
        metavar="SECONDS",
    ),
    Option(
        "--gpuconform-fresh-ranks",
        "Start new rank processes for every multi-rank test instead of reusing them",
        default=False,
        default_text="off",
        action="store_true",
    ),
    Option(
        "--gpuconform-strict-isolation",
        "Fail a multi-rank test that leaves state behind in its ranks (threads, child processes, "
        "process groups) instead of only reporting it as a warning",
        default=False,
        default_text="off",
        action="store_true",
    ),
    Option(
        "--gpuconform-rank-logs",
        "Keep every rank's full output log in DIR (created if missing); by default rank logs live in a "
        "temporary directory removed with the ranks, and reports show each test's head and tail",
        default_text="off",
        metavar="DIR",
    ),
    Option(
        "--gpuconform-tolerance",
        "Override a tolerance, e.g. 'bf16:rtol=2e-2,rel_l2=1e-2'. Repeatable; applied "
        "after the ini gpuconform_tolerances lines (one per line, site policy), so it wins",
        default=(),
        default_text="the table",
        metavar="DTYPE:KEY=VALUE[,KEY=VALUE]",
        action="append",
    ),
    Option(
        "--gpuconform-cluster",
        "Cluster mode (one pytest per rank, launched by torchrun or srun): auto detects "
        "torchrun, and srun with more than one task per node; on/off force it",
        default="auto",
        default_text="auto",
        choices=("auto", "on", "off"),
    ),
    Option(
        "--gpuconform-cluster-junit",
        "Cluster mode: where rank 0 writes the merged JUnit file",
        default_text="junit-cluster.xml beside the per-rank --junitxml files",
        metavar="PATH",
    ),
    Option(
        "--gpuconform-save-baseline",
        "Write this run's measured throughputs (records named *_tflops, *_gbps) to FILE as JSON",
        default_text="off",
        metavar="FILE",
    ),
    Option(
        "--gpuconform-baseline",
        "Fail tests whose throughputs regressed against FILE (written by --gpuconform-save-baseline)",
        default_text="off",
        metavar="FILE",
    ),
    Option(
        "--gpuconform-regression-fraction",
        "With --gpuconform-baseline: a number more than F below its baseline fails",
        default=0.1,
        default_text="0.1",
        parse=fraction,
        metavar="F",
    ),
    Option(
        "--gpuconform-peer-fraction",
        "A GPU more than F below the median of the node's GPUs fails the peer comparison",
        default=0.1,
        default_text="0.1",
        parse=fraction,
        metavar="F",
    ),
    Option(
        "--gpuconform-spec",
        "Acceptance spec (TOML) of what this node must be: GPU count, model, memory, links, "
        "driver/CUDA/NCCL/torch ranges, CPU cores, host memory; each declared field is a named check. "
        "Examples ship in pytest_gpuconform/acceptance/examples/",
        default_text="off",
        ini="gpuconform_spec",
        metavar="FILE",
    ),
    Option(
        "--gpuconform-json",
        "Write one JSON document for this node (inventory, verdict, every case with its outcome and "
        "recorded numbers) to FILE; {host} and {rank} are filled in",
        default_text="off",
        metavar="FILE",
    ),
    Option(
        "--gpuconform-prometheus",
        "Write this node's results as a Prometheus textfile (node_exporter's textfile collector "
        "format: per-check pass/fail, health counters, measured numbers) to FILE; {host} and {rank} are filled in",
        default_text="off",
        ini="gpuconform_prometheus",
        metavar="FILE",
    ),
    Option(
        "--gpuconform-perf-floors",
        "Performance floors file replacing the shipped one (pytest_gpuconform/perf/data/perf_floors.json)",
        default_text="the shipped file",
        metavar="FILE",
    ),
)

BY_DEST = {option.dest: option for option in OPTIONS}


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP, GROUP_TITLE)
    group.addoption(
        "--gpuconform",
        action="store_true",
        default=False,
        help="Enable the plugin. Without paths, run the shipped conformance suite; with paths, "
        "run those tests with the gpu/world_size/dtype markers and fixtures active.",
    )
    parser.addini("gpuconform", "Enable the plugin as if --gpuconform was given.", type="bool", default=False)
    for option in OPTIONS:
        kwargs: dict[str, Any] = {"dest": option.dest, "help": option.help_text() + "."}
        if option.action == "store_true":
            kwargs.update(action="store_true", default=False)
        elif option.action == "append":
            kwargs.update(action="append", default=[], metavar=option.metavar)
        else:
            # None, not the default: settings.py must tell "not given" from "given as the
            # default" to let the command line win over ini.
            kwargs.update(default=None, metavar=option.metavar)
            if option.parse is not None:
                kwargs["type"] = option.parse
            if option.choices:
                kwargs["choices"] = option.choices
        group.addoption(option.flag, **kwargs)
        if option.ini:
            parser.addini(option.ini, option.help + ".", default="")
    parser.addini(
        "gpuconform_tolerances",
        "Tolerance overrides, one 'DTYPE:KEY=VALUE[,KEY=VALUE]' per line (site policy).",
        type="linelist",
        default=[],
    )


def is_enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("gpuconform", False) or config.getini("gpuconform"))
