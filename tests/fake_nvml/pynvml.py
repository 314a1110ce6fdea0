"""A stand-in for nvidia-ml-py's ``pynvml`` module, driven by a JSON file.

Tests put this directory first on PYTHONPATH and point ``FAKE_NVML`` at a JSON file:

    {"init_error": null | "LibraryNotFound" | "DriverNotLoaded" | "LibRmVersionMismatch" | ...,
     "driver": "550.54.15", "cuda": 12040,
     "missing_functions": ["nvmlDeviceGetCurrentClocksEventReasons"],   # raise FunctionNotFound
     "gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-...", "bus_id": "00000000:18:00.0",
               "memory_gib": 80, "cc": [9, 0],
               # health counters; absent keys read as a healthy H100 SXM:
               "ecc_mode": 1, "ecc_uncorrected_volatile": 0, "ecc_corrected_volatile": 0,
               "ecc_uncorrected_aggregate": 0, "remapped_rows": [corr, unc, pending, failure],
               "retired_pages_pending": 0, "clocks_event_reasons": 1,
               "pcie_gen": 5, "pcie_max_gen": 5, "pcie_width": 16, "pcie_max_width": 16,
               "pcie_replay_counter": 0, "nvlink": [1, 1, ...], "persistence_mode": 1,
               "xid_events": [79, ...],
               "fabric": {"state": 3, "status": 0},      # NVSwitch fabric; absent: NotSupported
               # MIG: the board is in MIG mode and has these MIG devices (slots 0..n-1)
               "mig": {"enabled": 1, "devices": [{"uuid": "MIG-...", "name": "... MIG 1g.10gb",
                                                   "memory_gib": 10, "gi": 1, "ci": 0}]}}]}

A value of the form {"error": "NotSupported"} for any per-GPU field makes the matching call
raise that NVMLError subclass.

Unlike a snapshot, the file is read again on every call while NVML is initialised, so a
test can rewrite it (atomically, with os.replace) to make counters change in the middle of
a run. XID events follow NVML's rule: an event set sees only the events that occurred after
it was registered, i.e. entries appended to ``xid_events`` after registration.
Initialisation is reference-counted like the real library.
"""

import json
import os


class NVMLError(Exception):
    value = 999

    def __str__(self):
        return type(self).__name__.replace("NVMLError_", "")


_ERRORS = {}
for _name, _code in [
    ("Uninitialized", 1), ("InvalidArgument", 2), ("NotSupported", 3), ("NoPermission", 4),
    ("NotFound", 6), ("DriverNotLoaded", 9), ("Timeout", 10), ("Unknown", 999), ("GpuIsLost", 15),
    ("LibraryNotFound", 12), ("FunctionNotFound", 13), ("LibRmVersionMismatch", 18),
    ("NoDevice", 26),
]:
    _cls = type(f"NVMLError_{_name}", (NVMLError,), {"value": _code})
    globals()[_cls.__name__] = _cls
    _ERRORS[_name] = _cls

NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
NVML_GPU_FABRIC_STATE_NOT_SUPPORTED = 0
NVML_GPU_FABRIC_STATE_NOT_STARTED = 1
NVML_GPU_FABRIC_STATE_IN_PROGRESS = 2
NVML_GPU_FABRIC_STATE_COMPLETED = 3
NVML_FEATURE_DISABLED = 0
NVML_FEATURE_ENABLED = 1
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_NVLINK_MAX_LINKS = 18
nvmlEventTypeXidCriticalError = 0x8
nvmlClocksEventReasonGpuIdle = 0x1
nvmlClocksEventReasonApplicationsClocksSetting = 0x2
nvmlClocksEventReasonSwPowerCap = 0x4
nvmlClocksEventReasonHwSlowdown = 0x8
nvmlClocksEventReasonSyncBoost = 0x10
nvmlClocksEventReasonSwThermalSlowdown = 0x20
nvmlClocksEventReasonHwThermalSlowdown = 0x40
nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x80

_state = {"refs": 0}


def _config():
    if _state["refs"] <= 0:
        raise NVMLError_Uninitialized()
    with open(os.environ["FAKE_NVML"], encoding="utf-8") as handle:
        return json.load(handle)


def _raise(name):
    raise _ERRORS.get(name, NVMLError_Unknown)()


def _check_present(function_name):
    if function_name in _config().get("missing_functions", []):
        raise NVMLError_FunctionNotFound()


def _gpu(handle):
    """The GPU's current entry in the file (re-read, so mid-run edits are seen); for a MIG
    handle, the MIG device's entry."""
    board = _config()["gpus"][handle["_index"]]
    if "_mig" in handle:
        return board["mig"]["devices"][handle["_mig"]]
    return board


def _field(handle, key, default=None):
    value = _gpu(handle).get(key, default)
    if isinstance(value, dict) and "error" in value:
        _raise(value["error"])
    return value


def nvmlInit():
    with open(os.environ["FAKE_NVML"], encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("init_error"):
        _raise(config["init_error"])
    _state["refs"] += 1


def nvmlShutdown():
    if _state["refs"] <= 0:
        raise NVMLError_Uninitialized()
    _state["refs"] -= 1


def nvmlSystemGetDriverVersion():
    return _config().get("driver", "550.54.15")


def nvmlSystemGetCudaDriverVersion():
    return _config().get("cuda", 12040)


def nvmlDeviceGetCount():
    return len(_config().get("gpus", []))


def nvmlDeviceGetHandleByIndex(index):
    gpus = _config().get("gpus", [])
    if not 0 <= index < len(gpus):
        raise NVMLError_InvalidArgument()
    return {"_index": index}


def nvmlDeviceGetHandleByUUID(uuid):
    for index in range(nvmlDeviceGetCount()):
        if nvmlDeviceGetUUID({"_index": index}) == uuid:
            return {"_index": index}
        for slot, mig in enumerate(_config()["gpus"][index].get("mig", {}).get("devices", [])):
            if mig.get("uuid") == uuid:
                return {"_index": index, "_mig": slot}
    raise NVMLError_NotFound()


# -- MIG ------------------------------------------------------------------------------------
def _mig(handle):
    return _config()["gpus"][handle["_index"]].get("mig")


def nvmlDeviceGetMigMode(handle):
    mig = _mig(handle)
    if mig is None:
        raise NVMLError_NotSupported()
    mode = int(mig.get("enabled", 1))
    return [mode, int(mig.get("pending", mode))]


def nvmlDeviceGetMaxMigDeviceCount(handle):
    return int((_mig(handle) or {}).get("max", 7))


def nvmlDeviceGetMigDeviceHandleByIndex(handle, index):
    devices = (_mig(handle) or {}).get("devices", [])
    if not 0 <= index < len(devices):
        raise NVMLError_NotFound()
    return {"_index": handle["_index"], "_mig": index}


def nvmlDeviceIsMigDeviceHandle(handle):
    return int("_mig" in handle)


def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle):
    return {"_index": handle["_index"]}


def nvmlDeviceGetGpuInstanceId(handle):
    return int(_gpu(handle).get("gi", handle.get("_mig", 0) + 1))


def nvmlDeviceGetComputeInstanceId(handle):
    return int(_gpu(handle).get("ci", 0))


def nvmlDeviceGetName(handle):
    return _field(handle, "name", "NVIDIA H100 80GB HBM3")


def nvmlDeviceGetUUID(handle):
    if "_mig" in handle:
        return _field(handle, "uuid", f"MIG-{handle['_index']:08d}-0000-0000-0000-{handle['_mig']:012d}")
    return _field(handle, "uuid", f"GPU-00000000-0000-0000-0000-00000000000{handle['_index']}")


class _Pci:
    def __init__(self, bus_id):
        self.busId = bus_id


def nvmlDeviceGetPciInfo(handle):
    return _Pci(_field(handle, "bus_id", f"00000000:{0x18 + handle['_index']:02X}:00.0"))


class _Memory:
    def __init__(self, total):
        self.total, self.free, self.used = total, total, 0


def nvmlDeviceGetMemoryInfo(handle, version=None):
    return _Memory(int(_field(handle, "memory_gib", 80) * 2**30))


def nvmlDeviceGetCudaComputeCapability(handle):
    return tuple(_field(handle, "cc", [9, 0]))


# -- health counters ------------------------------------------------------------------------
def nvmlDeviceGetEccMode(handle):
    mode = _field(handle, "ecc_mode", 1)
    return (mode, mode)


def nvmlDeviceGetTotalEccErrors(handle, error_type, counter_type):
    if counter_type == NVML_AGGREGATE_ECC:
        key = "ecc_uncorrected_aggregate" if error_type == NVML_MEMORY_ERROR_TYPE_UNCORRECTED else "ecc_corrected_aggregate"
    else:
        key = "ecc_uncorrected_volatile" if error_type == NVML_MEMORY_ERROR_TYPE_UNCORRECTED else "ecc_corrected_volatile"
    return int(_field(handle, key, 0))


def nvmlDeviceGetRemappedRows(handle):
    return tuple(_field(handle, "remapped_rows", [0, 0, 0, 0]))


def nvmlDeviceGetRetiredPagesPendingStatus(handle):
    return int(_field(handle, "retired_pages_pending", {"error": "NotSupported"}))


def nvmlDeviceGetCurrentClocksEventReasons(handle):
    _check_present("nvmlDeviceGetCurrentClocksEventReasons")
    return int(_field(handle, "clocks_event_reasons", nvmlClocksEventReasonGpuIdle))


def nvmlDeviceGetCurrentClocksThrottleReasons(handle):
    """Deprecated name of the call above; kept because old drivers only have this one."""
    _check_present("nvmlDeviceGetCurrentClocksThrottleReasons")
    return int(_field(handle, "clocks_event_reasons", nvmlClocksEventReasonGpuIdle))


def nvmlDeviceGetCurrPcieLinkGeneration(handle):
    return int(_field(handle, "pcie_gen", 5))


def nvmlDeviceGetMaxPcieLinkGeneration(handle):
    return int(_field(handle, "pcie_max_gen", 5))


def nvmlDeviceGetCurrPcieLinkWidth(handle):
    return int(_field(handle, "pcie_width", 16))


def nvmlDeviceGetMaxPcieLinkWidth(handle):
    return int(_field(handle, "pcie_max_width", 16))


def nvmlDeviceGetPcieReplayCounter(handle):
    return int(_field(handle, "pcie_replay_counter", 0))


def nvmlDeviceGetNvLinkState(handle, link):
    links = _field(handle, "nvlink", [1] * NVML_NVLINK_MAX_LINKS)
    if not 0 <= link < NVML_NVLINK_MAX_LINKS:
        raise NVMLError_InvalidArgument()
    if link >= len(links):
        raise NVMLError_NotSupported()
    return int(links[link])


def nvmlDeviceGetPersistenceMode(handle):
    return int(_field(handle, "persistence_mode", 1))


class c_nvmlGpuFabricInfo_t:
    def __init__(self):
        self.clusterUuid, self.status, self.cliqueId, self.state = b"", 0, 0, 0


class c_nvmlGpuFabricInfo_v2_t(c_nvmlGpuFabricInfo_t):
    def __init__(self):
        super().__init__()
        self.version, self.healthMask = 0x02000024, 0


c_nvmlGpuFabricInfoV_t = c_nvmlGpuFabricInfo_v2_t


def _fill_fabric(handle, info):
    fabric = _field(handle, "fabric", {"error": "NotSupported"})
    info.state = int(fabric.get("state", NVML_GPU_FABRIC_STATE_COMPLETED))
    info.status = int(fabric.get("status", 0))
    return 0


def nvmlDeviceGetGpuFabricInfoV(handle, info):
    _check_present("nvmlDeviceGetGpuFabricInfoV")
    return _fill_fabric(handle, info)


def nvmlDeviceGetGpuFabricInfo(handle, info):
    """Deprecated name of the call above (drivers before r550 have only this one)."""
    _check_present("nvmlDeviceGetGpuFabricInfo")
    return _fill_fabric(handle, info)


# -- XID events -----------------------------------------------------------------------------
class _EventData:
    def __init__(self, device, xid):
        self.device, self.eventType, self.eventData = device, nvmlEventTypeXidCriticalError, xid
        self.gpuInstanceId = self.computeInstanceId = 0xFFFFFFFF


def nvmlEventSetCreate():
    _config()
    return {"registered": []}  # [(handle, events seen at registration)]


def nvmlDeviceRegisterEvents(handle, event_types, event_set):
    events = _field(handle, "xid_events", [])
    event_set["registered"].append([handle, len(events)])


def nvmlEventSetWait_v2(event_set, timeout_ms):
    for entry in event_set["registered"]:
        handle, seen = entry
        events = _field(handle, "xid_events", [])
        if len(events) > seen:
            entry[1] = seen + 1
            return _EventData(handle, int(events[seen]))
    raise NVMLError_Timeout()


nvmlEventSetWait = nvmlEventSetWait_v2


def nvmlEventSetFree(event_set):
    event_set["registered"].clear()
