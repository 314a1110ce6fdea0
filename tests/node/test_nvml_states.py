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
            "gpuconform: driver 550.54.15, CUDA 12.4, 2 GPU(s), 2 visible",
            "gpuconform:   GPU 0 (GPU-00000000-*, bus 00000000:18:00.0): NVIDIA H100 80GB HBM3, 80 GiB, cc 9.0",
        ]
    )
    xml = (pytester.path / "out.xml").read_text()
    for prop in (
        'name="gpuconform.driver" value="550.54.15"',
        'name="gpuconform.gpu1_pci_bus_id" value="00000000:19:00.0"',
        'name="gpuconform.gpu0_compute_capability" value="9.0"',
        'name="gpuconform.torch" value="2.',
    ):
        assert prop in xml


def test_inventory_command_prints_json(pytester, fake_nvml):
    from support import h100

    fake_nvml({"gpus": [h100(0)]})
    result = pytester.run(GPUCONFORM, "inventory")
    assert result.ret == 0
    data = json.loads(result.stdout.str())
    assert data["gpus"][0]["uuid"].startswith("GPU-00000000")
    assert data["gpus"][0]["compute_capability"] == "9.0"
    assert data["nvml"]["status"] == "ok" and data["torch"].startswith("2.")


def test_inventory_command_on_cpu_node(pytester):
    result = pytester.run(GPUCONFORM, "inventory", "-o", "inv.json")
    assert result.ret == 0
    data = json.loads((pytester.path / "inv.json").read_text())
    assert data["gpus"] == [] and data["nvml"]["status"] == "absent"
