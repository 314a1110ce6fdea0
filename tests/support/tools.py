"""External tools the tests need (xmllint): found, or a skip that says why (a failure in CI,
where GPUCONFORM_REQUIRE_TOOLS=1 says they must be installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support import DATA

JUNIT_SCHEMA = DATA / "junit-10-testcase-properties.xsd"


def require_tool(name: str, debian_package: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not installed (Debian package {debian_package})"
    if os.environ.get("GPUCONFORM_REQUIRE_TOOLS"):
        pytest.fail(message)
    pytest.skip(message)


def schema_errors(*paths: Path) -> str:
    """xmllint's complaints about JUnit files against the project's schema ('' when all are valid)."""
    xmllint = require_tool("xmllint", "libxml2-utils")
    done = subprocess.run(
        [xmllint, "--noout", "--schema", str(JUNIT_SCHEMA), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "" if done.returncode == 0 else done.stderr
