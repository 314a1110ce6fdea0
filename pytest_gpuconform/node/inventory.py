"""The node inventory: software versions and GPUs, for the header, JUnit and `gpuconform inventory`.

Collected in the controller. torch is imported (that does not create a CUDA context) but no
CUDA call is made; GPU facts come from NVML (see nvml.py). Collected once per run, in
the enabled plugin's ``pytest_configure``, and kept in ``config.stash[INVENTORY_KEY]``.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import pytest

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
        for gpu in self.node.visible:
            prefix = f"gpu{gpu.index}"
            props += [
                (f"{prefix}_name", gpu.name),
                (f"{prefix}_uuid", gpu.uuid),
                (f"{prefix}_pci_bus_id", gpu.pci_bus_id),
                (f"{prefix}_memory_gib", f"{gpu.memory_gib:.1f}"),
                (f"{prefix}_compute_capability", "{}.{}".format(*gpu.compute_capability)),
            ]
        return props

    def as_json(self) -> dict:
        return {
            "host": self.host,
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
        }

    def header_lines(self) -> list[str]:
        lines = [
            f"gpuconform: host {self.host}, torch {self.torch} (CUDA {self.torch_cuda or 'none'}, "
            f"cuDNN {self.cudnn or 'none'}, NCCL {self.nccl or 'none'}, gloo {'yes' if self.gloo else 'no'})",
        ]
        if self.node.status == "ok":
            lines.append(f"gpuconform: {self.node.message}, {self.node.count} visible")
            lines += [f"gpuconform:   {g.describe()}" for g in self.node.visible]
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
        host=host_name(),
        python=platform.python_version(),
        torch=torch_version,
        torch_cuda=torch_cuda,
        cudnn=cudnn,
        nccl=nccl,
        gloo=gloo,
        node=node,
    )
