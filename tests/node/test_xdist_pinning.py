"""Under -n, each xdist worker owns one GPU, pinned by UUID by the controller (fake NVML here).

A UUID names one board whatever CUDA_DEVICE_ORDER the worker has, and an outer allocation
(indices, UUIDs, MIG devices) is narrowed into UUIDs, never replaced.
"""

import pytest

RECORDER = """
import os, time
import pytest

def _note(tag=""):
    with open(os.path.join({out!r}, os.environ["PYTEST_XDIST_WORKER"] + ".txt"), "a") as f:
        f.write(f"{{os.environ.get('CUDA_VISIBLE_DEVICES')}} {{os.environ.get('CUDA_DEVICE_ORDER')}} {{tag}}\\n")

def _replacement_has_run():
    return any(not name.startswith(("gw0", "gw1")) for name in os.listdir({out!r}) if name.startswith("gw"))

{crasher}
@pytest.mark.parametrize("i", range(8))
def test_note(i):
    _note()
    time.sleep(0.6)
    # After a crash the first workers wait (60 s at most) until the replacement has run a
    # test, so a slow replacement start on a busy machine cannot leave it nothing to run.
    deadline = time.time() + 60
    while os.path.exists(os.path.join({out!r}, "crashed")) and not _replacement_has_run() and time.time() < deadline:
        time.sleep(0.1)
"""

CRASHER = """
def test_crash():
    _note("crashed")
    open(os.path.join({out!r}, "crashed"), "w").close()
    os._exit(1)
"""


def _pins(directory) -> dict[str, set[str]]:
    pins = {}
    for path in directory.glob("gw*.txt"):
        pins[path.stem] = {line.split()[0] for line in path.read_text().splitlines()}
    return pins


def test_auto_gives_one_worker_per_gpu(run_gpuconform, pytester, fake_nvml, tmp_path):
    from support import h100

    fake_nvml({"gpus": [h100(0), h100(1)]})
    out = tmp_path / "notes"
    out.mkdir()
    pytester.makepyfile(test_pin=RECORDER.format(out=str(out), crasher=""))
    result = run_gpuconform("-n", "auto")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*2 workers*"])
    pins = _pins(out)
    assert sorted(pins) == ["gw0", "gw1"]
    assert sorted(p for s in pins.values() for p in s) == [h100(0)["uuid"], h100(1)["uuid"]]


@pytest.mark.parametrize(
    "outer, order, expected",
    [
        ("3,1", None, [3, 1]),  # indices into the outer allocation (Slurm)
        ("3,1", "PCI_BUS_ID", [3, 1]),
        ("GPU-00000002,GPU-00000000", None, [2, 0]),  # UUID prefixes (Kubernetes device plugins)
    ],
)
def test_outer_device_list_is_narrowed_into_uuids(
    run_gpuconform, pytester, fake_nvml, tmp_path, monkeypatch, outer, order, expected
):
    from support import h100

    fake_nvml({"gpus": [h100(0), h100(1), h100(2), h100(3)]})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", outer)
    if order:
        monkeypatch.setenv("CUDA_DEVICE_ORDER", order)
    out = tmp_path / "notes"
    out.mkdir()
    pytester.makepyfile(test_pin=RECORDER.format(out=str(out), crasher=""))
    result = run_gpuconform("-n", "auto")
    result.assert_outcomes(passed=8)
    pins = _pins(out)
    assert sorted(p for s in pins.values() for p in s) == sorted(h100(i)["uuid"] for i in expected)


def test_mig_devices_are_pinned_one_per_worker(run_gpuconform, pytester, fake_nvml, tmp_path, monkeypatch):
    from support import h100

    migs = [
        {"uuid": f"MIG-{i}0000000-1111-2222-3333-444444444444", "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb"}
        for i in (1, 2)
    ]
    fake_nvml({"gpus": [h100(0, mig={"enabled": 1, "devices": migs})]})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", migs[1]["uuid"])
    out = tmp_path / "notes"
    out.mkdir()
    pytester.makepyfile(test_pin=RECORDER.format(out=str(out), crasher=""))
    result = run_gpuconform("-n", "auto")
    result.assert_outcomes(passed=8)
    assert {p for s in _pins(out).values() for p in s} == {migs[1]["uuid"]}


def test_restarted_worker_keeps_its_gpu(run_gpuconform, pytester, fake_nvml, tmp_path):
    from support import h100

    fake_nvml({"gpus": [h100(0), h100(1)]})
    out = tmp_path / "notes"
    out.mkdir()
    pytester.makepyfile(test_pin=RECORDER.format(out=str(out), crasher=CRASHER.format(out=str(out))))
    result = run_gpuconform("-n", "2", "--max-worker-restart", "2", "--maxschedchunk", "1")
    result.assert_outcomes(passed=8, failed=1)
    crashed = [p for p in out.glob("gw*.txt") if "crashed" in p.read_text()]
    assert len(crashed) == 1
    crashed_gpu = crashed[0].read_text().split()[0]
    replacements = [p for p in out.glob("gw*.txt") if p.stem not in ("gw0", "gw1")]
    assert replacements, "no replacement worker ran a test"
    assert {line.split()[0] for line in replacements[0].read_text().splitlines()} == {crashed_gpu}
    result.stdout.fnmatch_lines(["*replacing crashed worker*"])


def test_more_workers_than_gpus_is_a_usage_error(pytester, fake_nvml):
    from support import h100

    fake_nvml({"gpus": [h100(0), h100(1)]})
    result = pytester.runpytest_subprocess("--gpuconform", "-p", "no:cacheprovider", "-n", "3")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*-n 3 on a node with 2 visible GPU(s) would make workers share GPUs*"])


def test_cpu_node_keeps_xdist_defaults(run_gpuconform, pytester, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    pytester.makepyfile(test_pin=RECORDER.format(out=str(out), crasher=""))
    result = run_gpuconform("-n", "2")
    result.assert_outcomes(passed=8)
    pins = _pins(out)
    assert set().union(*pins.values()) == {"None"}
