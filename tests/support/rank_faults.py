"""Run shipped multi-rank checks with a fault planted in the rank processes.

Each fault is a pytester module that patches torch at import time and then re-exports a
shipped check. The engine imports that module inside every rank, so the patch is active
where the check runs. Several fault modules go into one pytest subprocess (torch import and
rank start-up are paid once); the engine replaces its ranks after every failing test, so a
fault that is caught cannot leak into the next module's ranks. Outcomes and failure texts
are read per test case from the JUnit XML, so each fault's message is checked on its own.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CaseResult:
    outcome: str  # "passed" | "failed" | "error" | "skipped"
    text: str  # failure message and text ("" when passed)
    properties: dict = field(default_factory=dict)  # what the check recorded (JUnit properties)


def run_faulted(
    directory: Path,
    modules: dict[str, str],
    selection: list[str],
    timeout: float = 60,
    extra_args: tuple[str, ...] = (),
) -> dict[str, CaseResult]:
    """Write the fault modules into ``directory``, run the selected node ids in one pytest
    subprocess, return {"module::test[id]": result}. ``extra_args`` go to that pytest
    (``--gpuconform-cpu-ranks 4`` for the world-size-4 cases).

    A plain subprocess rather than pytester, so that a module-scoped fixture can run it once
    and each fault still gets a test of its own in the report."""
    for name, source in modules.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(source))
    report = directory / "faults.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--gpuconform",
        "-p",
        "no:cacheprovider",
        "-q",
        f"--junitxml={report}",
        f"--gpuconform-timeout={timeout}",
        *extra_args,
        *selection,
    ]
    done = subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=timeout * len(selection))
    cases = _read_cases(report) if report.exists() else {}
    assert cases, f"no test ran:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
    return cases


def _read_cases(report) -> dict[str, CaseResult]:
    cases = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        key = f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, text = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = "failed" if kind == "failure" else kind
                text = f"{node.get('message', '')}\n{node.text or ''}"
                break
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases[key] = CaseResult(outcome, text, properties)
    return cases


def assert_caught(cases: dict[str, CaseResult], key: str, *fragments: str) -> None:
    """The check failed, and its message names every fragment (rank, tensor, numbers)."""
    assert key in cases, f"{key} did not run; ran: {sorted(cases)}"
    case = cases[key]
    assert case.outcome == "failed", f"{key}: fault not caught, outcome {case.outcome}: {case.text[:500]}"
    missing = [f for f in fragments if f not in case.text]
    assert not missing, f"{key}: message lacks {missing}: {case.text[:1500]}"
