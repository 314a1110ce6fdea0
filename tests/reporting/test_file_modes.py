"""Every file the plugin writes is readable like any new file: 0644 under umask 022.

Atomic writes go through a temporary file, which ``mkstemp`` creates 0600; a report that
only its writer can read is useless to the CI step that uploads it. One writer serves
them all (reporting/junit.py), and this test covers each kind of file it writes.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_gpuconform.cluster import fold

GPUCONFORM = str(Path(sys.executable).parent / "gpuconform")

ERRORING = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("setup fails, so pytest writes an <error>")

def test_fine(record):
    record("x_tflops", 1.0)

def test_setup_error(broken):
    pass
"""


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_reports_pages_and_baselines_are_0644(pytester, umask_022, tmp_path):
    pytester.makepyfile(test_modes=ERRORING)
    out = tmp_path / "out"
    out.mkdir()
    result = pytester.runpytest_subprocess(
        "--gpuconform",
        "-p",
        "no:cacheprovider",
        ".",
        f"--junitxml={out}/junit-{{host}}.xml",
        f"--gpuconform-save-baseline={out}/baseline.json",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    (junit,) = out.glob("junit-*.xml")
    assert 'hostname="' in junit.read_text()  # finished in place (hostname, classnames), atomically
    merged, page = out / "merged.xml", out / "page.html"
    subprocess.run([GPUCONFORM, "merge", str(junit), "-o", str(merged)], check=True, capture_output=True)
    subprocess.run([GPUCONFORM, "report", str(merged), "-o", str(page)], check=True, capture_output=True)
    cluster = out / "junit-cluster.xml"
    fold.write(fold.merge([("h0", 0, junit.read_text()), ("h1", 1, junit.read_text())]), str(cluster))
    modes = {p.name: oct(_mode(p)) for p in (junit, out / "baseline.json", merged, page, cluster)}
    assert set(modes.values()) == {"0o644"}, modes
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"
