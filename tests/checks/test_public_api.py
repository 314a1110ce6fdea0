"""The public API for check authors: what it exports, that the shipped suite uses only it,
and that README's worked example runs as written."""

from __future__ import annotations

import re

import pytest_gpuconform.checks as checks
import pytest_gpuconform.checks.hardware as hardware
import support


def test_everything_exported_exists():
    for module in (checks, hardware):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert not missing, f"{module.__name__}.__all__ names {missing}, which it does not define"


def test_shipped_suite_imports_plugin_code_only_through_the_public_api():
    """As a user's checks would: pytest_gpuconform.checks, never the plugin's internals."""
    offenders = []
    for path in sorted((support.ROOT / "conformance").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            imported = re.match(r"\s*(?:from|import)\s+(pytest_gpuconform[\w.]*)", line)
            if imported and not imported.group(1).startswith(
                ("pytest_gpuconform.checks", "pytest_gpuconform.conformance")
            ):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_readme_example_runs(pytester):
    readme = (support.ROOT / "README.md").read_text()
    section = readme[readme.index("## Writing your own checks") :]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    pytester.makepyfile(test_readme_example=example)
    result = pytester.runpytest_subprocess(
        "--gpuconform", "-p", "no:cacheprovider", ".", "-k", "cpu", "--gpuconform-cpu-ranks", "2"
    )
    result.assert_outcomes(passed=1, skipped=1)  # ws4 skips where the node hosts 2 ranks, saying why
    result.stdout.fnmatch_lines(["*wrong_elements=0<=0*"])
