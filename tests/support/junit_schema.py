"""xmllint against the project's JUnit schema (Surefire's, with test-case properties).

(Issue 11 adds the same check as support.tools.schema_errors; once both are in, the cluster
tests can use that one and this module can go.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support import DATA

SCHEMA = DATA / "junit-10-testcase-properties.xsd"


def schema_errors(*paths: Path) -> str:
    """xmllint's complaints about the files ('' when all validate); a skip where xmllint is
    missing (a failure under GPUCONFORM_REQUIRE_TOOLS=1, as in CI)."""
    if shutil.which("xmllint") is None:
        message = "xmllint not installed (Debian package libxml2-utils)"
        if os.environ.get("GPUCONFORM_REQUIRE_TOOLS"):
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run(
        ["xmllint", "--noout", "--schema", str(SCHEMA), *map(str, paths)], capture_output=True, text=True, timeout=60
    )
    return "" if done.returncode == 0 else done.stderr
