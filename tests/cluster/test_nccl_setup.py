"""Cluster mode gives an NCCL rank what the engine gives its CUDA ranks (node/nccl.py),
in the rank's own process before its first communicator; gloo worlds are left alone."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from pytest_gpuconform.cluster.plugin import ClusterMode
from pytest_gpuconform.cluster.world import ClusterWorld
from pytest_gpuconform.settings import SETTINGS_KEY


def _rank(backend: str, rank_logs: str | None):
    """A ClusterMode with only what _nccl_setup reads (no world to join here)."""
    mode = object.__new__(ClusterMode)
    mode.world = ClusterWorld("torchrun", 3, 4, 1, "gpu-02", backend)
    mode.backend = backend
    mode.config = SimpleNamespace(stash={SETTINGS_KEY: SimpleNamespace(rank_logs=rank_logs)})
    return mode


@pytest.fixture
def clean_nccl_environment(monkeypatch):
    for name in ("NCCL_DEBUG", "NCCL_DEBUG_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset-by-test")  # monkeypatch restores the real value


def test_nccl_rank_gets_error_handling_its_log_and_its_gpu(tmp_path, clean_nccl_environment):
    import torch

    options = _rank("nccl", str(tmp_path))._nccl_setup()
    assert options == {"device_id": torch.device("cuda", 1)}  # LOCAL_RANK 1
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert os.environ["NCCL_DEBUG_FILE"] == str(tmp_path / "cluster-gpu-02-%p-nccl-rank3.log")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_gloo_rank_is_left_alone(clean_nccl_environment):
    assert _rank("gloo", None)._nccl_setup() == {}
    assert "NCCL_DEBUG_FILE" not in os.environ and os.environ["CUBLAS_WORKSPACE_CONFIG"] == "unset-by-test"
