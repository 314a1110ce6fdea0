"""Judge health readings (readings.py's plain data): pure functions, no NVML, no torch.

Each rule looks at one GPU and returns a ``Finding``: problem lines (the check fails),
notes (counters not judged, with why) and whether the rule applied at all. Every line
names the GPU (index, UUID, bus id), the counter, the value and the bound, so a CI page
that shows only the failure message still says which board to pull.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .readings import GpuHealth

# Clock event ("throttle") reason bits, fixed by the NVML ABI (nvml.h).
GPU_IDLE = 0x1
REASON_NAMES = {
    0x1: "GpuIdle",
    0x2: "ApplicationsClocksSetting",
    0x4: "SwPowerCap",
    0x8: "HwSlowdown",
    0x10: "SyncBoost",
    0x20: "SwThermalSlowdown",
    0x40: "HwThermalSlowdown",
    0x80: "HwPowerBrakeSlowdown",
}
# Idle, application clocks, software power cap and sync boost are normal operation; these
# mean the board is slowed by hardware protection (overheating, power brake, HW slowdown).
BAD_REASONS = 0x8 | 0x20 | 0x40 | 0x80


@dataclass
class Finding:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    applicable: bool = True


def _errors(gpu: GpuHealth, counters: tuple[str, ...]) -> list[str]:
    return [f"{gpu.label()}: {c}: NVML error {gpu.errors[c]}" for c in counters if c in gpu.errors]


def _not_applicable(gpu: GpuHealth, counters: tuple[str, ...]) -> Finding:
    why = ", ".join(f"{c}: {gpu.not_applicable.get(c, 'not read')}" for c in counters)
    return Finding(notes=[f"{gpu.label()}: not applicable ({why})"], applicable=False)


def reason_names(bits: int) -> str:
    names = [name for bit, name in REASON_NAMES.items() if bits & bit]
    unknown = bits & ~sum(REASON_NAMES)
    if unknown:
        names.append(hex(unknown))
    return "|".join(names) or "none"


def ecc(gpu: GpuHealth) -> Finding:
    counter = "ecc_uncorrected_volatile"
    if counter not in gpu.values:
        if counter in gpu.errors:
            return Finding(problems=_errors(gpu, (counter,)))
        finding = _not_applicable(gpu, (counter,))
        if gpu.values.get("ecc_mode") == 0:
            finding.notes = [f"{gpu.label()}: not applicable (ECC mode is off on this board: no counts kept)"]
        return finding
    value = gpu.values[counter]
    if value > 0:
        return Finding(
            problems=[
                f"{gpu.label()}: {counter} = {value}, bound 0 (uncorrectable memory errors since the driver loaded)"
            ]
        )
    return Finding()


_REPAIR = (
    ("row_remap_pending", "a row remap waits for a GPU reset"),
    ("row_remap_failure", "row remapping failed: the board needs service"),
    ("retired_pages_pending", "retired pages wait for a GPU reset"),
)


def memory_repair(gpu: GpuHealth) -> Finding:
    counters = tuple(c for c, _ in _REPAIR)
    problems = _errors(gpu, counters)
    present = [c for c in counters if c in gpu.values]
    if not present and not problems:
        return _not_applicable(gpu, counters)
    problems += [f"{gpu.label()}: {c} = true, bound false ({why})" for c, why in _REPAIR if gpu.values.get(c)]
    return Finding(problems=problems)


def throttling(gpu: GpuHealth) -> Finding:
    counter = "clocks_event_reasons"
    if counter not in gpu.values:
        return Finding(problems=_errors(gpu, (counter,))) if counter in gpu.errors else _not_applicable(gpu, (counter,))
    bits = gpu.values[counter]
    if bits & BAD_REASONS:
        return Finding(
            problems=[
                f"{gpu.label()}: {counter} = {bits:#x} ({reason_names(bits & BAD_REASONS)} active), "
                f"bound none of {reason_names(BAD_REASONS)}"
            ]
        )
    return Finding()


def pcie_link(gpu: GpuHealth, under_load: bool = False) -> Finding:
    """Current link generation and width against the maximum of this GPU in this slot.

    Links drop to a lower generation (and some platforms to fewer lanes) while the GPU
    idles, to save power, so an idle GPU below its maximum is noted, not failed; the
    under-load reading (taken by the GEMM benchmark while its kernels run) is judged
    without that excuse.
    """
    counters = ("pcie_gen", "pcie_max_gen", "pcie_width", "pcie_max_width")
    problems = _errors(gpu, counters)
    if problems:
        return Finding(problems=problems)
    if not all(c in gpu.values for c in counters):
        return _not_applicable(gpu, counters)
    v = gpu.values
    idle = bool(v.get("clocks_event_reasons", 0) & GPU_IDLE) and not under_load
    finding = Finding()
    for current, maximum, what in (
        ("pcie_gen", "pcie_max_gen", "generation"),
        ("pcie_width", "pcie_max_width", "width"),
    ):
        if v[current] >= v[maximum]:
            continue
        line = f"{gpu.label()}: {current} = {v[current]}, bound {maximum} = {v[maximum]}"
        if idle:
            finding.notes.append(
                f"{line}: not judged while the GPU idles (link {what} drops to save power); "
                "judged under load by test_performance.py::test_pcie_link_under_load"
            )
        else:
            finding.problems.append(f"{line}{' under load' if under_load else ''} (degraded PCIe link)")
    if finding.notes and not finding.problems:
        finding.applicable = False
    return finding


def nvlink(gpu: GpuHealth) -> Finding:
    problems = _errors(gpu, ("nvlink",))
    if problems:
        return Finding(problems=problems)
    states = gpu.values.get("nvlink_up")
    if states is None:
        return _not_applicable(gpu, ("nvlink",))
    down = [i for i, up in enumerate(states) if not up]
    if down and len(down) == len(states) and "pcie" in gpu.name.lower():
        return Finding(notes=[f"{gpu.label()}: no NVLink up on a PCIe card: no NVLink bridge fitted"], applicable=False)
    if down:
        return Finding(
            problems=[f"{gpu.label()}: nvlink links down = {down} ({len(down)} of {len(states)}), bound all up"]
        )
    return Finding()


# NVSwitch fabric probe states (nvml.h, nvmlGpuFabricState_t).
FABRIC_STATES = {0: "not supported", 1: "not started", 2: "in progress", 3: "completed"}
FABRIC_COMPLETED = 3


def fabric(gpu: GpuHealth) -> Finding:
    """On NVSwitch systems (HGX H100/H200/B200, GB200 NVL) the fabric manager must have
    registered the GPU: until then CUDA initialisation fails on it ("system not yet
    initialized") and NCCL cannot use NVLink."""
    if "fabric" in gpu.errors:
        return Finding(problems=_errors(gpu, ("fabric",)))
    if "fabric_state" not in gpu.values:
        return _not_applicable(gpu, ("fabric",))
    state, status = gpu.values["fabric_state"], gpu.values.get("fabric_status", 0)
    problems = []
    if state != FABRIC_COMPLETED:
        problems.append(
            f"{gpu.label()}: fabric_state = {state} ({FABRIC_STATES.get(state, 'unknown')}), bound {FABRIC_COMPLETED} "
            "(completed): the NVSwitch fabric manager has not registered this GPU (is nvidia-fabricmanager running?)"
        )
    elif status != 0:
        problems.append(
            f"{gpu.label()}: fabric_status = {status}, bound 0 (NVML_SUCCESS): "
            "fabric registration finished with an error"
        )
    return Finding(problems=problems)


# XIDs an H100/H200 node reports for hardware trouble, named in failure messages (NVIDIA's
# XID catalogue); any XID during the run fails, these just say what it was.
XID_NAMES = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup after earlier errors",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint/warning",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remap recorded",
    64: "ECC page retirement or row remap recording failed",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    109: "context switch timeout",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
}


def xid_names(xids: list[int]) -> str:
    return ", ".join(f"{x} ({XID_NAMES[x]})" if x in XID_NAMES else str(x) for x in xids)


def counter_changes(before: GpuHealth, after: GpuHealth | None, xids: list[int]) -> list[str]:
    """Problems that appeared between two readings of the same GPU (and XIDs in between)."""
    if after is None:
        return [f"{before.label()}: no longer answers NVML at the end of the run (fell off the bus?)"]
    problems = [
        f"{after.label()}: {c}: NVML error at the end of the run: {e}"
        for c, e in after.errors.items()
        if c not in before.errors
    ]
    for counter in ("ecc_uncorrected_volatile", "remapped_rows_uncorrectable"):
        old, new = before.values.get(counter), after.values.get(counter)
        if old is not None and new is not None and new > old:
            problems.append(f"{after.label()}: {counter} rose from {old} to {new} during the run, bound no change")
    for counter in ("row_remap_pending", "row_remap_failure", "retired_pages_pending"):
        if after.values.get(counter) and not before.values.get(counter):
            problems.append(f"{after.label()}: {counter} became true during the run, bound no change")
    if before.values.get("fabric_state") == FABRIC_COMPLETED and after.values.get("fabric_state") != FABRIC_COMPLETED:
        problems.append(
            f"{after.label()}: fabric_state left 3 (completed) during the run: now {after.values.get('fabric_state')}"
        )
    if xids:
        problems.append(f"{after.label()}: xid_events = [{xid_names(xids)}] during the run, bound none")
    return problems
