"""ci/gpu-smoke.sh end to end on this CPU machine: install from a wheel without network,
run part of the suite from an empty directory, summarise, and fail the way a GPU run would.

The environment of the test run stands in for the GPU image (it has torch, pytest, xdist,
nvidia-ml-py and junitparser); the wheel goes into the script's private site directory,
so the preflight also proves that the copy that ran is the wheel's, not this checkout's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT, build_wheel

SCRIPT = ROOT / "ci" / "gpu-smoke.sh"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheels")
    build_wheel(out)
    return out


def smoke(wheels, out, *args, python=sys.executable, **env):
    environ = {**os.environ, "PYTHON": python, "SMOKE_TIMEOUT": "200", **env}
    environ.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(
        ["bash", str(SCRIPT), str(wheels), str(out), *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=400,
    )


def test_passing_run_writes_junit_summary_and_few_files(wheels, tmp_path):
    out = tmp_path / "out"
    done = smoke(wheels, out, "-k", "test_torch_imports_and_is_recent or test_gloo_available", SMOKE_EXPECT_GPUS="0")
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.txt", "exit.txt", "inventory.json", "junit.xml", "pytest.log", "summary.txt"]
    assert len(files) <= 8  # what a device run brings back
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("suite: 2 tests: 2 passed, 0 failed, 0 errors, 0 skipped")
    env = (out / "env.txt").read_text()
    assert "pytest_gpuconform from " in env and "/site/pytest_gpuconform/" in env
    assert (out / "exit.txt").read_text().strip() == "0"


def test_failed_check_fails_the_script_and_is_listed_with_its_message(wheels, tmp_path):
    out = tmp_path / "out"
    done = smoke(wheels, out, "-k", "test_expected_gpus_present")  # SMOKE_EXPECT_GPUS=1 on a CPU node
    assert done.returncode == 1, done.stdout + done.stderr
    summary = (out / "summary.txt").read_text()
    assert "1 failed" in summary and "test_expected_gpus_present: AssertionError: expected >= 1 GPU(s)" in summary


def test_bad_inputs_and_a_broken_image_stop_before_the_run(wheels, tmp_path):
    assert smoke(tmp_path / "no-such-dir", tmp_path / "out").returncode == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    done = smoke(empty, tmp_path / "out")
    assert done.returncode == 2 and "expected exactly one pytest_gpuconform-*.whl" in done.stderr
    # an interpreter without torch (and the rest): install or preflight fails, saying what is missing
    bare = Path("/usr/bin/python3")
    if not bare.exists():
        pytest.skip("no interpreter without torch on this machine to stand in for a broken image")
    done = smoke(wheels, tmp_path / "broken", python=str(bare))
    assert done.returncode == 3, done.stdout + done.stderr
    env = (tmp_path / "broken" / "env.txt").read_text()
    assert "missing (add their wheels to WHEEL_DIR): torch" in env or "pip could not install" in env
