"""The shipped environment checks that compare CUDA's view with NVML's, fed a CUDA probe
answer as the child process would print it: they map devices by UUID, never by position."""

from __future__ import annotations

import pytest

from pytest_gpuconform.conformance import test_environment as shipped
from pytest_gpuconform.node import inventory, nvml
from support import h100


class Recorder(dict):
    def __call__(self, name, value):
        self[name] = value


def gpu(index, name="NVIDIA H100 80GB HBM3", cc=(9, 0)):
    spec = h100(index)
    return nvml.GpuInfo(index, name, spec["uuid"], spec["bus_id"], 80 * 2**30, cc)


def node_inventory(visible, visible_devices=None):
    node = nvml.NodeGpus("ok", "driver 550", "550.54.15", "12.4", gpus=tuple(visible), visible=tuple(visible))
    return inventory.Inventory("h", "3.11", "2.13", "12.4", "", "", True, node, None, visible_devices, "")


def probe(*devices):
    """What probe.probe() prints: CUDA's ordinals, with UUIDs bare as CUDA gives them."""
    return {
        "cuda_available": True,
        "device_count": len(devices),
        "devices": [
            {"index": i, "name": g.name, "uuid": g.uuid[4:], "bf16_supported": bf16, "round_trip": {}}
            for i, (g, bf16) in enumerate(devices)
        ],
    }


@pytest.fixture(autouse=True)
def cuda_build(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", "12.4")


def test_cuda_and_nvml_agree_by_uuid_in_any_order():
    a100, h = gpu(0, "NVIDIA A100-SXM4-80GB", (8, 0)), gpu(1)
    record = Recorder()
    # FASTEST_FIRST: CUDA puts the H100 first, NVML lists the A100 first
    shipped.test_cuda_usable_and_counts_agree(node_inventory([a100, h]), probe((h, True), (a100, True)), record)
    assert record == {"cuda_device_count": 2, "cuda_order_matches_inventory": False}


def test_a_different_device_set_fails_naming_the_environment():
    inv = node_inventory([gpu(0), gpu(1)], visible_devices="0,1")
    with pytest.raises(AssertionError, match=r"CUDA and NVML see different devices: .*CUDA_VISIBLE_DEVICES='0,1'"):
        shipped.test_cuda_usable_and_counts_agree(inv, probe((gpu(0), True), (gpu(2), True)), Recorder())


def test_a_mig_device_matches_its_mig_uuid():
    mig = nvml.GpuInfo(
        1, "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "MIG-5ab1c2d3-0000-0000-0000-000000000000", "x", 10 * 2**30, (9, 0)
    )
    mig = nvml.GpuInfo(**{**mig.__dict__, "parent_uuid": h100(1)["uuid"], "mig_index": 0})
    record = Recorder()
    shipped.test_cuda_usable_and_counts_agree(node_inventory([mig]), probe((mig, True)), record)
    assert record["cuda_order_matches_inventory"] is True


def test_bf16_claims_are_checked_against_the_gpu_with_the_same_uuid():
    v100, a100 = gpu(0, "Tesla V100-SXM2-32GB", (7, 0)), gpu(1, "NVIDIA A100-SXM4-80GB", (8, 0))
    inv = node_inventory([v100, a100])
    # CUDA lists the A100 first; zipping by position would compare the A100's claim with the V100
    shipped.test_bf16_claim_matches_capability(inv, probe((a100, True), (v100, False)))
    with pytest.raises(AssertionError, match=r"GPU 0 .*is_bf16_supported\(\) is True, compute capability says False"):
        shipped.test_bf16_claim_matches_capability(inv, probe((a100, True), (v100, True)))
    with pytest.raises(AssertionError, match="is not listed by NVML"):
        shipped.test_bf16_claim_matches_capability(inv, probe((gpu(5), True)))
