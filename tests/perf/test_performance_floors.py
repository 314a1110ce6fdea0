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
def test_shipped_floors_use_measured_figures_where_published_and_datasheet_peaks_elsewhere():
    table = floors.load()
    h100_sxm = table.lookup("NVIDIA H100 80GB HBM3")
    # bf16: 0.7 x 794.5 measured (MAMF); the other precisions: 0.5 x the dense datasheet peak
    assert h100_sxm.gemm_tflops == pytest.approx({"fp32": 33.5, "tf32": 247.35, "fp16": 494.7, "bf16": 556.15})
    assert h100_sxm.gemm_basis["bf16"].startswith("0.7 x 794.5 TFLOP/s measured (mamf: NVIDIA H100 SXM")
    assert h100_sxm.gemm_basis["fp16"] == "0.5 x 989.4 TFLOP/s datasheet peak"
    assert h100_sxm.all_reduce_busbw_gbps == pytest.approx(184.0)  # 0.4 x 460 (nccl-tests, 8 x H100)
    assert h100_sxm.busbw_basis.startswith("0.4 x 460 GB/s measured (nccl_tests")
    assert table.lookup("nvidia a100-sxm4-80gb").gemm_tflops["bf16"] == pytest.approx(0.7 * 271.2)
    assert table.lookup("NVIDIA H100 PCIe").all_reduce_busbw_gbps is None
    assert table.lookup("NVIDIA GeForce RTX 4090") is None
    assert "no performance floor for GPU model 'NVIDIA GeForce RTX 4090'" in table.missing_reason(
        "NVIDIA GeForce RTX 4090"
    )


# What each added model's floors are, and on which basis (H200, B200, GB200, L40S,
# A10G, H100 PCIe/NVL); NVLink-bridge and PCIe boards have no all_reduce floor.
ADDED_MODELS = {
    "NVIDIA H200": ({"bf16": 0.7 * 770.0, "fp16": 494.7, "tf32": 247.35, "fp32": 33.5}, 135.0),
    "NVIDIA H200 NVL": ({"bf16": 417.75, "fp32": 30.0}, None),
    "NVIDIA B200": ({"bf16": 0.7 * 1745.0, "fp16": 1125.0, "tf32": 562.5, "fp32": 37.5}, 270.0),
    "NVIDIA GB200": ({"bf16": 0.7 * 1822.0, "fp16": 1250.0, "tf32": 625.0, "fp32": 40.0}, 270.0),
    "NVIDIA L40S": ({"bf16": 181.0, "tf32": 91.5, "fp32": 45.8}, None),
    "NVIDIA A10G": ({"bf16": 35.0, "tf32": 17.5, "fp32": 17.5}, None),
    "NVIDIA H100 PCIe": ({"bf16": 378.0, "fp32": 25.5}, None),
    "NVIDIA H100 NVL": ({"bf16": 417.75, "tf32": 208.75}, None),
}


@pytest.mark.parametrize("name", sorted(ADDED_MODELS))
def test_added_models_have_floors_with_a_basis(name):
    table = floors.load()
    model = table.lookup(name)
    gemm, busbw = ADDED_MODELS[name]
    for precision, floor in gemm.items():
        assert model.gemm_tflops[precision] == pytest.approx(floor), precision
        assert model.gemm_basis[precision]
    assert set(model.gemm_tflops) == set(floors.GEMM_PRECISIONS) and model.source
    assert model.all_reduce_busbw_gbps == (pytest.approx(busbw) if busbw else None)


def test_the_h200_reference_measurement_clears_every_h200_floor_by_its_margin():
    """bf16 8192^3 on an H200 measured 770-800 TFLOP/s (torch 2.11, CUDA 13); the floor is 0.7 of the
    low end, so a healthy board clears it by 30% and one at two thirds of its speed fails."""
    floor = floors.load().lookup("NVIDIA H200").gemm_tflops["bf16"]
    assert 770 / floor == pytest.approx(1 / 0.7) and 770 * 0.66 < floor


def test_measured_figures_need_a_source_and_a_fraction(tmp_path):
    def table(**model):
        return {
            "format": floors.FORMAT,
            "fraction_of_peak": {"gemm_tflops": 0.5, "all_reduce_busbw_gbps": 0.3},
            "models": [{"model": "X", "names": ["X"], **model}],
        }

    path = tmp_path / "floors.json"
    path.write_text(json.dumps(table(measured_tflops={"bf16": {"value": 100.0, "source": "here"}})))
    with pytest.raises(floors.BadFloors, match="has measured_tflops but .* has no fraction_of_measured"):
        floors.load(path)
    with_fraction = table(measured_tflops={"bf16": {"value": 100.0}})
    with_fraction["fraction_of_measured"] = {"gemm_tflops": 0.7, "all_reduce_busbw_gbps": 0.4}
    path.write_text(json.dumps(with_fraction))
    with pytest.raises(floors.BadFloors, match=r"measured_tflops.bf16 must be \{\"value\": number"):
        floors.load(path)
    # a version 1 site file (peaks only) still reads
    path.write_text(json.dumps(table(peak_tflops={"bf16": 100.0}, nvlink_unidirectional_gbps=100.0)))
    model = floors.load(path).lookup("X")
    assert model.gemm_tflops == {"bf16": 50.0} and model.all_reduce_busbw_gbps == pytest.approx(30.0)


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
class FakeCuda:
    """Stand-in for the torch.cuda calls of the timing protocol: which device is current,
    which stream each event was recorded on, and when the host waited for the device."""

    def __init__(self):
        self.current, self.log = 0, []

    def install(self, monkeypatch):
        import contextlib

        import torch

        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing

            def record(self, stream=None):
                fake.log.append(("record", stream, fake.current))

            def elapsed_time(self, other):
                return 2.0

        @contextlib.contextmanager
        def device(d):
            before, fake.current = fake.current, d.index
            fake.log.append(("current", d.index))
            yield
            fake.current = before

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: f"stream of cuda:{d.index}")
        monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: fake.log.append(("synchronize", d.index)))
        return self


def test_cuda_timing_uses_the_measured_devices_stream_and_waits_around_the_timed_region(monkeypatch):
    import torch

    cuda = FakeCuda().install(monkeypatch)
    steps = []
    timing = perf.time_repeats(torch, torch.device("cuda", 5), lambda: steps.append(cuda.current), 2, 3)
    assert timing.median_ms == 2.0 and len(steps) == 5 and set(steps) == {5}  # every step ran with cuda:5 current
    records = [entry for entry in cuda.log if entry[0] == "record"]
    assert records == [("record", "stream of cuda:5", 5)] * 6  # start and end of 3 repeats, on cuda:5's stream
    first_record = cuda.log.index(records[0])
    assert ("synchronize", 5) in cuda.log[:first_record]  # warm-up finished before timing began
    assert cuda.log[-1] == ("synchronize", 5)  # and the events are read only after the device is done
    assert cuda.log[0] == ("current", 5)


def test_warm_up_runs_for_a_minimum_time_as_well_as_a_minimum_count(monkeypatch):
    import torch

    FakeCuda().install(monkeypatch)
    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(perf.time, "perf_counter", lambda: next(clock) * 0.01)  # 10 ms per call
    steps = []
    perf._warm_up(torch, torch.device("cuda", 0), lambda: steps.append(1), count=2, seconds=0.1)
    assert len(steps) >= 9  # 2 were asked for, 0.1 s of them were needed
    steps.clear()
    perf._warm_up(torch, torch.device("cpu"), lambda: steps.append(1), count=3, seconds=0.0)
    assert len(steps) == 3


def test_all_reduce_warm_up_is_by_count_only(monkeypatch):
    """Every rank must issue the same number of collectives: a time-based warm-up could let
    ranks disagree and hang."""
    import torch

    seen = {}

    def fake_time_repeats(torch_, device, step, warmup, repeats, while_loaded=None, warmup_seconds=0.0):
        seen.update(warmup=warmup, repeats=repeats, warmup_seconds=warmup_seconds)
        return perf.Timing(1.0, (1.0,) * repeats)

    monkeypatch.setattr(perf, "time_repeats", fake_time_repeats)
    monkeypatch.setattr("torch.distributed.all_reduce", lambda tensor, op=None: None)
    perf.measure_all_reduce(torch.device("cpu"), 2, 16)
    assert seen == {"warmup": 10, "repeats": 20, "warmup_seconds": 0.0}
    assert perf.ALL_REDUCE_BYTES == 2**30


def test_gemm_sets_tf32_for_exactly_its_precision(monkeypatch):
    """tf32 allows TF32, every other precision forbids it (through checks/numerics.py, which
    uses the API torch has and restores the switches; tested in tests/checks)."""
    import contextlib

    import torch

    from pytest_gpuconform.checks import numerics

    asked = []

    @contextlib.contextmanager
    def spy(device, allowed):
        asked.append((device.type, allowed))
        yield

    monkeypatch.setattr(numerics, "tf32_allowed", spy)
    for precision in ("tf32", "fp32", "bf16"):
        perf.measure_gemm(torch.device("cpu"), precision, n=8, warmup=0, repeats=1)
    assert asked == [("cpu", True), ("cpu", False), ("cpu", False)]


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
    # CUDA prints UUIDs bare; the checks find NVML's GPU- boards by them
    monkeypatch.setattr(hardware, "cuda_devices", lambda: [(i, g.uuid[4:]) for i, g in enumerate(GPUS)])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: GPUS[i].name)

    def measure(device, precision, n=perf.GEMM_SIZE, warmup=3, repeats=10, while_loaded=None, warmup_seconds=None):
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
    assert record["gpu3_bf16_tflops"] == [790.0] and record["gpu3_bf16_tflops_floor"] == [pytest.approx(556.15)]


def test_gemm_check_fails_a_gpu_below_its_floor_and_a_slow_peer(fake_cuda):
    fake_cuda[GPUS[1].uuid] = 300.0  # below the floor (and its peers)
    fake_cuda[GPUS[2].uuid] = 600.0  # above the floor, 13.7% below the node median (695)
    with pytest.raises(pytest.fail.Exception) as failed:
        shipped.test_gemm_throughput("bf16", setup(), Recorder())
    lines = str(failed.value).splitlines()
    assert (
        f"{label(1)}: bf16 GEMM 8192^3 = 300 TFLOP/s, bound >= 556.1 (floor for H100 SXM5: 0.7 x 794.5 TFLOP/s "
        "measured (mamf: NVIDIA H100 SXM, torch 2.7.0+cu126, best shape 2048x2048x13312))"
    ) in lines
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
    monkeypatch.setattr(hardware, "cuda_devices", lambda: [(0, GPUS[0].uuid[4:])])
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
    monkeypatch.setattr(hardware, "read_node", lambda uuids: [seen[u] for u in uuids])  # board UUIDs, GPU- form
    with pytest.raises(pytest.fail.Exception) as failed:
        shipped.test_pcie_link_under_load(setup(), Recorder())
    assert str(failed.value) == f"{label(3)}: pcie_gen = 2, bound pcie_max_gen = 5 under load (degraded PCIe link)"


def test_all_reduce_check_fails_below_the_nvlink_floor(monkeypatch):
    import torch

    # each rank names its own GPU; here ranks 0 and 1 sit on boards 2 and 0 (a lease under -n)
    monkeypatch.setattr(shipped, "_rank_gpus", lambda device, ws, s: ([label(2), label(0)], [GPUS[0].name] * 2))
    monkeypatch.setattr(hardware, "measure_all_reduce", lambda device, ws, numel: (9.5, 50.0))  # PCIe-like
    with pytest.raises(AssertionError) as failed:
        shipped.test_all_reduce_bus_bandwidth(0, 2, torch.device("cpu"), setup(), Recorder())
    assert str(failed.value).startswith(
        "all_reduce busbw over 2 ranks = 50 GB/s, bound >= 184 (floor for H100 SXM5: 0.4 x 460 GB/s measured "
        f"(nccl_tests: 8 x H100 SXM5 NVLink, 460-480 GB/s (lower end used))); GPUs {label(2)}, {label(0)}"
    )
    monkeypatch.setattr(hardware, "measure_all_reduce", lambda device, ws, numel: (1.0, 400.0))
    shipped.test_all_reduce_bus_bandwidth(0, 2, torch.device("cpu"), setup(), Recorder())


def test_all_reduce_floor_is_not_judged_across_models_or_for_pcie_boards(monkeypatch):
    import torch

    monkeypatch.setattr(hardware, "measure_all_reduce", lambda device, ws, numel: (9.5, 50.0))
    mixed = ([label(0), label(1)], ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"])
    monkeypatch.setattr(shipped, "_rank_gpus", lambda device, ws, s: mixed)
    with pytest.raises(pytest.skip.Exception, match="of different models"):
        shipped.test_all_reduce_bus_bandwidth(0, 2, torch.device("cpu"), setup(), Recorder())
    pcie = ([label(0), label(1)], ["NVIDIA H100 PCIe"] * 2)
    monkeypatch.setattr(shipped, "_rank_gpus", lambda device, ws, s: pcie)
    with pytest.raises(pytest.skip.Exception, match="no all_reduce floor for H100 PCIe"):
        shipped.test_all_reduce_bus_bandwidth(0, 2, torch.device("cpu"), setup(), Recorder())


def test_peers_are_compared_within_one_model(fake_cuda, monkeypatch):
    """A node with two models: the slower model is not a slow peer of the faster one."""
    mixed = GPUS[:2] + tuple(
        nvml.GpuInfo(i, "NVIDIA A100-SXM4-80GB", GPUS[i].uuid, GPUS[i].pci_bus_id, 80 * 2**30, (8, 0)) for i in (2, 3)
    )
    for g in mixed[2:]:
        fake_cuda[g.uuid] = 270.0
    shipped.test_gemm_throughput("bf16", perf.PerfSetup(mixed, mixed, floors.load(), 0.1), Recorder())
    fake_cuda[mixed[3].uuid] = 200.0  # clears the A100 floor (189.8), 26% below the other A100
    with pytest.raises(pytest.fail.Exception) as failed:
        shipped.test_gemm_throughput("bf16", perf.PerfSetup(mixed, mixed, floors.load(), 0.1), Recorder())
    (line,) = str(failed.value).splitlines()
    assert line.startswith(f"GPU 3 ({mixed[3].uuid}, bus {mixed[3].pci_bus_id}): bf16 GEMM = 200 TFLOP/s")
