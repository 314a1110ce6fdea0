"""How every message, report line and baseline names a GPU, and how reports name the node.

An operator pulls a board by its PCI bus id and matches it in NVML and DCGM by its UUID;
the index alone is ambiguous (NVML counts in PCI order, CUDA fastest first). So a GPU is
always ``GPU <index> (<uuid>, bus <pci bus id>)``, with the NVML index.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def gpu_label(index: int | str, uuid: str, pci_bus_id: str) -> str:
    return f"GPU {index} ({uuid}, bus {pci_bus_id})"


def cuda_ordinal_label(ordinal: int, uuid: str) -> str:
    """A GPU CUDA sees but NVML did not list (a container that hides NVML devices)."""
    return gpu_label(f"cuda:{ordinal}", uuid, "unknown")


def host_name(environ: Mapping[str, str] | None = None) -> str:
    """This node's name in reports: ``GPUCONFORM_HOST`` when set (a container's hostname
    may be meaningless), else the hostname."""
    environ = os.environ if environ is None else environ
    return environ.get("GPUCONFORM_HOST") or socket.gethostname()
