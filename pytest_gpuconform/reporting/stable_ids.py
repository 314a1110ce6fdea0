"""The names a shipped-suite test travels under, whatever directory pytest ran from.

pytest derives a test's JUnit classname and its printed node id from the test file's path
relative to the rootdir. The shipped suite lives inside the installed package, so the same
check was ``test_amp`` from an empty directory and
``.venv.lib.python3.11.site-packages.pytest_gpuconform.conformance.test_amp`` from a
checkout: CI history (keyed on classname + name) broke whenever the job's directory changed.

* ``stable_classname``: the classname a shipped test gets in every JUnit file the plugin
  writes: its importable module path, ``pytest_gpuconform.conformance.test_amp`` (plus
  the test class, and pytest's ``--junit-prefix`` in front, as pytest does).
* ``resolve_pasted_args``: a node id printed by any run (``test_amp.py::test_x[cpu-bf16]``,
  ``.venv/.../pytest_gpuconform/conformance/test_amp.py::...``), a stable id from a JUnit
  or JSON report (``pytest_gpuconform.conformance.test_amp::test_x``) or the installed
  file's own path, pasted after ``pytest --gpuconform`` from any directory, reruns that
  test: the suite directory is collected and only the named tests are kept. A file of
  that name in the current directory wins: users' own tests are never redirected.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

SUITE_PACKAGE = "pytest_gpuconform.conformance"
_SUITE_PATH = re.compile(r"(?:^|.*/)(?:pytest_gpuconform/)?conformance/(test_\w+\.py)$")
_DOTTED = re.compile(r"^(?:.*\.)?pytest_gpuconform\.conformance\.(test_\w+)$")


def pytest_classname(nodeid: str, prefix: str | None) -> str:
    """The classname pytest's junitxml writes for ``nodeid`` (its mangle_test_address rule)."""
    path = nodeid.partition("[")[0]
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    classes = names[:-1]
    if prefix:
        classes.insert(0, prefix)
    return ".".join(classes)


def stable_classname(nodeid: str, module: str, prefix: str | None) -> str:
    """The shipped test's classname: ``[prefix.]pytest_gpuconform.conformance.<module>[.Class]``."""
    classes = nodeid.partition("[")[0].split("::")[1:-1]
    names = ([prefix] if prefix else []) + [f"{SUITE_PACKAGE}.{module}"] + classes
    return ".".join(names)


def suite_module(test_file: Path, suite_dir: Path) -> str | None:
    """``test_amp`` when ``test_file`` is a module of the shipped suite, else None."""
    try:
        relative = test_file.resolve().relative_to(suite_dir)
    except ValueError:
        return None
    return ".".join(relative.with_suffix("").parts)


@dataclass
class SuiteSelection:
    """Arguments rewritten so that shipped-suite ids select from the suite directory."""

    args: list[str]
    wanted: list[str] = field(default_factory=list)  # suite-relative ids: test_amp.py::test_x

    def keeps(self, relative_id: str) -> bool:
        return any(relative_id == want or relative_id.startswith((want + "::", want + "[")) for want in self.wanted)


def _suite_file(path: str, cwd: Path, suite_dir: Path) -> str | None:
    """The suite-relative file a path argument names, or None for anything else."""
    candidate = cwd / path
    if candidate.exists():
        relative = suite_module(candidate, suite_dir) if candidate.is_file() else None
        return None if relative is None else relative.replace(".", "/") + ".py"
    match = _SUITE_PATH.match(path.replace(os.sep, "/"))
    name = match.group(1) if match else path if re.fullmatch(r"test_\w+\.py", path) else None
    if name is None:
        dotted = _DOTTED.match(path)
        name = dotted.group(1) + ".py" if dotted else None
    return name if name and (suite_dir / name).is_file() else None


def resolve_pasted_args(args: list[str], cwd: Path, suite_dir: Path) -> SuiteSelection:
    """``args`` with shipped-suite ids (see above) replaced by the suite directory, and the
    ids to keep from it. Collecting from the directory keeps the node ids of a plain
    ``pytest --gpuconform`` run (``test_amp.py::test_x``), wherever the rootdir is."""
    kept: list[str] = []
    wanted: list[str] = []
    for arg in args:
        path, sep, rest = arg.partition("::")
        relative = None if arg.startswith("-") or not path else _suite_file(path, cwd, suite_dir)
        if relative is None:
            kept.append(arg)
        else:
            wanted.append(relative + sep + rest)
    if wanted:
        kept.append(str(suite_dir))
    return SuiteSelection(kept, wanted)
