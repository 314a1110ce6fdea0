"""Judging a node against its acceptance spec: one requirement, one line.

The facts come from where the rest of the plugin gets them, never from CUDA: the
inventory (GPU names and memory from NVML, versions from torch), NVML's link readings
(health/readings.py: NVLink states, the PCIe generation and width each GPU can train to)
and the host itself (logical CPUs, physical memory; the inventory's ``cpu_cores`` and
``host_memory_gib`` when it reports them). Every GPU NVML sees counts, not only those in
``CUDA_VISIBLE_DEVICES``: the spec describes the node, and xdist workers see one GPU each.

A problem line says what was expected and what was found, naming each GPU that falls short
by its label (index, UUID, bus id).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..node.nvml import GpuInfo
from .spec import Requirement

PER_GPU_READINGS = {"gpu.nvlinks": "nvlink_up", "gpu.pcie_gen": "pcie_max_gen", "gpu.pcie_width": "pcie_max_width"}
VERSIONS = {
    "software.driver": "driver",
    "software.cuda": "torch_cuda",
    "software.driver_cuda": "driver_cuda",
    "software.nccl": "nccl",
    "software.torch": "torch",
}


@dataclass
class NodeFacts:
    gpus: tuple[GpuInfo, ...]
    nvml_status: str  # ok | absent | error
    nvml_message: str
    versions: Mapping[str, str]  # driver, torch_cuda, driver_cuda, nccl, torch ("" = none)
    readings: Mapping[str, Mapping]  # GPU UUID -> NVML values (readings.GpuHealth.values)
    readings_error: str = ""
    cpu_cores: int | None = None
    host_memory_gib: float | None = None
    not_applicable: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def no_gpu_text(self) -> str:
        return f"found no GPU ({self.nvml_message or 'NVML sees none'})"


def host_cpu_cores() -> int | None:
    return os.cpu_count()


def host_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _per_gpu(requirement: Requirement, facts: NodeFacts) -> str | None:
    key = requirement.key
    expected = requirement.expected_text()
    if not facts.gpus:
        return f"{key}: expected {expected} per GPU, {facts.no_gpu_text()}"
    short = []
    for gpu in facts.gpus:
        found, shown = _gpu_value(key, gpu, facts)
        if found is None:
            short.append(f"{gpu.label()}: {shown}")
        elif not requirement.allows(found):
            short.append(f"{gpu.label()} ({gpu.name}): {shown}")
    if not short:
        return None
    return f"{key}: expected {expected} per GPU; " + "; ".join(short)


def _gpu_value(key: str, gpu: GpuInfo, facts: NodeFacts) -> tuple[float | str | None, str]:
    """(the value to judge, how it reads in the message); None when it cannot be read."""
    if key == "gpu.model":
        return gpu.name, repr(gpu.name)
    if key == "gpu.memory_gib":
        return gpu.memory_gib, f"{gpu.memory_gib:.1f} GiB"
    if key == "gpu.compute_capability":
        text = "{}.{}".format(*gpu.compute_capability)
        return text, f"compute capability {text}"
    counter = PER_GPU_READINGS[key]
    values = facts.readings.get(gpu.uuid)
    if values is None:
        return None, f"not read through NVML ({facts.readings_error or 'no reading'})"
    if counter not in values:
        why = facts.not_applicable.get(gpu.uuid, {}).get(counter.split("_")[0] if key == "gpu.nvlinks" else counter)
        if key == "gpu.nvlinks":
            return 0, f"0 NVLinks ({why or 'NVML reports no NVLink'})"
        return None, f"{counter} not readable ({why or 'NVML gave no value'})"
    if key == "gpu.nvlinks":
        states = list(values[counter])
        return sum(states), f"{sum(states)} of {len(states)} NVLinks active"
    value = values[counter]
    return value, f"{'gen' if key == 'gpu.pcie_gen' else 'x'}{value}"


def problem(requirement: Requirement, facts: NodeFacts) -> str | None:
    """None when the node meets ``requirement``, else one line: expected vs found."""
    key = requirement.key
    expected = requirement.expected_text()
    if key == "gpu.count":
        found = len(facts.gpus)
        if requirement.allows(found):
            return None
        detail = "" if facts.nvml_status == "ok" else f" ({facts.nvml_message})"
        names = ", ".join(sorted({g.name for g in facts.gpus}))
        return f"{key}: expected {expected} GPU(s), found {found}{': ' + names if names else ''}{detail}"
    if key.startswith("gpu."):
        return _per_gpu(requirement, facts)
    if key in VERSIONS:
        found_text = facts.versions.get(VERSIONS[key]) or ""
        if found_text and requirement.allows(found_text):
            return None
        return f"{key}: expected {expected}, found {found_text or 'none'}"
    if key == "host.cpu_cores":
        cores = facts.cpu_cores
        if cores is not None and requirement.allows(cores):
            return None
        return f"{key}: expected {expected} logical CPUs, found {'unknown' if cores is None else cores}"
    if key == "host.memory_gib":
        memory = facts.host_memory_gib
        if memory is not None and requirement.allows(memory):
            return None
        return f"{key}: expected {expected} GiB, found {'unknown' if memory is None else _fmt(memory) + ' GiB'}"
    raise AssertionError(f"no judge for {key}")  # spec.FIELDS and this module disagree
