"""A run stopped by SIGTERM (a cancelled CI job, Slurm's time limit) or SIGINT (Ctrl-C)
still leaves a valid report and nothing running.

The first engine exited in 0.6 s on SIGTERM with no JUnit file and left its rank directory
behind; Ctrl-C wrote a JUnit file that failed the schema and a summary that counted the
interrupted test as passed. Here: the in-flight multi-rank test is an error saying what
stopped it and when, the finished tests are in a JUnit file that validates, the summary
counts are right, the exit code is 2, the ranks and the process they started are gone,
no rank directory is left, all within 5 s of the signal.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from support.runs import process_alive, write_files
from support.tools import schema_errors

INTERRUPTED = """
import os, subprocess, time
import pytest
import torch.distributed as dist

def test_0_in_the_controller():
    pass

@pytest.mark.world_size(2)
def test_1_passes(rank):
    dist.barrier()

@pytest.mark.world_size(2)
def test_2_runs_until_stopped(rank):
    child = subprocess.Popen(["sleep", "1000"])
    with open(f"started{rank}", "w") as out:
        out.write(f"{os.getpid()} {child.pid}")
    time.sleep(600)

@pytest.mark.world_size(2)
def test_3_never_starts(rank):
    pass
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_test_leaves_a_valid_report(tmp_path, signum):
    name = signal.Signals(signum).name
    write_files(tmp_path, {"test_interrupted.py": INTERRUPTED})
    temp = tmp_path / "tmp"
    temp.mkdir()
    command = [sys.executable, "-m", "pytest", "--gpuconform", "-p", "no:cacheprovider", "test_interrupted.py"]
    command += ["-k", "cpu or controller", "--junitxml=junit.xml"]
    with open(tmp_path / "output.txt", "w") as output:
        run = subprocess.Popen(
            command, cwd=tmp_path, env=dict(os.environ, TMPDIR=str(temp)), stdout=output, stderr=output
        )
        deadline = time.monotonic() + 180
        started = [tmp_path / "started0", tmp_path / "started1"]
        while not all(p.exists() and p.read_text() for p in started):
            assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "output.txt").read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(0.5)  # the test is now well inside its sleep
        sent = time.monotonic()
        run.send_signal(signum)
        code = run.wait(timeout=60)
        took = time.monotonic() - sent
    text = (tmp_path / "output.txt").read_text()
    pids = [int(p) for path in started for p in path.read_text().split()]

    assert took < 5.0, f"stopping took {took:.1f} s\n{text[-3000:]}"
    assert code == pytest.ExitCode.INTERRUPTED, text[-3000:]
    assert not [pid for pid in pids if process_alive(pid)], "ranks or what they started outlived the run"
    assert not list(temp.glob("gpuconform-*")), "a rank directory was left behind"

    assert schema_errors(tmp_path / "junit.xml") == ""
    cases = {c.get("name"): c for c in ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")}
    assert set(cases) == {"test_0_in_the_controller", "test_1_passes[ws2-cpu]", "test_2_runs_until_stopped[ws2-cpu]"}
    for passed in ("test_0_in_the_controller", "test_1_passes[ws2-cpu]"):
        assert not [e for e in cases[passed] if e.tag in ("failure", "error", "skipped")]
    error = cases["test_2_runs_until_stopped[ws2-cpu]"].find("error")  # pytest's own <error>: a setup error
    assert error is not None, ET.tostring(cases["test_2_runs_until_stopped[ws2-cpu]"])[:800]
    assert re.fullmatch(
        rf'failed on setup with "interrupted by {name} after \d+\.\d s; ranks stopped and killed"', error.get("message")
    ), error.get("message")
    # the summary table: area, device, dtype, ws, pass, fail, error, skip
    assert re.search(r"^interrupted\s+cpu\s+-\s+2\s+1\s+0\s+1\s+0\b", text, re.M), text[-2000:]
    assert f"Interrupted: interrupted by {name}" in text


IN_THE_CONTROLLER = """
import time

def test_0_passes():
    pass

def test_1_runs_until_stopped():
    open("started", "w").write("yes")
    time.sleep(600)
"""


def test_sigterm_in_a_controller_test_is_an_error_not_a_failure(tmp_path):
    write_files(tmp_path, {"test_plain.py": IN_THE_CONTROLLER})
    command = [sys.executable, "-m", "pytest", "--gpuconform", "-p", "no:cacheprovider", "--junitxml=junit.xml"]
    with open(tmp_path / "output.txt", "w") as output:
        run = subprocess.Popen([*command, "test_plain.py"], cwd=tmp_path, stdout=output, stderr=output)
        deadline = time.monotonic() + 120
        while not (tmp_path / "started").exists():
            assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "output.txt").read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(0.3)
        run.send_signal(signal.SIGTERM)
        code = run.wait(timeout=60)
    text = (tmp_path / "output.txt").read_text()
    assert code == pytest.ExitCode.INTERRUPTED, text[-3000:]
    assert schema_errors(tmp_path / "junit.xml") == ""
    root = ET.parse(tmp_path / "junit.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("2", "1", "0")
    (case,) = [c for c in root.iter("testcase") if c.get("name") == "test_1_runs_until_stopped"]
    error = case.find("error")
    assert error is not None and case.find("failure") is None, ET.tostring(case)[:800]
    assert re.search(r"interrupted by SIGTERM after \d+\.\d s", error.get("message")), error.get("message")
