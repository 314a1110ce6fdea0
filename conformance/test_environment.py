"""Environment conformance: is this a PyTorch install that can train on this node?

What any PyTorch install guide asks, checked rather than assumed: torch imports and is
recent, CUDA is usable exactly when NVML sees GPUs, the driver is new enough for torch's
CUDA, the communication backends exist, bf16 is claimed exactly where the hardware has it,
and data survives a trip to the device and back.
"""

import pytest

from pytest_gpuconform.checks.hardware import bare_uuid

MIN_TORCH = (2, 0)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def test_torch_imports_and_is_recent(record):
    import torch

    record("torch_version", torch.__version__)
    version = _version_tuple(torch.__version__)
    assert version[:2] >= MIN_TORCH, f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}"


def test_nvml_driver_answers(node_inventory, record):
    node = node_inventory.node
    if node.status == "absent":
        pytest.skip(f"CPU node: {node.message}")
    assert node.status == "ok", f"NVML: {node.message}"
    record("driver", node.driver_version)
    record("driver_cuda", node.cuda_driver_version)
    record("gpu_count", node.count)


def test_expected_gpus_present(node_inventory, expect_gpus, record):
    record("gpu_count", node_inventory.node.count)
    if not expect_gpus:
        pytest.skip("no GPU count expected (give --gpuconform-expect-gpus N for strict acceptance)")
    assert node_inventory.node.count >= expect_gpus, (
        f"expected >= {expect_gpus} GPU(s), node has {node_inventory.node.count}: {node_inventory.node.message}"
    )


def test_cuda_usable_and_counts_agree(node_inventory, cuda_probe, record):
    import torch

    node = node_inventory.node
    assert torch.version.cuda, (
        f"torch {torch.__version__} is a CPU-only build but NVML sees {node.count} GPU(s): install a CUDA build"
    )
    assert "error" not in cuda_probe, cuda_probe.get("error")
    assert cuda_probe["cuda_available"], "torch.cuda.is_available() is False although NVML sees GPUs"
    record("cuda_device_count", cuda_probe["device_count"])
    assert cuda_probe["device_count"] == node.count, (
        f"torch sees {cuda_probe['device_count']} CUDA device(s), NVML sees {node.count}"
    )
    # CUDA prints UUIDs bare; NVML prefixes boards with GPU- and MIG devices with MIG-.
    nvml_uuids = [bare_uuid(g.uuid) for g in node.visible]
    torch_uuids = [bare_uuid(d["uuid"]) for d in cuda_probe["devices"]]
    if all(torch_uuids):
        assert sorted(torch_uuids) == sorted(nvml_uuids), (
            f"CUDA and NVML see different devices: CUDA {torch_uuids}, NVML {nvml_uuids} "
            f"(CUDA_VISIBLE_DEVICES={node_inventory.cuda_visible_devices!r}, "
            f"CUDA_DEVICE_ORDER={node_inventory.cuda_device_order or 'unset'!r})"
        )
        # Checks map by UUID, so a different order is not a failure; it is worth knowing.
        record("cuda_order_matches_inventory", torch_uuids == nvml_uuids)


def test_driver_supports_torch_cuda(node_inventory, record):
    import torch

    node = node_inventory.node
    if node.count == 0:
        pytest.skip(f"no GPU visible ({node.message})")
    if not torch.version.cuda:
        pytest.fail(f"torch {torch.__version__} is a CPU-only build on a node with {node.count} GPU(s)")
    record("torch_cuda", torch.version.cuda)
    record("driver_cuda", node.cuda_driver_version)
    built = _version_tuple(torch.version.cuda)[:2]
    driver = _version_tuple(node.cuda_driver_version)[:2]
    # Within a major release CUDA has minor-version compatibility; across majors it has not.
    assert driver[0] >= built[0], (
        f"driver {node.driver_version} supports CUDA {node.cuda_driver_version}, "
        f"torch was built for CUDA {torch.version.cuda}: upgrade the driver"
    )


def test_gloo_available(record):
    import torch
    import torch.distributed as dist

    assert dist.is_available(), "torch.distributed is not available in this build"
    assert dist.is_gloo_available(), "the gloo backend is not available in this torch build"
    group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1)
    tensor = torch.arange(8, dtype=torch.float32)
    group.allreduce([tensor]).wait()
    assert torch.equal(tensor, torch.arange(8, dtype=torch.float32)), f"1-rank gloo all_reduce changed data: {tensor}"


def test_nccl_available(node_inventory, record):
    import torch
    import torch.distributed as dist

    if node_inventory.node.count == 0:
        pytest.skip(f"NCCL is only required on GPU nodes ({node_inventory.node.message})")
    assert dist.is_nccl_available(), "the NCCL backend is not available in this torch build"
    version = torch.cuda.nccl.version()
    record("nccl_version", ".".join(map(str, version)) if isinstance(version, tuple) else str(version))


def test_bf16_claim_matches_capability(node_inventory, cuda_probe):
    assert "error" not in cuda_probe, cuda_probe.get("error")
    for seen in cuda_probe["devices"]:
        gpu = node_inventory.node.find(seen["uuid"])  # by UUID: CUDA's order is not NVML's
        assert gpu is not None, f"cuda:{seen['index']} ({seen['name']}, UUID {seen['uuid']}) is not listed by NVML"
        assert seen["bf16_supported"] == gpu.has_bf16, (
            f"{gpu.label()}: torch.cuda.is_bf16_supported() is {seen['bf16_supported']}, "
            f"compute capability says {gpu.has_bf16}"
        )


def test_tensor_round_trip(device, request, record):
    """Host -> device -> host keeps every element (on CUDA, checked in the probe child)."""
    import torch

    if device.type == "cuda":
        probe = request.getfixturevalue("cuda_probe")
        assert "error" not in probe, probe.get("error")
        for seen in probe["devices"]:
            trip = seen["round_trip"]
            record(f"cuda{seen['index']}_wrong_elements", trip["wrong"])
            assert trip["wrong"] == 0, (
                f"cuda:{seen['index']} ({seen['name']}): {trip['wrong']} of {trip['elements']} elements changed"
            )
        return
    host = torch.arange(1 << 20, dtype=torch.int64).mul_(2654435761).remainder_(1 << 31).to(torch.int32)
    back = host.to(device).clone().cpu()
    wrong = int((back != host).sum())
    record("wrong_elements", wrong)
    assert wrong == 0, f"{wrong} of {host.numel()} elements changed on the round trip through {device}"
