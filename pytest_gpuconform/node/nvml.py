"""What NVML says about this node's GPUs, without ever creating a CUDA context.

The controller process must not initialise CUDA (it would poison forked children and pin
memory on GPU 0), so every GPU fact used for scheduling and skipping comes from here.

Three outcomes, kept distinct because operators act on them differently:

* ``ok``: the driver answered; ``gpus`` lists every board.
* ``absent``: no NVIDIA driver (library missing or kernel module not loaded): a CPU node.
* ``error``: the driver is there but broken, e.g. the user-space library and kernel module
  differ after an upgrade without reboot. That is a failed environment check, not a CPU node.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from .labels import gpu_label


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML index: physical order, ignores CUDA_VISIBLE_DEVICES
    name: str
    uuid: str
    pci_bus_id: str
    memory_total_bytes: int
    compute_capability: tuple[int, int]

    @property
    def memory_gib(self) -> float:
        return self.memory_total_bytes / 2**30

    @property
    def has_bf16(self) -> bool:
        """bf16 tensor-core maths arrived with Ampere (compute capability 8.0)."""
        return self.compute_capability >= (8, 0)

    def label(self) -> str:
        """``GPU 0 (GPU-..., bus 00000000:18:00.0)``: see labels.py."""
        return gpu_label(self.index, self.uuid, self.pci_bus_id)

    def describe(self) -> str:
        """The label with the model, memory and compute capability (header, skip reasons)."""
        major, minor = self.compute_capability
        return f"{self.label()}: {self.name}, {self.memory_gib:.0f} GiB, cc {major}.{minor}"

    def as_dict(self) -> dict:
        data = asdict(self)
        data["compute_capability"] = ".".join(map(str, self.compute_capability))
        return data


@dataclass(frozen=True)
class NodeGpus:
    status: str  # "ok" | "absent" | "error"
    message: str = ""
    driver_version: str = ""
    cuda_driver_version: str = ""  # highest CUDA version the driver supports, "12.4"
    gpus: tuple[GpuInfo, ...] = ()
    visible: tuple[GpuInfo, ...] = field(default=())  # after CUDA_VISIBLE_DEVICES

    @property
    def count(self) -> int:
        return len(self.visible)


class NvmlUnavailable(RuntimeError):
    """NVML cannot be asked: ``status`` is "absent" (no driver: a CPU node) or "error"
    (the driver is there but broken: a failed environment check)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_MISMATCH_HINT = (
    ": the NVIDIA kernel module and user-space library differ; reboot the node "
    "(or reload the driver) after a driver upgrade"
)


@contextmanager
def nvml_session() -> Iterator[Any]:
    """``with nvml_session() as pynvml:`` NVML initialised for the block, shut down after it.

    NVML counts its initialisations, so sessions may nest (the health watch holds one for
    the whole run while others come and go). Raises ``NvmlUnavailable``, classified.
    """
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("absent", "nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
    absent = tuple(
        getattr(pynvml, name)
        for name in ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded", "NVMLError_NoDevice")
        if hasattr(pynvml, name)
    )
    try:
        pynvml.nvmlInit()
    except absent as exc:
        raise NvmlUnavailable("absent", f"no NVIDIA driver ({exc})") from None
    except pynvml.NVMLError as exc:
        hint = _MISMATCH_HINT if type(exc).__name__ == "NVMLError_LibRmVersionMismatch" else ""
        raise NvmlUnavailable("error", f"nvmlInit failed: {exc}{hint}") from None
    try:
        yield pynvml
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def text(value: Any) -> str:
    """NVML strings arrive as bytes from older bindings and as str from newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def _read_gpu(pynvml, index: int) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    return GpuInfo(
        index=index,
        name=text(pynvml.nvmlDeviceGetName(handle)),
        uuid=text(pynvml.nvmlDeviceGetUUID(handle)),
        pci_bus_id=text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
        memory_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
        compute_capability=(int(major), int(minor)),
    )


def visible_gpus(gpus: tuple[GpuInfo, ...], cuda_visible_devices: str | None) -> tuple[GpuInfo, ...]:
    """Apply CUDA_VISIBLE_DEVICES the way the CUDA runtime does.

    Integer tokens are NVML indices (we set CUDA_DEVICE_ORDER=PCI_BUS_ID, NVML's order);
    ``GPU-`` tokens match a UUID prefix. As in CUDA, the list stops at the first token
    that names no device, and an empty string hides every GPU.
    """
    if cuda_visible_devices is None:
        return gpus
    chosen: list[GpuInfo] = []
    for token in (t.strip() for t in cuda_visible_devices.split(",")):
        if not token:
            break
        if token.lstrip("-").isdigit():
            match = [g for g in gpus if g.index == int(token)]
        else:
            match = [g for g in gpus if g.uuid.startswith(token)]
        if len(match) != 1 or match[0] in chosen:
            break
        chosen.append(match[0])
    return tuple(chosen)


def query(environ: Mapping[str, str] | None = None) -> NodeGpus:
    """Ask NVML for the node's GPUs. Never raises: a broken driver is reported, not thrown."""
    environ = os.environ if environ is None else environ
    try:
        with nvml_session() as pynvml:
            try:
                driver = text(pynvml.nvmlSystemGetDriverVersion())
                cuda = _cuda_version(int(pynvml.nvmlSystemGetCudaDriverVersion()))
                gpus = tuple(_read_gpu(pynvml, i) for i in range(int(pynvml.nvmlDeviceGetCount())))
            except pynvml.NVMLError as exc:
                return NodeGpus("error", f"NVML query failed: {exc}")
    except NvmlUnavailable as exc:
        return NodeGpus(exc.status, exc.message)
    return NodeGpus(
        "ok",
        f"driver {driver}, CUDA {cuda}, {len(gpus)} GPU(s)",
        driver_version=driver,
        cuda_driver_version=cuda,
        gpus=gpus,
        visible=visible_gpus(gpus, environ.get("CUDA_VISIBLE_DEVICES")),
    )
