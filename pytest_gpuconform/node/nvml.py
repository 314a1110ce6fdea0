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

from . import identity
from .labels import gpu_label


@dataclass(frozen=True)
class GpuInfo:
    """A board, or a MIG device on one (``parent_uuid`` set, ``uuid`` is ``MIG-...``)."""

    index: int  # NVML index (of the parent board for a MIG device): PCI order, ignores CUDA_VISIBLE_DEVICES
    name: str
    uuid: str
    pci_bus_id: str
    memory_total_bytes: int
    compute_capability: tuple[int, int]
    parent_uuid: str = ""  # MIG devices: the board they live on
    mig_enabled: bool = False  # boards: MIG mode is on (CUDA then sees its MIG devices, not the board)
    mig_slot: tuple[int, int] | None = None  # MIG devices: (GPU instance id, compute instance id)
    mig_index: int | None = None  # MIG devices: NVML's index of the MIG device on its board

    @property
    def is_mig(self) -> bool:
        return bool(self.parent_uuid)

    @property
    def board_uuid(self) -> str:
        """The physical board: health counters, ECC and links belong to it, not to a MIG slice."""
        return self.parent_uuid or self.uuid

    @property
    def key(self) -> str:
        """Prefix of this device's inventory properties: ``gpu3`` or ``gpu3_mig1``."""
        return f"gpu{self.index}" if self.mig_index is None else f"gpu{self.index}_mig{self.mig_index}"

    @property
    def memory_gib(self) -> float:
        return self.memory_total_bytes / 2**30

    @property
    def has_bf16(self) -> bool:
        """bf16 tensor-core maths arrived with Ampere (compute capability 8.0)."""
        return self.compute_capability >= (8, 0)

    def label(self) -> str:
        """``GPU 0 (GPU-..., bus 00000000:18:00.0)``, ``GPU 0 MIG 1 (MIG-..., bus ...)``: see labels.py."""
        where = self.index if self.mig_index is None else f"{self.index} MIG {self.mig_index}"
        return gpu_label(where, self.uuid, self.pci_bus_id)

    def describe(self) -> str:
        """The label with the model, memory and compute capability (header, skip reasons)."""
        major, minor = self.compute_capability
        return f"{self.label()}: {self.name}, {self.memory_gib:.0f} GiB, cc {major}.{minor}"

    def as_dict(self) -> dict:
        data = asdict(self)
        data["compute_capability"] = ".".join(map(str, self.compute_capability))
        data["mig_slot"] = list(self.mig_slot) if self.mig_slot else None
        return data


@dataclass(frozen=True)
class NodeGpus:
    status: str  # "ok" | "absent" | "error"
    message: str = ""
    driver_version: str = ""
    cuda_driver_version: str = ""  # highest CUDA version the driver supports, "12.4"
    gpus: tuple[GpuInfo, ...] = ()  # boards, in NVML index order
    visible: tuple[GpuInfo, ...] = field(default=())  # what CUDA sees, in CUDA ordinal order (identity.py)
    migs: tuple[GpuInfo, ...] = ()  # MIG devices of boards in MIG mode
    visible_exact: bool = True  # False: NVML and CUDA could not pin down `visible` for sure
    visible_note: str = ""  # how `visible` was decided when it was not plain

    @property
    def count(self) -> int:
        return len(self.visible)

    @property
    def devices(self) -> tuple[GpuInfo, ...]:
        """Boards and MIG devices: everything a UUID from CUDA may name."""
        return self.gpus + self.migs

    def find(self, uuid: str) -> GpuInfo | None:
        """The board or MIG device with this UUID, in any prefix form (``GPU-``, ``MIG-``, bare)."""
        return identity.find(self.devices, uuid)


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


def _mig_mode(pynvml, handle) -> bool:
    """MIG mode of a board; boards without MIG (before Ampere, consumer cards) say NotSupported."""
    function = getattr(pynvml, "nvmlDeviceGetMigMode", None)
    if function is None:
        return False
    try:
        current, _pending = function(handle)
    except pynvml.NVMLError:
        return False
    return int(current) == int(getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1))


def _read_gpu(pynvml, index: int) -> tuple[GpuInfo, tuple[GpuInfo, ...]]:
    """A board and, when it is in MIG mode, its MIG devices."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    board = GpuInfo(
        index=index,
        name=text(pynvml.nvmlDeviceGetName(handle)),
        uuid=text(pynvml.nvmlDeviceGetUUID(handle)),
        pci_bus_id=text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
        memory_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
        compute_capability=(int(major), int(minor)),
        mig_enabled=_mig_mode(pynvml, handle),
    )
    return board, (_read_migs(pynvml, handle, board) if board.mig_enabled else ())


def _read_migs(pynvml, handle, board: GpuInfo) -> tuple[GpuInfo, ...]:
    """The MIG devices that exist on a board in MIG mode (empty slots answer NotFound)."""
    found = []
    for slot in range(int(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except pynvml.NVMLError:
            continue
        found.append(
            GpuInfo(
                index=board.index,
                name=text(pynvml.nvmlDeviceGetName(mig)),
                uuid=text(pynvml.nvmlDeviceGetUUID(mig)),
                pci_bus_id=board.pci_bus_id,
                memory_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(mig).total),
                compute_capability=board.compute_capability,
                parent_uuid=board.uuid,
                mig_slot=(int(pynvml.nvmlDeviceGetGpuInstanceId(mig)), int(pynvml.nvmlDeviceGetComputeInstanceId(mig))),
                mig_index=slot,
            )
        )
    return tuple(found)


def query(environ: Mapping[str, str] | None = None, ask_cuda=None) -> NodeGpus:
    """Ask NVML for the node's GPUs. Never raises: a broken driver is reported, not thrown.

    ``visible`` is what a CUDA process with ``environ`` sees (identity.py). When NVML alone
    cannot say (different models under FASTEST_FIRST, MIG), ``ask_cuda()`` (default: a
    child process, probe.cuda_uuids) gives CUDA's own list of UUIDs.
    """
    environ = os.environ if environ is None else environ
    try:
        with nvml_session() as pynvml:
            try:
                driver = text(pynvml.nvmlSystemGetDriverVersion())
                cuda = _cuda_version(int(pynvml.nvmlSystemGetCudaDriverVersion()))
                read = [_read_gpu(pynvml, i) for i in range(int(pynvml.nvmlDeviceGetCount()))]
            except pynvml.NVMLError as exc:
                return NodeGpus("error", f"NVML query failed: {exc}")
    except NvmlUnavailable as exc:
        return NodeGpus(exc.status, exc.message)
    gpus = tuple(board for board, _ in read)
    migs = tuple(mig for _, board_migs in read for mig in board_migs)
    visible = identity.resolve(gpus, migs, environ)
    if not visible.exact:
        if ask_cuda is None:
            from .probe import cuda_uuids

            ask_cuda = lambda: cuda_uuids(environ)  # noqa: E731
        visible = identity.with_cuda_answer(visible, gpus + migs, ask_cuda())
    mig_note = f", {len(migs)} MIG device(s)" if migs else ""
    return NodeGpus(
        "ok",
        f"driver {driver}, CUDA {cuda}, {len(gpus)} GPU(s){mig_note}",
        driver_version=driver,
        cuda_driver_version=cuda,
        gpus=gpus,
        visible=visible.devices,
        migs=migs,
        visible_exact=visible.exact,
        visible_note=visible.note,
    )
