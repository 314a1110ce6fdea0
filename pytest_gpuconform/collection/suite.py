"""Where the shipped conformance suite lives, in a checkout or an installed wheel."""

from __future__ import annotations

from pathlib import Path


def suite_dir() -> Path:
    """The installed ``pytest_gpuconform.conformance`` package (``conformance/`` in the repo)."""
    import pytest_gpuconform.conformance as conformance

    return Path(next(iter(conformance.__path__))).resolve()
