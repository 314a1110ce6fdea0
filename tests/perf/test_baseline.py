"""Baselines: save measured throughputs, fail a later run that fell more than a fraction behind."""

from __future__ import annotations

import json

import pytest

from pytest_gpuconform.perf import baseline
from support import h100

MEASURING_TESTS = """
import os, pytest

@pytest.mark.parametrize("precision", ["bf16"])
def test_gemm(precision, record):
    record("gpu0_bf16_tflops", float(os.environ["GEMM"]))
    record("gpu0_bf16_note", "not a throughput: not tracked")

def test_busbw(record):
    record("all_reduce_busbw_gbps", float(os.environ["BUSBW"]))
"""


def test_regressions_and_keys_are_pure():
    reference = {"a::t::x_tflops": 1000.0, "a::t::y_gbps": 100.0}
    assert baseline.regressions({"a::t::x_tflops": 901.0, "a::t::y_gbps": 89.0, "new_tflops": 1.0}, reference, 0.1) == [
        ("a::t::y_gbps", 89.0, 100.0, 90.0)
    ]
    assert (
        baseline.metric_key(
            "../site-packages/pytest_gpuconform/conformance/test_performance.py::test_gemm[bf16]", "gpu0_bf16_tflops"
        )
        == "test_performance::test_gemm[bf16]::gpu0_bf16_tflops"
    )
    assert baseline.tracked_unit("x_tflops", 3.0) == "TFLOP/s" and baseline.tracked_unit("x_tflops", "3") is None
    assert baseline.tracked_unit("x_ms", 3.0) is None and baseline.tracked_unit("x_gbps", True) is None


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read baseline"),
        ("{oops", "is not valid JSON"),
        ('{"metrics": {}}', "is not a pytest-gpuconform baseline"),
        ('{"format": "pytest-gpuconform baseline", "version": 7, "metrics": {}}', "has version 7"),
        (
            '{"format": "pytest-gpuconform baseline", "version": 1, "metrics": {"k_tflops": "fast"}}',
            "'fast' is not a positive number",
        ),
    ],
)
def test_bad_baseline_files_are_rejected_with_the_reason(tmp_path, content, message):
    path = tmp_path / "base.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(baseline.BadBaseline, match=message):
        baseline.load(str(path))


def test_save_then_compare_fails_only_the_regressed_number(pytester, fake_nvml, run_gpuconform, monkeypatch):
    fake_nvml({"gpus": [h100(0)]})
    pytester.makepyfile(test_measure=MEASURING_TESTS)
    monkeypatch.setenv("GEMM", "800")
    monkeypatch.setenv("BUSBW", "150")
    saved = run_gpuconform("--gpuconform-save-baseline", "base.json")
    saved.assert_outcomes(passed=2)
    data = json.loads((pytester.path / "base.json").read_text())
    assert data["format"] == baseline.FORMAT and data["gpus"][0]["uuid"] == h100(0)["uuid"]
    assert data["metrics"] == {
        "test_measure::test_gemm[bf16]::gpu0_bf16_tflops": 800.0,
        "test_measure::test_busbw::all_reduce_busbw_gbps": 150.0,
    }

    monkeypatch.setenv("GEMM", "640")  # 20% below: regressed
    monkeypatch.setenv("BUSBW", "132")  # 12% below: would fail the default 0.1, passes the 0.15 given
    compared = run_gpuconform("--gpuconform-baseline", "base.json", "--gpuconform-regression-fraction", "0.15", "-rf")
    compared.assert_outcomes(passed=1, failed=1)
    gpu = h100(0)
    compared.stdout.fnmatch_lines(
        [
            f"*baseline regression: GPU 0 ({gpu['uuid']}, bus {gpu['bus_id']}): gpu0_bf16_tflops = 640 TFLOP/s, "
            "20.0% below baseline 800; bound >= 680 (--gpuconform-regression-fraction 0.15)*"
        ]
    )


def test_corrupt_baseline_and_bad_fraction_are_usage_errors(pytester, tmp_path):
    bad = tmp_path / "base.json"
    bad.write_text('{"format": "pytest-gpuconform baseline", "version": 1, "metrics": [1, 2]}')
    result = pytester.runpytest_inprocess("--gpuconform", "-p", "no:cacheprovider", "--gpuconform-baseline", str(bad))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(['*--gpuconform-baseline: baseline *base.json: "metrics" must be an object*'])
    result = pytester.runpytest_inprocess("--gpuconform", "--gpuconform-regression-fraction", "1.5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*expected a fraction between 0 and 1 (exclusive), got 1.5*"])


def test_saved_line_stands_on_its_own_and_says_why_nothing_was_saved(pytester, run_gpuconform):
    """On a CPU node the performance checks measure nothing: the terminal says so, on its own line."""
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = run_gpuconform("--gpuconform-save-baseline", "base.json")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "gpuconform: wrote a baseline with 0 numbers to base.json: this node has no GPU, so no performance check "
            "measured anything",
        ]
    )
    assert json.loads((pytester.path / "base.json").read_text())["metrics"] == {}
