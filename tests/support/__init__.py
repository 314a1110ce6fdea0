"""Helpers shared by the plugin's own tests (on sys.path through ``pythonpath`` in pyproject.toml).

``support.rank_faults`` runs shipped checks with faults planted in the rank processes;
``support.runs`` runs generated test files in one ``pytest --gpuconform`` subprocess and
reads their JUnit cases; ``support.tools`` finds external tools (xmllint); this module
holds the paths and fake GPUs every folder of tests/ uses.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
DATA = TESTS / "data"
FAKE_NVML_DIR = TESTS / "fake_nvml"


def h100(index: int, **extra) -> dict:
    """One H100 SXM as the fake NVML describes it (tests/fake_nvml/pynvml.py)."""
    return {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": f"GPU-{index:08d}-aaaa-bbbb-cccc-{index:012d}",
        "bus_id": f"00000000:{0x18 + index:02X}:00.0",
        "memory_gib": 80,
        "cc": [9, 0],
        **extra,
    }


def build_wheel(directory: Path) -> tuple[Path, str]:
    """Build the plugin's wheel into ``directory``; (the wheel, pip's verbose log).

    Built from a copy of the checkout: setuptools leaves a build/ folder in the tree it
    builds, which a later ``pip install .`` of another layout would pick stale files from.
    """
    source = directory / "src"
    ignore = shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__", "reports", ".mypy_cache")
    shutil.copytree(ROOT, source, ignore=ignore)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(directory),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    shutil.rmtree(source)
    return next(directory.glob("pytest_gpuconform-*.whl")), built.stdout + built.stderr
