"""The host around the GPUs: CPU model, cores, memory, OS and kernel.

The core count decides how many gloo ranks a CPU node hosts (``--gpuconform-cpu-ranks``
defaults to it), and a container may be allowed far fewer cores than the host has
(an affinity mask from ``taskset``/Slurm, a cgroup CPU quota from Kubernetes), so the
inventory says both: ``cpu_cores`` (``os.cpu_count()``, what the default uses) and
``cpu_cores_usable`` (affinity, narrowed by a cgroup v2 ``cpu.max`` quota). Everything is
read from /proc, /sys and the standard library; an unreadable fact is "unknown", never an
error. ``root`` points the reader at a copy of those files (tests).
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostFacts:
    cpu_model: str
    cpu_cores: int  # logical CPUs of the machine (os.cpu_count())
    cpu_cores_usable: int  # what this process may run on (affinity, cgroup quota)
    memory_bytes: int  # 0: unknown
    os: str
    kernel: str
    arch: str

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30

    def properties(self) -> list[tuple[str, str]]:
        return [
            ("cpu_model", self.cpu_model),
            ("cpu_cores", str(self.cpu_cores)),
            ("cpu_cores_usable", str(self.cpu_cores_usable)),
            ("host_memory_gib", f"{self.memory_gib:.1f}" if self.memory_bytes else "unknown"),
            ("os", self.os),
            ("kernel", self.kernel),
            ("arch", self.arch),
        ]

    def as_json(self) -> dict:
        return {
            "cpu_model": self.cpu_model,
            "cpu_cores": self.cpu_cores,
            "cpu_cores_usable": self.cpu_cores_usable,
            "host_memory_gib": round(self.memory_gib, 1) if self.memory_bytes else None,
            "os": self.os,
            "kernel": self.kernel,
            "arch": self.arch,
        }

    def header_line(self) -> str:
        usable = "" if self.cpu_cores_usable == self.cpu_cores else f" ({self.cpu_cores_usable} usable)"
        memory = f"{self.memory_gib:.0f} GiB" if self.memory_bytes else "unknown"
        return (
            f"gpuconform: {self.cpu_model}, {self.cpu_cores} CPU cores{usable}, {memory} memory, "
            f"{self.os}, kernel {self.kernel} ({self.arch})"
        )


def _read(root: Path, path: str) -> str:
    try:
        return (root / path.lstrip("/")).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_model(cpuinfo: str) -> str:
    """x86 says ``model name``; Arm servers (Grace) give only implementer and part numbers."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    for key in ("model name", "Model", "Processor", "cpu model"):
        if fields.get(key):
            return fields[key]
    if "CPU implementer" in fields:
        return f"Arm CPU (implementer {fields['CPU implementer']}, part {fields.get('CPU part', '?')})"
    return platform.processor() or "unknown"


def usable_cores(cpu_max: str, affinity: int) -> int:
    """Affinity narrowed by a cgroup v2 quota (``cpu.max``: "<quota> <period>" or "max ...")."""
    parts = cpu_max.split()
    if len(parts) == 2 and parts[0] != "max":
        try:
            quota = math.ceil(int(parts[0]) / int(parts[1]))
        except (ValueError, ZeroDivisionError):
            return affinity
        return max(1, min(affinity, quota))
    return affinity


def memory_bytes(meminfo: str) -> int:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * 1024
    return 0


def os_name(os_release: str) -> str:
    values = {}
    for line in os_release.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"')
    return values.get("PRETTY_NAME") or values.get("NAME") or platform.system() or "unknown"


def read(root: str | Path = "/") -> HostFacts:
    root = Path(root)
    cores = os.cpu_count() or 1
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = cores
    os_release = _read(root, "/etc/os-release") or _read(root, "/usr/lib/os-release")
    return HostFacts(
        cpu_model=cpu_model(_read(root, "/proc/cpuinfo")),
        cpu_cores=cores,
        cpu_cores_usable=usable_cores(_read(root, "/sys/fs/cgroup/cpu.max"), affinity),
        memory_bytes=memory_bytes(_read(root, "/proc/meminfo")),
        os=os_name(os_release),
        kernel=platform.release() or "unknown",
        arch=platform.machine() or "unknown",
    )
