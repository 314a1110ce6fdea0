"""Which devices a CUDA process will see, in which order, worked out from NVML alone.

NVML and CUDA number GPUs differently. NVML lists boards in PCI bus order; CUDA orders them
``FASTEST_FIRST`` unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, and then applies
``CUDA_VISIBLE_DEVICES``, which may hold indices into that order, GPU UUIDs (or unique
prefixes of them, ``GPU-8932f937``) or MIG device UUIDs. So "GPU 3" can be two different
boards in two processes. Everything that must name the same board in the controller, in
xdist workers, in rank processes and in a concurrent pytest run (inventory, health per
GPU, peer comparison, worker pinning, leases) maps by UUID, through this module.

The parsing follows CUDA's documented rules the way ``torch.cuda`` models them without
creating a context (``torch.cuda._parse_visible_devices``): the kind of the list is set by
its first entry; integer entries are read like ``strtoul`` (``"1gpu"`` is 1); the list ends
at the first entry that names no device (a negative number, a UUID prefix that matches
nothing or more than one board); a device named twice leaves the list empty.

NVML cannot know everything: the fastest-first order of *different* GPU models, and how
MIG devices are enumerated, are CUDA's business. Such an answer is marked ``exact=False``
with the reason; ``nvml.query`` then asks CUDA itself, once, in a child process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

PCI_BUS_ID = "PCI_BUS_ID"
FASTEST_FIRST = "FASTEST_FIRST"


class Device(Protocol):
    """What this module needs of a GPU or MIG device (nvml.GpuInfo has it)."""

    uuid: str
    name: str
    pci_bus_id: str
    memory_total_bytes: int
    compute_capability: tuple[int, int]
    parent_uuid: str
    mig_enabled: bool
    mig_slot: tuple[int, int] | None


@dataclass(frozen=True)
class Visible:
    devices: tuple  # of nvml.GpuInfo, in CUDA ordinal order
    exact: bool = True  # False: NVML cannot tell the set or the order for sure (see note)
    note: str = ""


def bare_uuid(uuid: str) -> str:
    """The UUID without its ``GPU-`` / ``MIG-`` prefix, lower case: how CUDA's own
    ``cudaDeviceProp.uuid`` (torch's ``get_device_properties(i).uuid``) prints it."""
    text = uuid.strip()
    for prefix in ("GPU-", "MIG-"):
        if text.upper().startswith(prefix):
            text = text[len(prefix) :]
            break
    return text.lower()


def same_device(a: str, b: str) -> bool:
    return bool(a) and bool(b) and bare_uuid(a) == bare_uuid(b)


def find(devices: Sequence, uuid: str):
    """The device with this UUID (any prefix form), or None."""
    return next((d for d in devices if same_device(d.uuid, uuid)), None)


def device_order(environ: Mapping[str, str]) -> str:
    value = environ.get("CUDA_DEVICE_ORDER", "").strip().upper()
    return PCI_BUS_ID if value == PCI_BUS_ID else FASTEST_FIRST


def _pci_key(device) -> str:
    return device.pci_bus_id.lower()


def enumeration(gpus: Sequence, migs: Sequence, order: str) -> Visible:
    """What CUDA enumerates before CUDA_VISIBLE_DEVICES: boards not in MIG mode, and the
    MIG devices of those that are."""
    full = sorted((g for g in gpus if not g.mig_enabled), key=_pci_key)
    mig_devices = sorted(migs, key=lambda m: (_pci_key(m), m.mig_slot or (0, 0)))
    notes = []
    if mig_devices or any(g.mig_enabled for g in gpus):
        notes.append("MIG mode is on: which MIG devices CUDA enumerates, and in which order, is CUDA's choice")
    if order == FASTEST_FIRST and len({(g.name, g.compute_capability, g.memory_total_bytes) for g in full}) > 1:
        notes.append("CUDA_DEVICE_ORDER is FASTEST_FIRST and the GPUs differ in model: CUDA's order is not NVML's")
    return Visible(tuple(full) + tuple(mig_devices), exact=not notes, note="; ".join(notes))


def _strtoul(token: str) -> int:
    """CUDA reads an index entry like strtoul: leading digits count, the rest is ignored."""
    digits = ""
    for position, char in enumerate(token):
        if char.isdigit() or (position == 0 and char in "+-"):
            digits += char
        else:
            break
    try:
        return int(digits)
    except ValueError:
        return -1


def _unique_prefix(devices: Sequence, token: str):
    matches = [d for d in devices if d.uuid.lower().startswith(token.lower())]
    return matches[0] if len(matches) == 1 else None


def _legacy_mig(gpus: Sequence, migs: Sequence, token: str):
    """``MIG-GPU-<uuid>/<gpu instance>/<compute instance>`` (drivers before R470)."""
    head, _, rest = token[len("MIG-") :].partition("/")
    gi, _, ci = rest.partition("/")
    parent = _unique_prefix(gpus, head)
    if parent is None or not (gi.isdigit() and ci.isdigit()):
        return None
    return next((m for m in migs if m.parent_uuid == parent.uuid and m.mig_slot == (int(gi), int(ci))), None)


def _pick(tokens: list[str], lookup) -> tuple[list, bool]:
    """Apply ``lookup`` entry by entry: (devices, emptied by a repeat)."""
    chosen: list = []
    for token in tokens:
        device = lookup(token)
        if device is None:
            break
        if device in chosen:
            return [], True
        chosen.append(device)
    return chosen, False


def resolve(gpus: Sequence, migs: Sequence, environ: Mapping[str, str]) -> Visible:
    """The devices a CUDA process started with ``environ`` sees, in ordinal order."""
    order = device_order(environ)
    base = enumeration(gpus, migs, order)
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return base
    tokens = [t.strip() for t in value.split(",")]
    if not value.strip():
        return Visible((), note="CUDA_VISIBLE_DEVICES is empty: CUDA sees no GPU")
    first = tokens[0].upper()
    notes: list[str] = []
    if first.startswith("GPU-"):
        chosen, repeated = _pick(tokens, lambda t: _unique_prefix(gpus, t) if t.upper().startswith("GPU-") else None)
        if any(g.mig_enabled for g in chosen):
            notes.append("a GPU named by UUID is in MIG mode: CUDA decides which of its MIG devices it sees")
    elif first.startswith("MIG-"):

        def mig(token: str):
            if not token.upper().startswith("MIG-"):
                return None
            if token.upper().startswith("MIG-GPU-"):
                return _legacy_mig(gpus, migs, token)
            return _unique_prefix(migs, token)

        chosen, repeated = _pick(tokens, mig)
        if len(chosen) > 1:
            notes.append("several MIG devices listed: CUDA may enumerate only one MIG device per process")
    else:
        indexable = list(base.devices)

        def index(token: str):
            number = _strtoul(token)
            return indexable[number] if 0 <= number < len(indexable) else None

        chosen, repeated = _pick(tokens, index)
        if not base.exact:
            notes.append(f"indices in CUDA_VISIBLE_DEVICES refer to CUDA's order ({base.note})")
    if repeated:
        notes.append(f"CUDA_VISIBLE_DEVICES={value!r} names a device twice: CUDA then sees no GPU")
    return Visible(tuple(chosen), exact=not notes or repeated, note="; ".join(notes))


def with_cuda_answer(visible: Visible, devices: Sequence, cuda_uuids: Sequence[str] | None) -> Visible:
    """Replace an inexact answer by CUDA's own list of UUIDs (from a child process).

    ``cuda_uuids`` None means CUDA could not be asked: the NVML answer stays, marked.
    """
    if visible.exact:
        return visible
    if cuda_uuids is None:
        return Visible(visible.devices, exact=False, note=f"{visible.note}; CUDA could not be asked, NVML's guess kept")
    found = [find(devices, u) for u in cuda_uuids]
    unknown = [u for u, d in zip(cuda_uuids, found, strict=True) if d is None]
    note = f"order taken from CUDA ({visible.note})"
    if unknown:
        note += f"; CUDA sees devices NVML does not list: {', '.join(unknown)}"
    return Visible(tuple(d for d in found if d is not None), exact=not unknown, note=note)


def worker_tokens(devices: Sequence) -> list[str]:
    """Device tokens to hand out to processes (xdist workers, leased ranks): full UUIDs, which
    mean the same board whatever CUDA_DEVICE_ORDER those processes have."""
    return [d.uuid for d in devices]


def per_rank_visible_devices(tokens: Sequence[str], world_size: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES for each of ``world_size`` ranks sharing ``tokens``.

    Board UUIDs: every rank gets the whole list and picks ordinal ``rank`` (NCCL wants to
    see its peers' GPUs for P2P). MIG UUIDs: each rank gets its own single device, since
    CUDA may enumerate only one MIG device per process.
    """
    if any(t.upper().startswith("MIG-") for t in tokens):
        return [tokens[rank % len(tokens)] for rank in range(world_size)]
    return [",".join(tokens)] * world_size


def lock_name(token: str) -> str:
    """One spelling per device for lock files: ``GPU-ABC`` and ``gpu-abc`` are the same board."""
    if token.upper().startswith(("GPU-", "MIG-")):
        return f"{token[:3].lower()}-{bare_uuid(token)}"
    return token
