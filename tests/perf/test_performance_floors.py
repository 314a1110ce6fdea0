"""Performance floors, peer comparison and the measurement protocol, without a GPU.

The floors table and the peer comparison are pure and tested with numbers. The shipped
checks' bodies are called directly with the measurement swapped for injected results (a
slow GPU, a GPU below its floor, a degraded link under load, a slow all_reduce), so the
check logic that would run in a CUDA rank is shown to fail, naming GPU and bound.
"""

from __future__ import annotations

import json

import pytest

from pytest_gpuconform.checks import hardware
from pytest_gpuconform.conformance import test_performance as shipped
from pytest_gpuconform.health import readings as health
from pytest_gpuconform.node import nvml
from pytest_gpuconform.perf import floors, peers
from pytest_gpuconform.perf import measure as perf
from support import h100  # CPU-node skips of these checks: tests/health/test_health.py


# -- floors table ---------------------------------------------------------------------------
def test_shipped_floors_are_half_the_datasheet_peak():
    table = floors.load()
    h100_sxm = table.lookup("NVIDIA H100 80GB HBM3")
    assert h100_sxm.gemm_tflops == pytest.approx({"fp32": 33.5, "tf32": 247.35, "fp16": 494.7, "bf16": 494.7})
    assert h100_sxm.all_reduce_busbw_gbps == pytest.approx(135.0)
    # what was measured on one H100 here (8192^3 bf16, about 790 TFLOP/s) clears the floor
    assert 790 > h100_sxm.gemm_tflops["bf16"]
    assert table.lookup("nvidia a100-sxm4-80gb").gemm_tflops["bf16"] == pytest.approx(156.0)
    assert table.lookup("NVIDIA H100 PCIe").all_reduce_busbw_gbps is None
    assert table.lookup("NVIDIA GeForce RTX 4090") is None
    assert "no performance floor for GPU model 'NVIDIA GeForce RTX 4090'" in table.missing_reason(
        "NVIDIA GeForce RTX 4090"
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something else"}', "is not a floors file"),
        (
            '{"format": "pytest-gpuconform perf floors", "fraction_of_peak": {"gemm_tflops": 0.5, "all_reduce_busbw_gbps": 0.3},'
            ' "models": [{"model": "X", "names": ["X"], "peak_tflops": {"bf16": -1}}]}',
            "peak_tflops.bf16 = -1 must be a positive number",
        ),
    ],
)
def test_bad_floors_file_says_why(tmp_path, content, message):
    path = tmp_path / "floors.json"
    path.write_text(content)
    with pytest.raises(floors.BadFloors, match=message):
        floors.load(path)
    with pytest.raises(floors.BadFloors, match="cannot read floors file"):
        floors.load(tmp_path / "missing.json")


# -- peer comparison ------------------------------------------------------------------------
def test_slow_gpu_among_peers_is_flagged_against_the_median():
    values = {f"GPU {i}": 780.0 + i for i in range(7)}
    values["GPU 7"] = 520.0  # clears the 494.7 floor, but a third slower than its neighbours
    (slow,) = peers.slow_peers(values, 0.1)
    assert slow.label == "GPU 7" and slow.value == 520.0 and slow.median == pytest.approx(782.5)
    line = slow.line("bf16 GEMM", "TFLOP/s", 0.1)
    assert line == (
        "GPU 7: bf16 GEMM = 520 TFLOP/s, 33.5% below the node median 782.5; "
        "bound >= 704.2 (--gpuconform-peer-fraction 0.1)"
    )


def test_equal_peers_and_a_single_gpu_pass():
    assert peers.slow_peers({"GPU 0": 790.0, "GPU 1": 760.0}, 0.1) == []
    assert peers.slow_peers({"GPU 0": 1.0}, 0.1) == []


# -- measurement protocol --------------------------------------------------------------------
def test_throughput_formulas():
    assert perf.gemm_tflops(8192, 1.3917) == pytest.approx(790.0, rel=1e-3)
    # 256 MiB over 8 ranks in 1 ms: algbw 268.4 GB/s, busbw x 2*7/8
    assert perf.bus_bandwidth_gbps(256 * 2**20, 1.0, 8) == pytest.approx(268.435456 * 1.75)
    assert perf.bus_bandwidth_gbps(256 * 2**20, 1.0, 1) == 0.0


def test_gemm_measurement_runs_warmup_then_takes_the_median_on_cpu():
    import torch

    calls = []
    result = perf.measure_gemm(
        torch.device("cpu"), "fp32", n=64, warmup=2, repeats=5, while_loaded=lambda: calls.append("loaded")
    )
    assert result.n == 64 and result.tflops > 0 and calls == ["loaded"]
    assert result.tflops == pytest.approx(perf.gemm_tflops(64, result.median_ms))
    timing = perf.time_repeats(torch, torch.device("cpu"), lambda: None, 0, 5)
    assert len(timing.times_ms) == 5 and timing.median_ms == sorted(timing.times_ms)[2]


def test_all_reduce_measurement_on_a_one_rank_gloo_group(tmp_path):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        median_ms, busbw = perf.measure_all_reduce(torch.device("cpu"), 1, 1024, warmup=1, repeats=3)
    finally:
        dist.destroy_process_group()
    assert median_ms > 0 and busbw == 0.0  # one rank moves nothing over the bus


# -- the shipped checks with injected measurements --------------------------------------------
GPUS = tuple(
    nvml.GpuInfo(i, "NVIDIA H100 80GB HBM3", h100(i)["uuid"], h100(i)["bus_id"], 80 * 2**30, (9, 0)) for i in range(4)
)


def label(i: int) -> str:
    return f"GPU {i} ({GPUS[i].uuid}, bus {GPUS[i].pci_bus_id})"


class Recorder(dict):
    def __call__(self, name, value):
        self.setdefault(name, []).append(value)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend torch sees the four GPUs above; measure_gemm returns the injected TFLOP/s."""
    import torch

    tflops = {g.uuid: 790.0 for g in GPUS}
    monkeypatch.setattr(hardware, "cuda_devices", lambda: [(i, g.uuid) for i, g in enumerate(GPUS)])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: GPUS[i].name)

    def measure(device, precision, n=perf.GEMM_SIZE, warmup=3, repeats=10, while_loaded=None):
        if while_loaded:
            while_loaded()
        value = tflops[GPUS[device.index].uuid]
        return perf.GemmResult(precision, n, 2 * n**3 / value / 1e9, value)

    monkeypatch.setattr(hardware, "measure_gemm", measure)
    return tflops


def setup(table=None, fraction=0.1):
    return perf.PerfSetup(GPUS, GPUS, table or floors.load(), fraction)


def test_gemm_check_passes_healthy_gpus_and_records_them(fake_cuda):
    record = Recorder()
    shipped.test_gemm_throughput("bf16", setup(), record)
    assert record["gpu3_bf16_tflops"] == [790.0] and record["gpu3_bf16_tflops_floor"] == [pytest.approx(494.7)]


def test_gemm_check_fails_a_gpu_below_its_floor_and_a_slow_peer(fake_cuda):
    fake_cuda[GPUS[1].uuid] = 300.0  # below the floor (and its peers)
    fake_cuda[GPUS[2].uuid] = 600.0  # above the floor, 13.7% below the node median (695)
    with pytest.raises(pytest.fail.Exception) as failed:
        shipped.test_gemm_throughput("bf16", setup(), Recorder())
    lines = str(failed.value).splitlines()
    assert f"{label(1)}: bf16 GEMM 8192^3 = 300 TFLOP/s, bound >= 494.7 (floor for H100 SXM5)" in lines
    assert any(
        line.startswith(f"{label(2)}: bf16 GEMM = 600 TFLOP/s, 13.7% below the node median 695; bound >= 625.5")
        for line in lines
    ), lines


def test_gemm_check_on_an_unknown_model_records_and_skips_the_floor(fake_cuda, monkeypatch, tmp_path):
    path = tmp_path / "floors.json"
    path.write_text(
        json.dumps(
            {
                "format": floors.FORMAT,
                "models": [],
                "fraction_of_peak": {"gemm_tflops": 0.5, "all_reduce_busbw_gbps": 0.3},
            }
        )
    )
    one_gpu = perf.PerfSetup(GPUS, GPUS, floors.load(path), 0.1)
    monkeypatch.setattr(hardware, "cuda_devices", lambda: [(0, GPUS[0].uuid)])
    record = Recorder()
    with pytest.raises(pytest.skip.Exception, match="floor not judged: .*no performance floor for GPU model"):
        shipped.test_gemm_throughput("fp16", one_gpu, record)
    assert record["gpu0_fp16_tflops"] == [790.0]


def test_pcie_under_load_fails_a_degraded_link(fake_cuda, monkeypatch):
    seen = {
        g.uuid: health.GpuHealth(
            g.index,
            g.uuid,
            g.pci_bus_id,
            g.name,
            dict(pcie_gen=5, pcie_max_gen=5, pcie_width=16, pcie_max_width=16, clocks_event_reasons=0x1),
        )
        for g in GPUS
    }
    seen[GPUS[3].uuid].values["pcie_gen"] = 2
    monkeypatch.setattr(hardware, "read_node", lambda uuids: [seen[u] for u in uuids])
    with pytest.raises(pytest.fail.Exception) as failed:
        shipped.test_pcie_link_under_load(setup(), Recorder())
    assert str(failed.value) == f"{label(3)}: pcie_gen = 2, bound pcie_max_gen = 5 under load (degraded PCIe link)"


def test_all_reduce_check_fails_below_the_nvlink_floor(monkeypatch):
    import torch

    monkeypatch.setattr(hardware, "measure_all_reduce", lambda device, ws, numel: (9.5, 50.0))  # PCIe-like
    with pytest.raises(AssertionError) as failed:
        shipped.test_all_reduce_bus_bandwidth(0, 2, torch.device("cpu"), setup(), Recorder())
    assert str(failed.value).startswith(
        f"all_reduce busbw over 2 ranks = 50 GB/s, bound >= 135 (floor for H100 SXM5); GPUs {label(0)}, {label(1)}"
    )
    monkeypatch.setattr(hardware, "measure_all_reduce", lambda device, ws, numel: (1.0, 400.0))
    shipped.test_all_reduce_bus_bandwidth(0, 2, torch.device("cpu"), setup(), Recorder())
