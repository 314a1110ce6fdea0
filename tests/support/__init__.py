"""Helpers shared by the plugin's own tests (on sys.path through ``pythonpath`` in pyproject.toml).

``support.rank_faults`` runs shipped checks with faults planted in the rank processes;
``support.runs`` runs generated test files in one ``pytest --gpuconform`` subprocess and
reads their JUnit cases; ``support.tools`` finds external tools (xmllint); this module
holds the paths and fake GPUs every folder of tests/ uses.
"""

from __future__ import annotations

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
