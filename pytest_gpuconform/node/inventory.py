"""The node inventory: software versions and GPUs, for the header, JUnit and `gpuconform inventory`.

Collected in the controller. torch is imported (that does not create a CUDA context) but no
CUDA call is made; GPU facts come from NVML (see nvml.py), the host's from host.py. Collected
once per run, in the enabled plugin's ``pytest_configure``, and kept in
``config.stash[INVENTORY_KEY]``.

Property names are a contract with reports and baselines: existing names keep their
meaning, new facts get new names. Per visible device the prefix is ``gpu<NVML index>``
(``gpu<index>_mig<n>`` for a MIG device), so a property names the same board whatever
CUDA's order; ``cuda_visible_devices``, ``cuda_device_order`` and ``gpu_mapping`` say how
the visible list was decided.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import pytest

from . import host as host_info
from . import nvml
from .labels import host_name


@dataclass(frozen=True)
class Inventory:
    host: str
    python: str
    torch: str
    torch_cuda: str  # CUDA toolkit torch was built with, "" for CPU builds
    cudnn: str
    nccl: str
    gloo: bool
    node: nvml.NodeGpus
    host_facts: host_info.HostFacts | None = None
    cuda_visible_devices: str | None = None  # as the run found it (None: unset)
    cuda_device_order: str = ""

    def _mapping(self) -> str:
        if self.node.visible_note:
            return ("exact: " if self.node.visible_exact else "uncertain: ") + self.node.visible_note
        return "exact"

    def properties(self) -> list[tuple[str, str]]:
        """Flat name/value pairs: JUnit <testsuite> properties and the JSON's first level."""
        props = [
            ("host", self.host),
            ("python", self.python),
            ("torch", self.torch),
            ("torch_cuda", self.torch_cuda or "none"),
            ("cudnn", self.cudnn or "none"),
            ("nccl", self.nccl or "none"),
            ("gloo", str(self.gloo).lower()),
            ("nvml", self.node.status),
            ("nvml_message", self.node.message),
            ("driver", self.node.driver_version or "none"),
            ("driver_cuda", self.node.cuda_driver_version or "none"),
            ("gpu_count", str(self.node.count)),
        ]
        if self.host_facts is not None:
            props += self.host_facts.properties()
        props += [
            ("cuda_visible_devices", "unset" if self.cuda_visible_devices is None else self.cuda_visible_devices),
            ("cuda_device_order", self.cuda_device_order or "unset (FASTEST_FIRST)"),
            ("gpu_mapping", self._mapping()),
        ]
        for ordinal, gpu in enumerate(self.node.visible):
            prefix = gpu.key
            props += [
                (f"{prefix}_name", gpu.name),
                (f"{prefix}_uuid", gpu.uuid),
                (f"{prefix}_pci_bus_id", gpu.pci_bus_id),
                (f"{prefix}_memory_gib", f"{gpu.memory_gib:.1f}"),
                (f"{prefix}_compute_capability", "{}.{}".format(*gpu.compute_capability)),
                (f"{prefix}_cuda_ordinal", str(ordinal)),
            ]
            if gpu.is_mig:
                props.append((f"{prefix}_parent_uuid", gpu.parent_uuid))
        return props

    def as_json(self) -> dict:
        """The properties' facts with JSON types, the per-GPU lists nested."""
        return {
            "host": self.host,
            **(self.host_facts.as_json() if self.host_facts is not None else {}),
            "python": self.python,
            "torch": self.torch,
            "torch_cuda": self.torch_cuda or None,
            "cudnn": self.cudnn or None,
            "nccl": self.nccl or None,
            "gloo": self.gloo,
            "nvml": {"status": self.node.status, "message": self.node.message},
            "driver": self.node.driver_version or None,
            "driver_cuda": self.node.cuda_driver_version or None,
            "gpus": [g.as_dict() for g in self.node.visible],
            "cuda_visible_devices": self.cuda_visible_devices,
            "cuda_device_order": self.cuda_device_order or None,
            "gpu_mapping": self._mapping(),
            "all_gpus": [g.as_dict() for g in self.node.gpus],
            "mig_devices": [g.as_dict() for g in self.node.migs],
        }

    def header_lines(self) -> list[str]:
        lines = [
            f"gpuconform: host {self.host}, torch {self.torch} (CUDA {self.torch_cuda or 'none'}, "
            f"cuDNN {self.cudnn or 'none'}, NCCL {self.nccl or 'none'}, gloo {'yes' if self.gloo else 'no'})",
        ]
        if self.host_facts is not None:
            lines.append(self.host_facts.header_line())
        if self.node.status == "ok":
            lines.append(f"gpuconform: {self.node.message}, {self.node.count} visible")
            lines += [f"gpuconform:   cuda:{i} = {g.describe()}" for i, g in enumerate(self.node.visible)]
            if self.node.visible_note:
                lines.append(f"gpuconform:   GPU mapping {self._mapping()}")
        elif self.node.status == "absent":
            lines.append(f"gpuconform: CPU node: {self.node.message}")
        else:
            lines.append(f"gpuconform: NVML ERROR: {self.node.message}")
        return lines


def _torch_versions() -> tuple[str, str, str, str, bool]:
    try:
        import torch
    except ImportError as exc:
        return f"not importable ({exc})", "", "", "", False
    cudnn = ""
    try:
        version = torch.backends.cudnn.version()
        cudnn = str(version) if version else ""
    except Exception:  # a CPU build or a broken cuDNN: reported as "none"
        cudnn = ""
    nccl = ""
    try:
        if torch.distributed.is_available() and torch.distributed.is_nccl_available():
            raw = torch.cuda.nccl.version()
            nccl = ".".join(map(str, raw)) if isinstance(raw, tuple) else str(raw)
    except Exception:  # NCCL missing or unloadable: "none" here; test_nccl_available fails on GPU nodes
        nccl = ""
    gloo = bool(torch.distributed.is_available() and torch.distributed.is_gloo_available())
    return torch.__version__, torch.version.cuda or "", cudnn, nccl, gloo


INVENTORY_KEY: pytest.StashKey[Inventory] = pytest.StashKey()


def collect(node: nvml.NodeGpus | None = None) -> Inventory:
    node = nvml.query() if node is None else node
    torch_version, torch_cuda, cudnn, nccl, gloo = _torch_versions()
    return Inventory(
        host_facts=host_info.read(),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        cuda_device_order=os.environ.get("CUDA_DEVICE_ORDER", ""),
        host=host_name(),
        python=platform.python_version(),
        torch=torch_version,
        torch_cuda=torch_cuda,
        cudnn=cudnn,
        nccl=nccl,
        gloo=gloo,
        node=node,
    )
