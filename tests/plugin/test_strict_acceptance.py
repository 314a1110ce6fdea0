"""--gpuconform-expect-gpus turns "skipped: no GPU" into failures on nodes that must have GPUs."""


def test_expect_gpus_fails_on_a_cpu_node(run_gpuconform, pytester):
    pytester.makepyfile(
        test_s="""
        import pytest

        @pytest.mark.gpu
        def test_needs_gpu():
            raise AssertionError("must not run")

        def test_cpu_only():
            pass
    """
    )
    result = run_gpuconform("--gpuconform-expect-gpus", "1", "--junitxml=out.xml")
    assert result.ret == 1
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*strict acceptance (--gpuconform-expect-gpus 1): needs 1 GPU(s), node has no GPU*",
        ]
    )
    xml = (pytester.path / "out.xml").read_text()
    assert "<failure" in xml and "strict acceptance (--gpuconform-expect-gpus 1): needs 1 GPU(s)" in xml


def test_shipped_suite_fails_with_expect_gpus_on_cpu_node(pytester):
    result = pytester.runpytest_subprocess(
        "--gpuconform", "-p", "no:cacheprovider", "--gpuconform-expect-gpus", "1", "-k", "environment"
    )
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*AssertionError: expected >= 1 GPU(s), node has 0*"])


def test_expect_gpus_satisfied_by_fake_nvml_does_not_fail(run_gpuconform, pytester, fake_nvml):
    from support import h100

    fake_nvml({"gpus": [h100(0), h100(1)]})
    pytester.makepyfile(
        test_s="""
        import pytest

        @pytest.mark.gpu(n=4)
        def test_needs_four():
            pass
    """
    )
    result = run_gpuconform("--gpuconform-expect-gpus", "2", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs 4 GPU(s), node has 2 visible GPU(s)*"])
