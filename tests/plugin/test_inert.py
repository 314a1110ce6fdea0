"""Installed but not enabled, the plugin must change nothing in other projects' runs."""

CONFTEST_SPY = """
import sys

def pytest_sessionfinish(session):
    heavy = sorted(m for m in ("torch", "pynvml") if m in sys.modules)
    with open("imported.txt", "w") as out:
        out.write(",".join(heavy))
"""

USER_TESTS = """
import pytest

@pytest.mark.gpu
def test_their_own_gpu_marker():
    pass

@pytest.mark.world_size(4)
def test_their_world_size(request):
    assert not hasattr(request.node, "callspec")

@pytest.mark.dtype("no-such-dtype")
def test_their_dtype():
    pass
"""


def test_plugin_is_loaded_but_inert(pytester):
    pytester.makeconftest(CONFTEST_SPY)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers", "-v")
    result.assert_outcomes(passed=3)
    # Nothing but one line after collection: two tests use markers of the plugin (world_size, dtype).
    lines = [line for line in result.outlines if "gpuconform" in line.lower() and "plugins:" not in line]
    assert lines == [
        "gpuconform: 2 test(s) use the markers or fixtures of pytest-gpuconform (first: "
        "test_user.py::test_their_world_size); pytest-gpuconform is installed but not enabled: "
        "add --gpuconform (or ini gpuconform = true)"
    ], lines
    result.stdout.fnmatch_lines(["*test_their_own_gpu_marker PASSED*", "*test_their_world_size PASSED*"])
    assert (pytester.path / "imported.txt").read_text() == "", "torch or pynvml was imported by an inactive plugin"


def test_disabled_plugin_does_not_collect_the_suite(pytester):
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["test_one.py::test_one", "1 test collected*"])
    result.stdout.no_fnmatch_line("*test_environment*")


def test_markers_are_registered_for_strict_markers(pytester):
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(
        ["@pytest.mark.gpu(n=1, bf16=False*", "@pytest.mark.world_size(*", "@pytest.mark.dtype(*"]
    )


def test_a_test_that_needs_the_plugin_is_told_how_to_enable_it(pytester):
    pytester.makepyfile(
        test_ranks="""
        import pytest

        def test_uses_rank(rank, record):
            pass

        def test_plain():
            pass
    """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "gpuconform: 1 test(s) use the markers or fixtures of pytest-gpuconform (first: test_ranks.py::test_uses_rank)*",
            "*fixture 'rank' not found*",
            "*pytest-gpuconform*",
            "fixture(s) rank, record: pytest-gpuconform is installed but not enabled: add --gpuconform*",
        ]
    )


def test_hint_fixture_names_are_the_plugins_fixtures():
    import pytest_gpuconform.fixtures as fixtures
    from pytest_gpuconform.plugin import FIXTURES

    # pytest 8.4+ wraps @pytest.fixture functions in FixtureFunctionDefinition objects.
    defined = {name for name, value in vars(fixtures).items() if type(value).__name__ == "FixtureFunctionDefinition"}
    assert defined == FIXTURES
