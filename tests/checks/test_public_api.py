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


def _readme_example() -> str:
    readme = (support.ROOT / "README.md").read_text()
    section = readme[readme.index("## Writing your own checks") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run_example(pytester):
    pytester.makepyfile(test_readme_example=_readme_example())
    return pytester.runpytest_subprocess(
        "--gpuconform", "-p", "no:cacheprovider", ".", "-k", "cpu", "--gpuconform-cpu-ranks", "2"
    )


def test_readme_example_runs(pytester):
    result = _run_example(pytester)
    result.assert_outcomes(passed=1, skipped=1)  # ws4 skips where the node hosts 2 ranks, saying why
    result.stdout.fnmatch_lines(["*wrong_elements=0<=0*"])


# A broken all_reduce in the ranks: rank 1 gets one element wrong (an autouse fixture runs in
# every rank, as any fixture of a multi-rank test does).
BROKEN_ALL_REDUCE = """
import pytest
import torch.distributed as dist

@pytest.fixture(autouse=True)
def one_wrong_element_on_rank_1(monkeypatch, rank):
    real = dist.all_reduce
    def broken(tensor, *args, **kwargs):
        work = real(tensor, *args, **kwargs)
        if rank == 1:
            tensor.view(-1)[7] += 1
        return work
    monkeypatch.setattr(dist, "all_reduce", broken)
"""


def test_readme_example_fails_on_every_rank_naming_the_wrong_one(pytester):
    pytester.makeconftest(BROKEN_ALL_REDUCE)
    result = _run_example(pytester)
    result.assert_outcomes(failed=1, skipped=1)
    out = result.stdout.str()
    assert "all_reduce on rank 1" in out and "all_reduce on rank 0" not in out
    result.stdout.fnmatch_lines(["*wrong_elements=1>0!*"])  # the worst rank's count, past its bound


def test_summarize_problems_shows_the_first_few_or_one_of_each_kind():
    assert checks.summarize_problems([]) is None
    assert checks.summarize_problems(["a", "b", "c", "d", "e"]) == "a; b; c (+2 more)"
    assert checks.summarize_problems(["a", "b"], shown=3) == "a; b"
    grads = [f"grad {i} off" for i in range(4)]
    found = checks.summarize_problems([*grads, "rank 1 not bitwise equal"], kinds=("grad", "bitwise"))
    assert found == "grad 0 off; rank 1 not bitwise equal (+3 more)"  # the quiet symptom is not hidden
    odd = checks.summarize_problems(["x1", "grad 0 off", "x2", "x3", "grad 1 off"], shown=2, kinds=("grad",))
    assert odd == "x1; grad 0 off; x2 (+2 more)"  # of no kind: the first `shown`, in their order
