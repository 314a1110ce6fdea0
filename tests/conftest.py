"""Shared fixtures for the plugin's own tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

FAKE_NVML_DIR = Path(__file__).parent / "fake_nvml"


def h100(index: int, **extra) -> dict:
    return {"name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-{index:08d}-aaaa-bbbb-cccc-{index:012d}",
            "bus_id": f"00000000:{0x18 + index:02X}:00.0", "memory_gib": 80, "cc": [9, 0], **extra}


@pytest.fixture
def fake_nvml(tmp_path, monkeypatch):
    """fake_nvml(config) -> env dict for a subprocess that sees the fake pynvml module."""

    def install(config: dict) -> dict:
        path = tmp_path / "fake_nvml.json"
        path.write_text(json.dumps(config))
        monkeypatch.setenv("FAKE_NVML", str(path))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE_NVML_DIR), os.environ.get("PYTHONPATH")])))
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        return {"FAKE_NVML": str(path)}

    return install


@pytest.fixture
def run_gpuconform(pytester):
    """Run ``pytest --gpuconform . ARGS`` in a subprocess (ranks and NVML need a fresh
    interpreter); "." keeps collection to the pytester directory, not the shipped suite."""

    def run(*args, **kwargs):
        return pytester.runpytest_subprocess("--gpuconform", "-p", "no:cacheprovider", ".", *args, **kwargs)

    return run
