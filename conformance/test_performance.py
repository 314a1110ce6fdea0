"""Performance floors: does every GPU deliver the throughput its model should?

Hard rules fail at once elsewhere; here a number is measured (warm-up, then the median of
timed repeats), recorded, and compared three ways:

* with the floor for the GPU's model (pytest_gpuconform/perf/data/perf_floors.json: vendor peak
  x a documented fraction); a model without a floor is recorded and its floor skipped with
  the reason;
* with the node's other GPUs (peer comparison): a GPU more than --gpuconform-peer-fraction
  below the median fails, which catches a slow board that still clears the floor. So one
  test measures every visible GPU in turn, in its own process (a CUDA rank of the engine);
* with a saved baseline, when --gpuconform-baseline is given (numbers named *_tflops and
  *_gbps; see pytest_gpuconform/perf/baseline.py).

Under pytest-xdist each worker sees one GPU, so the peer comparison has nothing to compare
and says so; run the performance tests without -n for it.
"""

import pytest

from pytest_gpuconform.checks import hardware
from pytest_gpuconform.checks.hardware import health_rules

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
ALL_REDUCE_NUMEL = hardware.ALL_REDUCE_BYTES // 4  # 1 GiB of fp32: where NCCL's bus bandwidth has plateaued


@pytest.fixture(scope="module")
def perf_setup(node_inventory, perf_floors, gpuconform_settings):
    node = node_inventory.node
    # every board and MIG device: CUDA's UUIDs are matched against all of them
    return hardware.PerfSetup(node.devices, tuple(node.visible), perf_floors, gpuconform_settings.peer_fraction)


def _label(gpu, uuid: str, ordinal: int) -> str:
    return hardware.cuda_ordinal_label(ordinal, uuid) if gpu is None else gpu.label()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gemm_throughput(precision, perf_setup, record):
    """Dense 8192^3 matmul TFLOP/s of every visible GPU against its floor and its peers."""
    import torch

    problems, skipped_floors, measured, models = [], [], {}, {}
    for ordinal, uuid in hardware.cuda_devices():
        gpu = perf_setup.gpu(uuid)
        label = _label(gpu, uuid, ordinal)
        major, _ = torch.cuda.get_device_capability(ordinal)
        if precision in ("tf32", "bf16") and major < 8:
            skipped_floors.append(f"{label}: {precision} needs compute capability >= 8.0")
            continue
        result = hardware.measure_gemm(torch.device("cuda", ordinal), precision)
        name = f"gpu{gpu.index if gpu else ordinal}_{precision}_tflops"
        record(name, result.tflops)
        measured[label] = result.tflops
        models.setdefault(gpu.name if gpu else torch.cuda.get_device_name(ordinal), []).append(label)
        model = perf_setup.floor_table.lookup(gpu.name if gpu else torch.cuda.get_device_name(ordinal))
        floor = model.gemm_tflops.get(precision) if model else None
        if floor is None:
            skipped_floors.append(
                f"{label}: "
                + perf_setup.floor_table.missing_reason(gpu.name if gpu else torch.cuda.get_device_name(ordinal))
            )
            continue
        record(f"{name}_floor", floor)
        if result.tflops < floor:
            problems.append(
                f"{label}: {precision} GEMM {result.n}^3 = {result.tflops:.4g} TFLOP/s, "
                f"bound >= {floor:.4g} (floor for {model.model}: {model.gemm_basis.get(precision, 'see floors file')})"
            )
    for labels in models.values():  # peers are GPUs of the same model
        slow = hardware.slow_peers({label: measured[label] for label in labels}, perf_setup.peer_fraction)
        problems += [s.line(f"{precision} GEMM", "TFLOP/s", perf_setup.peer_fraction) for s in slow]
    if len(measured) < 2:
        record("peer_comparison", f"skipped: {len(measured)} GPU measured in this process, needs >= 2")
    for note in skipped_floors:
        record("floor_skipped", note)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    if skipped_floors and len(measured) < 2:
        pytest.skip("floor not judged: " + "; ".join(skipped_floors))


@pytest.mark.gpu
def test_pcie_link_under_load(perf_setup, record):
    """PCIe generation and width at their maximum while a GEMM keeps the GPU busy.

    Links drop generation at idle, so test_health.py excuses an idle GPU; this is where the
    link is judged without that excuse.
    """
    import torch

    problems, judged, notes = [], 0, []
    for ordinal, uuid in hardware.cuda_devices():
        gpu = perf_setup.gpu(uuid)  # CUDA's UUID is bare; NVML's board is found by it
        if gpu is None:
            notes.append(f"{_label(gpu, uuid, ordinal)}: not listed by NVML")
            continue
        board = gpu.board_uuid  # PCIe links belong to the board, also under MIG
        loaded = {}

        def read_link(board=board, loaded=loaded):
            loaded.update({g.uuid: g for g in hardware.read_node([board])})

        precision = "bf16" if torch.cuda.get_device_capability(ordinal)[0] >= 8 else "fp16"
        # ~50 ms of warm-up brings the GPU to full clocks (and its link out of idle), then
        # the link is read while ~100 ms of queued matmuls still run (H100 figures)
        hardware.measure_gemm(
            torch.device("cuda", ordinal), precision, n=8192, warmup=40, repeats=80, while_loaded=read_link
        )
        reading = loaded.get(board)
        if reading is None:
            notes.append(f"{gpu.label()}: NVML did not answer while the GEMM ran")
            continue
        for counter in ("pcie_gen", "pcie_max_gen", "pcie_width", "pcie_max_width"):
            if counter in reading.values:
                record(f"gpu{reading.index}_{counter}_under_load", reading.values[counter])
        finding = health_rules.pcie_link(reading, under_load=True)
        problems += finding.problems
        notes += finding.notes
        judged += finding.applicable
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    if not judged:
        pytest.skip("PCIe link not judged: " + "; ".join(notes))


@pytest.mark.gpu
@pytest.mark.world_size(2, 4, 8)
def test_all_reduce_bus_bandwidth(rank, world_size, device, perf_setup, record):
    """all_reduce bus bandwidth (nccl-tests' busbw) of 1 GiB fp32 over NCCL."""
    median_ms, busbw = hardware.measure_all_reduce(device, world_size, ALL_REDUCE_NUMEL)
    record("all_reduce_ms", median_ms)
    record("all_reduce_busbw_gbps", busbw)
    labels, names = _rank_gpus(device, world_size, perf_setup)
    models = set(names)
    if len(models) != 1:
        pytest.skip(f"floor not judged: the {world_size} GPUs are of different models {sorted(models)}")
    name = models.pop()
    model = perf_setup.floor_table.lookup(name)
    if model is None or model.all_reduce_busbw_gbps is None:
        reason = (
            perf_setup.floor_table.missing_reason(name)
            if model is None
            else (f"no all_reduce floor for {model.model} (PCIe boards: bandwidth depends on the host topology)")
        )
        pytest.skip(f"measured {busbw:.4g} GB/s; floor not judged: {reason}")
    floor = model.all_reduce_busbw_gbps
    record("all_reduce_busbw_gbps_floor", floor)
    assert busbw >= floor, (
        f"all_reduce busbw over {world_size} ranks = {busbw:.4g} GB/s, bound >= {floor:.4g} "
        f"(floor for {model.model}: {model.busbw_basis}); GPUs {', '.join(labels)}"
    )


def _rank_gpus(device, world_size, perf_setup):
    """(label, model name) of every rank's GPU, in rank order. Each rank names its own GPU
    by UUID: which boards the ranks got (inherited or leased under -n) is the rank's
    business, not the controller's list."""
    import torch

    from pytest_gpuconform.checks import gather_text

    uuid = str(torch.cuda.get_device_properties(device).uuid)
    gpu = perf_setup.gpu(uuid)
    label = _label(gpu, uuid, device.index)
    name = gpu.name if gpu else torch.cuda.get_device_name(device)
    return gather_text(label, world_size), gather_text(name, world_size)
