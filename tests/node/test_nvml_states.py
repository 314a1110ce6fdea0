"""A node without a driver is a CPU node; a broken driver is a failed environment check."""

import json
import sys
from pathlib import Path

import pytest

GPUCONFORM = str(Path(sys.executable).parent / "gpuconform")  # the console script of this environment


def test_driver_library_mismatch_fails_the_environment_check(pytester, fake_nvml):
    fake_nvml({"init_error": "LibRmVersionMismatch"})
    result = pytester.runpytest_subprocess("--gpuconform", "-p", "no:cacheprovider", "-k", "nvml_driver_answers")
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            "gpuconform: NVML ERROR: nvmlInit failed: LibRmVersionMismatch: *reboot the node*",
            "*AssertionError: NVML: nvmlInit failed: LibRmVersionMismatch*",
        ]
    )


@pytest.mark.parametrize("error", ["LibraryNotFound", "DriverNotLoaded"])
def test_missing_driver_is_a_cpu_node(pytester, fake_nvml, error):
    fake_nvml({"init_error": error})
    result = pytester.runpytest_subprocess("--gpuconform", "-p", "no:cacheprovider", "-k", "environment", "-rs")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [f"gpuconform: CPU node: no NVIDIA driver ({error})", f"*CPU node: no NVIDIA driver ({error})*"]
    )


def test_header_and_junit_carry_the_inventory(pytester, fake_nvml):
    from support import h100

    fake_nvml({"driver": "550.54.15", "cuda": 12040, "gpus": [h100(0), h100(1)]})
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--gpuconform", "-p", "no:cacheprovider", ".", "--junitxml=out.xml")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "gpuconform: * CPU cores*, * memory, *, kernel *",
            "gpuconform: driver 550.54.15, CUDA 12.4, 2 GPU(s), 2 visible",
            "gpuconform:   cuda:0 = GPU 0 (GPU-00000000-*, bus 00000000:18:00.0): NVIDIA H100 80GB HBM3, 80 GiB, cc 9.0",
        ]
    )
    xml = (pytester.path / "out.xml").read_text()
    for prop in (
        'name="gpuconform.driver" value="550.54.15"',
        'name="gpuconform.gpu1_pci_bus_id" value="00000000:19:00.0"',
        'name="gpuconform.gpu0_compute_capability" value="9.0"',
        'name="gpuconform.gpu1_cuda_ordinal" value="1"',
        'name="gpuconform.torch" value="2.',
        'name="gpuconform.cuda_visible_devices" value="unset"',
        'name="gpuconform.gpu_mapping" value="exact"',
    ):
        assert prop in xml
    for name in ("cpu_model", "cpu_cores", "cpu_cores_usable", "host_memory_gib", "os", "kernel", "arch"):
        assert f'name="gpuconform.{name}" value="' in xml, name


def test_inventory_follows_cuda_visible_devices_by_uuid(pytester, fake_nvml, monkeypatch):
    from support import h100

    fake_nvml({"gpus": [h100(i) for i in range(4)]})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{h100(3)['uuid'][:12]},1")  # a UUID prefix list ends at "1"
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    result = pytester.run(GPUCONFORM, "inventory")
    data = json.loads(result.stdout.str())
    assert [g["index"] for g in data["gpus"]] == [3] and len(data["all_gpus"]) == 4
    assert data["cuda_visible_devices"] == f"{h100(3)['uuid'][:12]},1" and data["cuda_device_order"] == "PCI_BUS_ID"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    data = json.loads(pytester.run(GPUCONFORM, "inventory").stdout.str())
    assert [g["uuid"] for g in data["gpus"]] == [h100(2)["uuid"], h100(0)["uuid"]]


def test_mig_devices_get_their_own_properties(pytester, fake_nvml, monkeypatch):
    from support import h100

    mig = {
        "uuid": "MIG-11111111-2222-3333-4444-555555555555",
        "name": "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
        "memory_gib": 10,
    }
    fake_nvml({"gpus": [h100(0), h100(1, mig={"enabled": 1, "devices": [mig]})]})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mig["uuid"])
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--gpuconform", "-p", "no:cacheprovider", ".", "--junitxml=out.xml")
    result.stdout.fnmatch_lines(
        [
            "gpuconform: driver *, 2 GPU(s), 1 MIG device(s), 1 visible",
            f"gpuconform:   cuda:0 = GPU 1 MIG 0 ({mig['uuid']}, bus 00000000:19:00.0): NVIDIA H100 80GB HBM3 MIG 1g.10gb*",
        ]
    )
    xml = (pytester.path / "out.xml").read_text()
    assert f'name="gpuconform.gpu1_mig0_uuid" value="{mig["uuid"]}"' in xml
    assert f'name="gpuconform.gpu1_mig0_parent_uuid" value="{h100(1)["uuid"]}"' in xml
    assert 'name="gpuconform.gpu1_mig0_memory_gib" value="10.0"' in xml


def test_inventory_command_prints_json(pytester, fake_nvml):
    from support import h100

    fake_nvml({"gpus": [h100(0)]})
    result = pytester.run(GPUCONFORM, "inventory")
    assert result.ret == 0
    data = json.loads(result.stdout.str())
    assert data["gpus"][0]["uuid"].startswith("GPU-00000000")
    assert data["gpus"][0]["compute_capability"] == "9.0"
    assert data["nvml"]["status"] == "ok" and data["torch"].startswith("2.")
    # the host facts that decide --gpuconform-cpu-ranks, at the JSON's first level
    assert data["cpu_cores"] >= 1 and 1 <= data["cpu_cores_usable"] <= data["cpu_cores"]
    assert data["host_memory_gib"] > 0 and data["kernel"] and data["os"] and data["cpu_model"]


def test_inventory_command_on_cpu_node(pytester):
    result = pytester.run(GPUCONFORM, "inventory", "-o", "inv.json")
    assert result.ret == 0
    data = json.loads((pytester.path / "inv.json").read_text())
    assert data["gpus"] == [] and data["nvml"]["status"] == "absent"
