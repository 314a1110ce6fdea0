"""Read each GPU's health counters through NVML and return plain data.

NVML only (no CUDA context), so this runs in the pytest process. Judging the numbers is
rules.py's job; this module only asks and writes down the answers, in three kinds:

* a value (``values``);
* not applicable (``not_applicable``): the card or driver does not offer the counter
  (``NotSupported``: no ECC on GeForce, row remapping only on Ampere+ datacenter parts,
  retired pages only before Ampere, no NVLink on PCIe cards, no NVSwitch fabric outside
  HGX/NVL systems), the container may not read it (``NoPermission``), or the driver
  predates the call (``FunctionNotFound``). Never a failure;
* an NVML error (``errors``): anything else (``GpuIsLost``, ``Unknown``) is itself a
  finding and fails the check that needed the counter.

Where NVML renamed a call, the new name is tried first and the deprecated one second, so
the same code works on drivers from before and after the rename (clocks "event" reasons
were "throttle" reasons before r535; the old name goes away with CUDA 14).

What an H100 or H200 (Hopper) answers: volatile and aggregate ECC counts and row
remapping (``nvmlDeviceGetRemappedRows``) are supported; page retirement is not
(``nvmlDeviceGetRetiredPagesPendingStatus`` says NotSupported on Ampere and later, whose
HBM is repaired by row remapping instead), so that counter is not applicable there and
the remap counters carry the memory-repair verdict. On HGX boards the NVSwitch fabric
state (``nvmlDeviceGetGpuFabricInfo``, Hopper and later) must be "completed": until the
fabric manager has registered a GPU, CUDA fails to initialise on it. Each counter is read
on its own, so one NotSupported never hides the others.

Health belongs to boards: a MIG device is read through its parent board
(``GpuInfo.board_uuid``), whose ECC, remap, link and XID counters it shares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..node.labels import gpu_label
from ..node.nvml import NvmlUnavailable, nvml_session, text

NOT_APPLICABLE_ERRORS = ("NVMLError_NotSupported", "NVMLError_NoPermission", "NVMLError_FunctionNotFound")


@dataclass
class GpuHealth:
    index: int
    uuid: str
    pci_bus_id: str
    name: str
    values: dict = field(default_factory=dict)
    not_applicable: dict = field(default_factory=dict)  # counter -> why ("NotSupported")
    errors: dict = field(default_factory=dict)  # counter -> NVML error text

    def label(self) -> str:
        """How every message names a GPU: index, UUID and PCI bus id (node/labels.py)."""
        return gpu_label(self.index, self.uuid, self.pci_bus_id)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GpuHealth:
        return cls(**data)


class _Reader:
    """Reads one GPU, sorting every answer into value / not applicable / error."""

    def __init__(self, pynvml, handle, health: GpuHealth) -> None:
        self.pynvml, self.handle, self.health = pynvml, handle, health

    def _is_not_applicable(self, exc: Exception) -> bool:
        return any(type(exc).__name__ == name or _is_instance(self.pynvml, exc, name) for name in NOT_APPLICABLE_ERRORS)

    def call(self, counter: str, function_names: tuple[str, ...], *args):
        """Call the first of ``function_names`` this binding and driver have; None if none."""
        last: Exception | None = None
        for name in function_names:
            function = getattr(self.pynvml, name, None)
            if function is None:  # binding older than the call
                last = AttributeError(f"pynvml has no {name}")
                continue
            try:
                return function(self.handle, *args)
            except self.pynvml.NVMLError as exc:
                if type(exc).__name__ == "NVMLError_FunctionNotFound":
                    last = exc
                    continue
                if self._is_not_applicable(exc):
                    self.health.not_applicable[counter] = str(exc) or type(exc).__name__
                else:
                    self.health.errors[counter] = f"{type(exc).__name__}: {exc}"
                return None
        self.health.not_applicable[counter] = f"FunctionNotFound ({last})"
        return None

    def put(self, counter: str, value) -> None:
        if value is not None:
            self.health.values[counter] = value


def _is_instance(pynvml, exc: Exception, class_name: str) -> bool:
    cls = getattr(pynvml, class_name, None)
    return isinstance(cls, type) and isinstance(exc, cls)


def _read_ecc(r: _Reader) -> None:
    p = r.pynvml
    mode = r.call("ecc_mode", ("nvmlDeviceGetEccMode",))
    if mode is not None:
        r.put("ecc_mode", int(mode[0]))
    for counter, error_type, counter_type in (
        ("ecc_uncorrected_volatile", p.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, p.NVML_VOLATILE_ECC),
        ("ecc_corrected_volatile", p.NVML_MEMORY_ERROR_TYPE_CORRECTED, p.NVML_VOLATILE_ECC),
        ("ecc_uncorrected_aggregate", p.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, p.NVML_AGGREGATE_ECC),
    ):
        value = r.call(counter, ("nvmlDeviceGetTotalEccErrors",), error_type, counter_type)
        r.put(counter, None if value is None else int(value))


def _read_memory_repair(r: _Reader) -> None:
    rows = r.call("row_remap", ("nvmlDeviceGetRemappedRows",))
    if rows is not None:
        corrected, uncorrected, pending, failure = (int(v) for v in rows)
        r.put("remapped_rows_correctable", corrected)
        r.put("remapped_rows_uncorrectable", uncorrected)
        r.put("row_remap_pending", bool(pending))
        r.put("row_remap_failure", bool(failure))
    pending = r.call("retired_pages_pending", ("nvmlDeviceGetRetiredPagesPendingStatus",))
    r.put("retired_pages_pending", None if pending is None else bool(pending))


def _read_clocks(r: _Reader) -> None:
    reasons = r.call(
        "clocks_event_reasons", ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
    )
    r.put("clocks_event_reasons", None if reasons is None else int(reasons))


def _read_pcie(r: _Reader) -> None:
    for counter, function in (
        ("pcie_gen", "nvmlDeviceGetCurrPcieLinkGeneration"),
        ("pcie_max_gen", "nvmlDeviceGetMaxPcieLinkGeneration"),
        ("pcie_width", "nvmlDeviceGetCurrPcieLinkWidth"),
        ("pcie_max_width", "nvmlDeviceGetMaxPcieLinkWidth"),
        ("pcie_replay_counter", "nvmlDeviceGetPcieReplayCounter"),
    ):
        value = r.call(counter, (function,))
        r.put(counter, None if value is None else int(value))


def _read_nvlink(r: _Reader) -> None:
    """Link states until the card says there are no more links (NotSupported/InvalidArgument)."""
    p = r.pynvml
    states: list[bool] = []
    stop = tuple(getattr(p, n) for n in ("NVMLError_NotSupported", "NVMLError_InvalidArgument") if hasattr(p, n))
    for link in range(int(getattr(p, "NVML_NVLINK_MAX_LINKS", 18))):
        try:
            states.append(int(p.nvmlDeviceGetNvLinkState(r.handle, link)) == p.NVML_FEATURE_ENABLED)
        except stop:
            break
        except p.NVMLError as exc:
            if r._is_not_applicable(exc):
                break
            r.health.errors["nvlink"] = f"link {link}: {type(exc).__name__}: {exc}"
            return
    if states:
        r.put("nvlink_up", states)
    else:
        r.health.not_applicable["nvlink"] = "NotSupported (no NVLink on this card)"


def _read_persistence(r: _Reader) -> None:
    mode = r.call("persistence_mode", ("nvmlDeviceGetPersistenceMode",))
    r.put("persistence_mode", None if mode is None else int(mode))


def _read_fabric(r: _Reader) -> None:
    """NVSwitch fabric registration (Hopper+ HGX/NVL): state and status of the GPU's probe.

    Each call fills a structure of its own version, so _Reader.call's renamed-call fallback
    does not fit; the same three outcomes are sorted here.
    """
    p = r.pynvml
    for function, struct in (
        ("nvmlDeviceGetGpuFabricInfoV", "c_nvmlGpuFabricInfoV_t"),
        ("nvmlDeviceGetGpuFabricInfo", "c_nvmlGpuFabricInfo_t"),
    ):
        if not (hasattr(p, function) and hasattr(p, struct)):
            continue
        info = getattr(p, struct)()
        try:
            getattr(p, function)(r.handle, info)
        except p.NVMLError as exc:
            if type(exc).__name__ == "NVMLError_FunctionNotFound":
                continue
            if r._is_not_applicable(exc):
                r.health.not_applicable["fabric"] = str(exc) or type(exc).__name__
            else:
                r.health.errors["fabric"] = f"{type(exc).__name__}: {exc}"
            return
        if int(info.state) == int(getattr(p, "NVML_GPU_FABRIC_STATE_NOT_SUPPORTED", 0)):
            r.health.not_applicable["fabric"] = "NotSupported (no NVSwitch fabric on this system)"
            return
        r.put("fabric_state", int(info.state))
        r.put("fabric_status", int(info.status))
        return
    r.health.not_applicable["fabric"] = "FunctionNotFound (binding or driver predates GPU fabric info)"


READERS = (
    _read_ecc,
    _read_memory_repair,
    _read_clocks,
    _read_pcie,
    _read_nvlink,
    _read_persistence,
    _read_fabric,
)


def read_gpu(pynvml, handle, index: int) -> GpuHealth:
    health = GpuHealth(
        index=index,
        uuid=text(pynvml.nvmlDeviceGetUUID(handle)),
        pci_bus_id=text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
        name=text(pynvml.nvmlDeviceGetName(handle)),
    )
    reader = _Reader(pynvml, handle, health)
    for read in READERS:
        read(reader)
    return health


def missing(uuids: list[str], found: list[GpuHealth]) -> list[str]:
    """Board UUIDs asked for but not listed by NVML (a board that fell off the bus)."""
    seen = {g.uuid for g in found}
    return [u for u in uuids if u not in seen]


def read_node(uuids: list[str] | None = None) -> list[GpuHealth]:
    """Health of the boards with these UUIDs (all boards when None), in NVML index order.

    Board UUIDs only: map a MIG device to its board first (``GpuInfo.board_uuid``).
    Raises ``HealthUnavailable`` when NVML cannot be asked at all; a board that is not
    listed is simply absent from the result (``missing`` names it).
    """
    try:
        with nvml_session() as pynvml:
            try:
                result = []
                for index in range(int(pynvml.nvmlDeviceGetCount())):
                    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                    if uuids is not None and text(pynvml.nvmlDeviceGetUUID(handle)) not in uuids:
                        continue
                    result.append(read_gpu(pynvml, handle, index))
                return result
            except pynvml.NVMLError as exc:
                raise HealthUnavailable(f"NVML query failed: {exc}") from None
    except NvmlUnavailable as exc:
        raise HealthUnavailable(str(exc)) from None


class HealthUnavailable(RuntimeError):
    """NVML could not be asked at all (no driver, broken driver)."""
