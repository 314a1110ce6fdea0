"""Fixtures that only make sense inside a rank, provided there instead of pickled over.

``rank``, ``world_size``, ``device`` and the process group differ per rank; ``record``
collects into the rank's report; ``memory_meter`` must measure the rank's own allocations.
Every other fixture a test requests is resolved once in the controller and sent along.
"""

from __future__ import annotations

RANK_SIDE = frozenset({"rank", "world_size", "device", "record", "process_group", "memory_meter", "gpu"})


def _memory_meter(device):
    from pytest_gpuconform.checks.memory import MemoryMeter

    return MemoryMeter()  # stateless; the test passes the device to track()


def _gpu(spec, device):
    import pytest

    from pytest_gpuconform.node import nvml

    node = nvml.query()
    index = device.index if device.type == "cuda" else None
    if index is None or index >= len(node.visible):
        pytest.skip(f"needs a GPU; rank {spec.rank} runs on {device}")
    return node.visible[index]


def provide(names, spec, device, records: list, request) -> dict:
    values = {}
    for name in names:
        if name == "rank":
            values[name] = spec.rank
        elif name == "world_size":
            values[name] = spec.world_size
        elif name == "device":
            values[name] = device
        elif name == "record":
            from pytest_gpuconform.reporting.records import recorder

            values[name] = recorder(records.append)
        elif name == "process_group":
            import torch.distributed as dist

            values[name] = dist.group.WORLD if dist.is_initialized() else None
        elif name == "memory_meter":
            values[name] = _memory_meter(device)
        elif name == "gpu":
            values[name] = _gpu(spec, device)
    return values
