"""The wheel carries the shipped suite, and an installed plugin runs it from an empty directory."""

import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import tomllib

import support

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pytest_gpuconform"


def test_every_folder_of_the_package_is_declared():
    """A new folder missing from pyproject's package list would be left out of the wheel."""
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        ".".join(path.relative_to(ROOT).parts)
        for path in [PACKAGE, *PACKAGE.rglob("*")]
        if path.is_dir() and path.name != "__pycache__"
    }
    assert folders | {"pytest_gpuconform.conformance"} == declared


def test_wheel_builds_without_warnings_and_contains_the_suite_and_the_entry_points(tmp_path):
    wheel, log = support.build_wheel(tmp_path)
    assert "Warning" not in log and "absent from the `packages`" not in log, log[-3000:]
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "pytest_gpuconform/plugin.py",
        "pytest_gpuconform/conformance/test_environment.py",
        "pytest_gpuconform/conformance/test_ddp.py",
        "pytest_gpuconform/reporting/templates/report.html.j2",
        "pytest_gpuconform/perf/data/perf_floors.json",
        "pytest_gpuconform/reporting/schemas/node-report.schema.json",
        "pytest_gpuconform/acceptance/examples/h100-sxm-8x.toml",
        "pytest_gpuconform/acceptance/examples/h200-8x.toml",
        "pytest_gpuconform/acceptance/examples/a100-sxm-8x.toml",
        "pytest_gpuconform/acceptance/examples/cpu-ci-runner.toml",
    ):
        assert expected in names, expected
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[pytest11]\ngpuconform = pytest_gpuconform.plugin" in text
    assert "gpuconform = pytest_gpuconform.cli:main" in text


def test_installed_suite_runs_from_an_empty_directory(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--gpuconform",
            "-p",
            "no:cacheprovider",
            "-rs",
            "-k",
            "environment",
            "--junitxml=out.xml",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "test_environment.py" in done.stdout and "SKIPPED" in done.stdout
    root = ET.parse(tmp_path / "out.xml").getroot()
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["gpuconform.gpu_count"] == "0" and props["gpuconform.torch"].startswith("2.")
    skips = [s.get("message") for s in root.iter("skipped")]
    assert skips and all(skips), "every skip carries a reason"
