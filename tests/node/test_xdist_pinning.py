"""Under -n, each xdist worker owns one GPU, pinned by the controller (fake NVML here)."""

import pytest

RECORDER = """
import os, time
import pytest

def _note(tag=""):
    with open(os.path.join({out!r}, os.environ["PYTEST_XDIST_WORKER"] + ".txt"), "a") as f:
        f.write(f"{{os.environ.get('CUDA_VISIBLE_DEVICES')}} {{os.environ.get('CUDA_DEVICE_ORDER')}} {{tag}}\\n")

{crasher}
@pytest.mark.parametrize("i", range(8))
def test_note(i):
    _note()
    time.sleep(0.6)
"""

CRASHER = """
def test_crash():
    _note("crashed")
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
    assert sorted(p for s in pins.values() for p in s) == ["0", "1"]
    assert all("PCI_BUS_ID" in line for f in out.glob("*.txt") for line in f.read_text().splitlines())


def test_outer_device_list_is_indexed_not_replaced(run_gpuconform, pytester, fake_nvml, tmp_path, monkeypatch):
    from support import h100

    fake_nvml({"gpus": [h100(0), h100(1), h100(2), h100(3)]})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    out = tmp_path / "notes"
    out.mkdir()
    pytester.makepyfile(test_pin=RECORDER.format(out=str(out), crasher=""))
    result = run_gpuconform("-n", "auto")
    result.assert_outcomes(passed=8)
    pins = _pins(out)
    assert sorted(p for s in pins.values() for p in s) == ["1", "3"]


def test_restarted_worker_keeps_its_gpu(run_gpuconform, pytester, fake_nvml, tmp_path):
    from support import h100

    fake_nvml({"gpus": [h100(0), h100(1)]})
    out = tmp_path / "notes"
    out.mkdir()
    pytester.makepyfile(test_pin=RECORDER.format(out=str(out), crasher=CRASHER))
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
