"""TF32 and determinism settings of checks/numerics.py, on this CPU build of torch.

The switches are process-global flags that exist in CPU builds too, so setting, recording
and restoring them is checked here; that they change CUDA kernels is for a GPU run.
"""

from __future__ import annotations

import os

import pytest
import torch

from pytest_gpuconform.checks import numerics

CUDA = torch.device("cuda", 0)  # only the device's type is looked at
NEW_SWITCHES = (
    torch.backends.cuda.matmul,
    torch.backends.cudnn.conv,
    torch.backends.cudnn.rnn,
)


class Recorder(dict):
    def __call__(self, name, value):
        self[name] = value


@pytest.fixture(autouse=True)
def restore_torch_flags():
    state = numerics.Tf32State(torch, "cuda"), numerics.Tf32State(torch, "cpu")
    deterministic = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    yield
    for s in state:
        s.restore()
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = benchmark


def precisions():
    return [s.fp32_precision for s in NEW_SWITCHES]


def test_true_fp32_turns_tf32_off_for_cublas_and_cudnn_and_restores_the_defaults():
    assert numerics.has_precision_api(torch)  # torch >= 2.9: the per-backend API
    before = precisions()
    assert before[1:] == ["tf32", "tf32"]  # PyTorch's defaults: cuDNN conv and RNN use TF32
    record = Recorder()
    with numerics.true_fp32(CUDA, record):
        assert precisions() == ["ieee", "ieee", "ieee"]
    assert precisions() == before
    assert record["tf32"].startswith("off for the fp32 reference (cuda.matmul.fp32_precision=ieee")
    assert "cudnn.conv.fp32_precision=ieee" in record["tf32"]


def test_a_test_that_mixed_the_two_apis_does_not_break_the_next_one():
    torch.backends.cudnn.conv.fp32_precision = "ieee"  # new API for conv only, RNN left at tf32
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.backends.cudnn.allow_tf32  # noqa: B018 - the legacy read torch refuses
    state = numerics.Tf32State(torch, "cuda")  # captures without the refused read
    with numerics.tf32_allowed(CUDA, True):
        assert precisions() == ["tf32", "tf32", "tf32"]
    assert precisions()[1:] == ["ieee", "tf32"]
    state.restore()


def test_legacy_flags_are_used_where_torch_has_no_precision_api(monkeypatch):
    monkeypatch.setattr(numerics, "has_precision_api", lambda torch: False)
    torch.backends.cuda.matmul.allow_tf32 = True
    with numerics.true_fp32(CUDA):
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    assert numerics.tf32_description(torch) == "cuda.allow_tf32=True, cudnn.allow_tf32=True"
    torch.backends.cuda.matmul.allow_tf32 = False


def test_on_cpu_true_fp32_pins_onednn_to_ieee_and_records_nothing():
    mkldnn = (torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv)
    mkldnn[0].fp32_precision = "bf16"  # a site that let oneDNN use bf16 for fp32 matmuls
    record = Recorder()
    with numerics.true_fp32(torch.device("cpu"), record):
        assert [s.fp32_precision for s in mkldnn] == ["ieee", "ieee"]
    assert [s.fp32_precision for s in mkldnn] == ["bf16", "none"] and record == {}


def test_bitwise_reproducible_sets_deterministic_kernels_and_says_so(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True
    record = Recorder()
    with numerics.bitwise_reproducible(CUDA, record):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is False
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark is True
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert record["cuda_determinism"] == (
        "use_deterministic_algorithms(True), cudnn.benchmark=False, CUBLAS_WORKSPACE_CONFIG=:4096:8"
    )


def test_bitwise_reproducible_keeps_a_deterministic_workspace_and_replaces_others(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with numerics.bitwise_reproducible(CUDA):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with numerics.bitwise_reproducible(CUDA):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":0:0"


def test_nothing_changes_on_cpu():
    record = Recorder()
    with numerics.bitwise_reproducible(torch.device("cpu"), record):
        assert not torch.are_deterministic_algorithms_enabled()
    assert record == {}
