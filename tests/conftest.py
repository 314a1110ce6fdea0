"""Shared fixtures for the plugin's own tests."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from support import FAKE_NVML_DIR

# pytest-randomly is installed for the tests that run under it; every other pytest this
# suite starts in a subprocess keeps its tests in file order.
os.environ["PYTEST_ADDOPTS"] = " ".join(filter(None, [os.environ.get("PYTEST_ADDOPTS"), "-p no:randomly"]))


@pytest.fixture
def fake_nvml(tmp_path, monkeypatch):
    """fake_nvml(config) -> env dict for a subprocess that sees the fake pynvml module."""

    def install(config: dict) -> dict:
        path = tmp_path / "fake_nvml.json"
        path.write_text(json.dumps(config))
        monkeypatch.setenv("FAKE_NVML", str(path))
        monkeypatch.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE_NVML_DIR), os.environ.get("PYTHONPATH")]))
        )
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


@pytest.fixture
def fake_pynvml(tmp_path, monkeypatch):
    """The fake pynvml in *this* process (for readers and rules called directly);
    returns write(config) -> the module."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML_DIR / "pynvml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    path = tmp_path / "nvml.json"
    monkeypatch.setenv("FAKE_NVML", str(path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)

    def write(config: dict):
        path.write_text(json.dumps(config))
        return module

    return write


@pytest.fixture
def pytester(pytester, monkeypatch):
    """pytester clears PYTEST_ADDOPTS; its subprocesses keep file order too (see above)."""
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:randomly")
    return pytester
