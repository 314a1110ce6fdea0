"""The run's settings, resolved once at start-up and frozen.

Command line over ini over the default declared in options.py. Every consumer (the engine,
the collection policy, the fixtures the shipped suite uses) reads this object from
``config.stash[SETTINGS_KEY]``; nothing else reads the raw options. Files named by options
are read here, so a missing or malformed file is a usage error (exit code 4, naming the
path and what is wrong) before any test runs, not a failure in the middle of the suite.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from . import options
from .acceptance import spec as acceptance_spec
from .collection import tolerances
from .perf import baseline, floors


@dataclass(frozen=True)
class Settings:
    expect_gpus: int
    cpu_ranks: int
    timeout: float
    fresh_ranks: bool
    strict_isolation: bool
    rank_logs: str | None  # directory keeping every rank's full log
    tolerances: Mapping[str, tolerances.Tolerance]
    cluster: str  # "auto" | "on" | "off"
    cluster_junit: str | None
    save_baseline: str | None
    baseline_path: str | None
    baseline: Mapping[str, float] | None  # the metrics of --gpuconform-baseline, read once
    regression_fraction: float
    peer_fraction: float
    perf_floors: floors.FloorTable  # the shipped table or --gpuconform-perf-floors, read once
    spec: acceptance_spec.Spec | None = None  # --gpuconform-spec, read and validated once
    json_path: str | None = None  # --gpuconform-json (may hold {host} / {rank})
    prometheus_path: str | None = None  # --gpuconform-prometheus (may hold {host} / {rank})

    @classmethod
    def resolve(cls, config: pytest.Config) -> Settings:
        value = _Resolver(config).value
        try:
            table = tolerances.build_table(
                list(config.getini("gpuconform_tolerances")) + list(config.getoption("gpuconform_tolerance"))
            )
        except tolerances.BadTolerance as exc:
            raise pytest.UsageError(str(exc)) from None
        baseline_path = value("gpuconform_baseline")
        save_baseline = value("gpuconform_save_baseline")
        return cls(
            expect_gpus=value("gpuconform_expect_gpus"),
            cpu_ranks=value("gpuconform_cpu_ranks"),
            timeout=value("gpuconform_timeout"),
            fresh_ranks=bool(value("gpuconform_fresh_ranks")),
            strict_isolation=bool(value("gpuconform_strict_isolation")),
            rank_logs=_log_directory("--gpuconform-rank-logs", value("gpuconform_rank_logs")),
            tolerances=table,
            cluster=value("gpuconform_cluster"),
            cluster_junit=value("gpuconform_cluster_junit"),
            save_baseline=_writable_file("--gpuconform-save-baseline", save_baseline),
            baseline_path=baseline_path,
            baseline=_read_baseline(baseline_path),
            regression_fraction=value("gpuconform_regression_fraction"),
            peer_fraction=value("gpuconform_peer_fraction"),
            perf_floors=_read_floors(value("gpuconform_perf_floors")),
            spec=_read_spec(value("gpuconform_spec")),
            json_path=_writable_file("--gpuconform-json", value("gpuconform_json")),
            prometheus_path=_writable_file("--gpuconform-prometheus", value("gpuconform_prometheus")),
        )


SETTINGS_KEY: pytest.StashKey[Settings] = pytest.StashKey()


class _Resolver:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def value(self, dest: str) -> Any:
        """Command line, else ini, else the declared default."""
        option = options.BY_DEST[dest]
        given = self.config.getoption(dest)
        if given is not None and given != [] and not (option.action == "store_true" and given is False):
            return given
        if option.ini:
            raw = str(self.config.getini(option.ini)).strip()
            if raw:
                try:
                    return option.parse(raw) if option.parse else raw
                except argparse.ArgumentTypeError as exc:
                    raise pytest.UsageError(f"ini option {option.ini} = {raw!r}: {exc}") from None
        return option.resolved_default()


def _read_floors(path: str | None) -> floors.FloorTable:
    try:
        return floors.load(path)
    except floors.BadFloors as exc:
        raise pytest.UsageError(f"--gpuconform-perf-floors: {exc}") from None


def _read_spec(path: str | None) -> acceptance_spec.Spec | None:
    if not path:
        return None
    try:
        return acceptance_spec.load(path)
    except acceptance_spec.BadSpec as exc:
        raise pytest.UsageError(f"--gpuconform-spec: {exc}") from None


def _read_baseline(path: str | None) -> Mapping[str, float] | None:
    if not path:
        return None
    try:
        return baseline.load(path)
    except baseline.BadBaseline as exc:
        raise pytest.UsageError(f"--gpuconform-baseline: {exc}") from None


def _writable_file(flag: str, path: str | None) -> str | None:
    """A file the run will write at the end: its directory must exist and take files now."""
    if not path:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise pytest.UsageError(f"{flag}: {path} is a directory; give a file name")
    if not os.path.isdir(directory):
        raise pytest.UsageError(f"{flag}: directory of {path} does not exist ({directory})")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise pytest.UsageError(f"{flag}: cannot write {path}: directory {directory} is not writable")
    return path


def _log_directory(flag: str, path: str | None) -> str | None:
    """A directory the ranks will write logs into: made now, so a bad path fails at start."""
    if not path:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise pytest.UsageError(f"{flag}: cannot create {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise pytest.UsageError(f"{flag}: directory {path} is not writable")
    return os.path.abspath(path)
