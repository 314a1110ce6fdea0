"""``--gpuconform-prometheus FILE``: this node's results for node_exporter's textfile collector.

Point it into the collector's directory (``--collector.textfile.directory``, e.g.
``/var/lib/node_exporter/textfile_collector/gpuconform.prom``); the file is replaced
atomically (junit.AtomicOutput), as the collector's documentation asks, so a scrape never
reads half a file. node_exporter adds ``instance``; the metrics carry no host label
except ``gpuconform_node_info``. Alert on ``gpuconform_node_passed == 0 or
gpuconform_node_verified == 0``, or ``gpuconform_check_passed == 0`` for one check.

Metrics (all gauges):

* ``gpuconform_node_passed``: 1 when no check failed, else 0.
* ``gpuconform_node_verified``: 1 when the run verified the node: its GPUs were checked, or
  it is a CPU node under a spec that declares no GPUs; a GPU node whose driver is missing
  passes as a CPU node but is 0 here. Alert on either being 0.
* ``gpuconform_node_verdict{verdict}``: 1 for this run's verdict (passed, failed, cpu:
  passed as a CPU node, nothing: no check ran), 0 for the others.
* ``gpuconform_node_info{host,gpus,driver,cuda,torch,nccl,spec}``: 1, the inventory as labels.
* ``gpuconform_checks{outcome}``: how many checks had each outcome.
* ``gpuconform_check_passed{check,area}``: 1 passed, 0 failed or errored; skipped checks
  are ``gpuconform_check_skipped{check,area}`` 1 instead.
* ``gpuconform_measure{check,area,name}`` and ``gpuconform_measure_bound{check,area,name,kind}``:
  every numeric recorded number and its bound (naming rule); NaN is written as NaN.
* ``gpuconform_gpu_health{gpu,uuid,pci_bus_id,counter}``: the NVML health counters of each
  GPU at the start of the run (health/readings.py; booleans as 0/1, NVLinks as the count up).
* ``gpuconform_run_timestamp_seconds``, ``gpuconform_run_duration_seconds``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping

from ..acceptance.verdict import WORDS, Verdict
from ..health.readings import GpuHealth
from .measures import measures
from .outcomes import CaseOutcome

PREFIX = "gpuconform_"
HELP = {
    "node_passed": "1 when no gpuconform check failed on this node, else 0.",
    "node_verified": "1 when the run verified this node (GPUs checked, or a CPU node under a spec without GPUs).",
    "node_verdict": "1 for the verdict of the last gpuconform run (cpu: passed as a CPU node; nothing: no check ran).",
    "node_info": "Inventory of the node as labels (value always 1).",
    "checks": "Number of gpuconform checks by outcome in the last run.",
    "check_passed": "1 when the check passed, 0 when it failed or errored (skipped checks: gpuconform_check_skipped).",
    "check_skipped": "1 for a check that was skipped in the last run.",
    "measure": "A number recorded by a check (record(name, value)).",
    "measure_bound": "The bound of a recorded number (kind upper: value <= bound; lower: value >= bound).",
    "gpu_health": "NVML health counter of a GPU at the start of the run.",
    "run_timestamp_seconds": "When the run finished (Unix time).",
    "run_duration_seconds": "Wall time of the run.",
}


def escape(value: object) -> str:
    """A label value in the exposition format: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class TextFile:
    """Samples grouped by metric, each metric with its HELP and TYPE lines once."""

    def __init__(self) -> None:
        self.samples: dict[str, list[str]] = {}

    def add(self, metric: str, labels: Mapping[str, object], value: float) -> None:
        name = PREFIX + metric
        text = ",".join(f'{key}="{escape(val)}"' for key, val in labels.items())
        self.samples.setdefault(metric, []).append(
            f"{name}{{{text}}} {number(value)}" if text else f"{name} {number(value)}"
        )

    def text(self) -> str:
        lines = []
        for metric, samples in self.samples.items():
            lines.append(f"# HELP {PREFIX}{metric} {HELP[metric]}")
            lines.append(f"# TYPE {PREFIX}{metric} gauge")
            lines.extend(dict.fromkeys(samples))  # a repeated sample (same labels) is written once
        return "\n".join(lines) + "\n"


def _health_value(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return float(sum(bool(v) for v in value))
    return None


def textfile(
    facts: Mapping[str, str],
    verdict: Verdict,
    tests: Iterable[tuple[CaseOutcome, str, str]],
    health: Iterable[GpuHealth] = (),
    duration: float = 0.0,
    now: float | None = None,
) -> str:
    """The textfile. ``tests``: (outcome, check id, area); ``health``: readings.GpuHealth."""
    out = TextFile()
    out.add("node_passed", {}, 0 if verdict.kind == "failed" else 1)
    out.add("node_verified", {}, 1 if verdict.verified else 0)
    for kind in WORDS:
        out.add("node_verdict", {"verdict": kind}, 1 if kind == verdict.kind else 0)
    gpus = ", ".join(
        f"{facts[k]}"
        for k in sorted(facts, key=lambda k: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", k)])
        if re.fullmatch(r"gpu\d+_name", k)
    )
    info = {
        "host": facts.get("host", ""),
        "gpus": gpus or "none",
        "driver": facts.get("driver", "none"),
        "cuda": facts.get("torch_cuda", "none"),
        "torch": facts.get("torch", ""),
        "nccl": facts.get("nccl", "none"),
        "spec": facts.get("spec", ""),
    }
    out.add("node_info", info, 1)
    counts = dict.fromkeys(("passed", "failed", "error", "skipped"), 0)
    checks = []
    for test, check, area in tests:
        counts[test.outcome] += 1
        checks.append((test, check, area))
    for outcome, count in counts.items():
        out.add("checks", {"outcome": outcome}, count)
    for test, check, area in checks:
        labels = {"check": check, "area": area}
        if test.outcome == "skipped":
            out.add("check_skipped", labels, 1)
        else:
            out.add("check_passed", labels, 1 if test.outcome == "passed" else 0)
    for test, check, area in checks:
        for measure in measures(test.properties):
            labels = {"check": check, "area": area, "name": measure.name}
            out.add("measure", labels, measure.value)
            if measure.bound is not None:
                out.add("measure_bound", {**labels, "kind": measure.kind}, measure.bound)
    for gpu in health:
        for counter, value in sorted(gpu.values.items()):
            number_value = _health_value(value)
            if number_value is not None:
                labels = {"gpu": str(gpu.index), "uuid": gpu.uuid, "pci_bus_id": gpu.pci_bus_id, "counter": counter}
                out.add("gpu_health", labels, number_value)
    out.add("run_timestamp_seconds", {}, time.time() if now is None else now)
    out.add("run_duration_seconds", {}, duration)
    return out.text()
