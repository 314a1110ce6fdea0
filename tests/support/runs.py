"""One ``pytest --gpuconform`` subprocess over a directory of generated test files, with its
JUnit cases by name: a module-scoped fixture runs many cases once (rank start-up is paid
once), and each case is then checked by a test of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    done: subprocess.CompletedProcess
    cases: dict[str, ET.Element]
    directory: Path

    @property
    def output(self) -> str:
        return self.done.stdout + self.done.stderr

    def case(self, name: str) -> ET.Element:
        assert name in self.cases, f"{name} did not run; ran: {sorted(self.cases)[:20]}\n{self.output[-3000:]}"
        return self.cases[name]

    def outcome(self, name: str) -> tuple[str, str, str]:
        """("passed" | "failure" | "error" | "skipped", message, text) of a case (an error is
        ``<error>``, or ``<failure type="error">`` as earlier versions wrote it)."""
        case = self.case(name)
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                kind = "error" if child.get("type") == "error" else child.tag
                return kind, child.get("message") or "", child.text or ""
        return "passed", "", ""

    def properties(self, name: str) -> dict[str, str]:
        return {p.get("name"): p.get("value") for p in self.case(name).iter("property")}


def write_files(directory: Path, files: dict[str, str]) -> None:
    for name, source in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))


def run_pytest(directory: Path, *args: str, env: dict | None = None, timeout: float = 600) -> Run:
    """``pytest --gpuconform . ARGS`` in ``directory`` ("." keeps the shipped suite out)."""
    junit = directory / "junit.xml"
    command = [sys.executable, "-m", "pytest", "--gpuconform", "-p", "no:cacheprovider", f"--junitxml={junit}", "."]
    command += list(args)
    environment = dict(os.environ, **(env or {}))
    done = subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=timeout, env=environment)
    cases = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            cases[case.get("name")] = case  # a rerun's earlier attempt is overwritten by the last
    return Run(done, cases, directory)


def process_alive(pid: int) -> bool:
    """Running, not a zombie (a zombie has exited; only reaping is left)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
