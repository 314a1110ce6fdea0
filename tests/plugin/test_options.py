"""Bad option values are pytest usage errors (exit code 4) with a message that says what to do."""

import pytest


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpuconform-expect-gpus", "abc"], "*--gpuconform-expect-gpus: expected a whole number >= 0, got 'abc'*"),
        (["--gpuconform-expect-gpus", "-1"], "*--gpuconform-expect-gpus: expected a whole number >= 0, got -1*"),
        (["--gpuconform-timeout", "0"], "*--gpuconform-timeout: expected a number of seconds > 0, got 0*"),
        (["--gpuconform-cpu-ranks", "0"], "*--gpuconform-cpu-ranks: expected a whole number >= 1, got 0*"),
        (["--gpuconform-tolerance", "fp8:rtol=1"], "*tolerance override 'fp8:rtol=1': unknown dtype 'fp8'*"),
        (["--gpuconform-tolerance", "bf16:rtool=1"], "*key 'rtool' is not one of rtol, atol, rel_l2*"),
        (["--gpuconform-tolerance", "bf16:rtol=abc"], "*'abc' is not a number*"),
    ],
)
def test_bad_option_values_are_usage_errors(pytester, args, message):
    result = pytester.runpytest_subprocess("--gpuconform", "-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_bad_ini_value_is_a_usage_error(pytester):
    pytester.makeini("[pytest]\ngpuconform_timeout = soon\n")
    result = pytester.runpytest_subprocess("--gpuconform", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini option gpuconform_timeout = 'soon': expected a number of seconds > 0*"])


def test_tolerance_overrides_cli_wins_over_ini(run_gpuconform, pytester):
    pytester.makeini("[pytest]\ngpuconform_tolerances =\n    bf16:rtol=0.5,rel_l2=0.25\n    fp16:atol=0.125\n")
    pytester.makepyfile(
        test_tol="""
        import pytest

        @pytest.mark.dtype("bf16", "fp16")
        def test_row(tolerance, tolerance_table):
            if tolerance.dtype == "bf16":
                assert (tolerance.rtol, tolerance.rel_l2) == (0.75, 0.25)
            else:
                assert tolerance.atol == 0.125
            assert tolerance_table["fp32"].rtol == 1.3e-6
    """
    )
    result = run_gpuconform("--gpuconform-tolerance", "bf16:rtol=0.75")
    result.assert_outcomes(passed=2)


def test_ini_enables_the_plugin(pytester):
    pytester.makeini("[pytest]\ngpuconform = true\n")
    pytester.makepyfile(test_x="def test_rank(rank):\n    assert rank == 0\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", ".")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["gpuconform: host *"])


def test_readme_option_table_matches_the_declared_defaults():
    """README's table is held to options.py, where each default is declared once."""
    import re

    import support
    from pytest_gpuconform import options

    readme = (support.ROOT / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        match = re.match(r"\| `(--gpuconform-[a-z-]+)[^`]*`[^|]*\| *`?([a-z_]*)`? *\| *(.*?) *\|$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    assert set(rows) == {option.flag for option in options.OPTIONS}
    for option in options.OPTIONS:
        ini, default = rows[option.flag]
        expected_ini = "gpuconform_tolerances" if option.flag == "--gpuconform-tolerance" else (option.ini or "")
        assert (ini, default) == (expected_ini, option.default_text), option.flag
        assert option.default_text in option.help_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--gpuconform-perf-floors", "/nonexistent/floors.json"],
            "*--gpuconform-perf-floors: cannot read floors file /nonexistent/floors.json: No such file or directory*",
        ),
        (
            ["--gpuconform-baseline", "/nonexistent/base.json"],
            "*--gpuconform-baseline: cannot read baseline /nonexistent/base.json: No such file or directory*",
        ),
        (
            ["--gpuconform-save-baseline", "/nonexistent/dir/base.json"],
            "*--gpuconform-save-baseline: directory of /nonexistent/dir/base.json does not exist*",
        ),
    ],
)
def test_files_named_by_options_are_checked_at_start_up(pytester, args, message):
    """Read before any test runs: a typo in a path is exit code 4, not a pass on a CPU node."""
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("--gpuconform", "-p", "no:cacheprovider", ".", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
