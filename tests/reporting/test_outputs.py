"""Outputs operators plug in: ``--gpuconform-json`` (validated against the shipped JSON
Schema) and ``--gpuconform-prometheus`` (read back by prometheus_client's own parser of the
exposition format, which node_exporter's textfile collector also speaks).

One run on a node with two fake H100s (tests/fake_nvml) whose second GPU has ECC errors
in its NVML counters, with a passing check, a failing one (measured number past its bound),
a skipped one; then the same checks passing, to see the verdict flip.
"""

from __future__ import annotations

import json

import pytest

from support import h100

CHECKS = """
import os
import pytest

def test_gemm(record):
    record("gpu0_bf16_tflops", 700.0)
    record("gpu0_bf16_tflops_floor", 600.0)

def test_error_bound(record):
    value = float(os.environ.get("ERROR_VALUE", "0.5"))
    record("out_rel_l2", value)
    record("out_rel_l2_bound", 0.1)
    record("loss", float("nan"))
    assert value <= 0.1, f"out_rel_l2 {value} > bound 0.1"

def test_skipped():
    pytest.skip("not today")
"""


@pytest.fixture
def two_h100s(fake_nvml):
    return fake_nvml({"driver": "570.86.15", "cuda": 12080, "gpus": [h100(0), h100(1, ecc_uncorrected_volatile=3)]})


def run(run_gpuconform, pytester, *extra, **env):
    pytester.makepyfile(test_checks=CHECKS)
    for name, value in env.items():
        pytester._monkeypatch.setenv(name, value)
    return run_gpuconform(
        "--gpuconform-json",
        str(pytester.path / "out" / "node-{host}.json"),
        "--gpuconform-prometheus",
        str(pytester.path / "out" / "gpuconform.prom"),
        *extra,
    )


def test_json_document_validates_and_holds_every_case(run_gpuconform, pytester, two_h100s, monkeypatch):
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema")
    from pytest_gpuconform.reporting import node_json

    (pytester.path / "out").mkdir()
    monkeypatch.setenv("GPUCONFORM_HOST", "gpu-node-7")
    result = run(run_gpuconform, pytester)
    assert result.ret == 1
    data = json.loads((pytester.path / "out" / "node-gpu-node-7.json").read_text())
    jsonschema.validate(data, node_json.schema())
    assert data["host"] == "gpu-node-7" and data["inventory"]["gpu_count"] == "2"
    assert data["verdict"]["kind"] == "failed"
    assert data["verdict"]["line"] == "1 of 2 checks failed (1 cause) on 2 × H100 80GB HBM3"
    assert data["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    cases = {case["id"].split("::")[-1]: case for case in data["cases"]}
    assert set(cases) == {"test_gemm", "test_error_bound", "test_skipped"}
    failed = cases["test_error_bound"]
    assert failed["outcome"] == "failed" and failed["message"] == "AssertionError: out_rel_l2 0.5 > bound 0.1"
    numbers = {n["name"]: n for n in failed["numbers"]}
    assert numbers["out_rel_l2"] == {"name": "out_rel_l2", "value": 0.5, "bound": 0.1, "kind": "upper", "within": False}
    assert numbers["loss"] == {"name": "loss", "value": None, "value_text": "nan"}  # NaN is not JSON
    assert cases["test_gemm"]["numbers"][0]["within"] is True
    assert cases["test_skipped"]["message"] == "not today"


def test_prometheus_textfile_parses_and_says_pass_fail_health_numbers(run_gpuconform, pytester, two_h100s):
    parser = pytest.importorskip("prometheus_client.parser", reason="pip install prometheus-client")
    (pytester.path / "out").mkdir()
    assert run(run_gpuconform, pytester).ret == 1
    text = (pytester.path / "out" / "gpuconform.prom").read_text()
    samples = {}
    for family in parser.text_string_to_metric_families(text):
        assert family.type == "gauge" and family.documentation
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def get(metric, **labels):
        return samples[(metric, tuple(sorted(labels.items())))]

    assert get("gpuconform_node_passed") == 0 and get("gpuconform_node_verified") == 0
    assert get("gpuconform_node_verdict", verdict="failed") == 1
    assert get("gpuconform_node_verdict", verdict="passed") == 0
    gemm, bound = "test_checks.py::test_gemm", "test_checks.py::test_error_bound"
    assert get("gpuconform_check_passed", check=gemm, area="checks") == 1
    assert get("gpuconform_check_passed", check=bound, area="checks") == 0
    assert get("gpuconform_check_skipped", check="test_checks.py::test_skipped", area="checks") == 1
    assert get("gpuconform_checks", outcome="failed") == 1
    assert get("gpuconform_measure", check=gemm, area="checks", name="gpu0_bf16_tflops") == 700.0
    assert get("gpuconform_measure_bound", check=gemm, area="checks", name="gpu0_bf16_tflops", kind="lower") == 600.0
    health = {labels: v for (name, labels), v in samples.items() if name == "gpuconform_gpu_health"}
    ecc = {
        dict(labels)["gpu"]: v for labels, v in health.items() if dict(labels)["counter"] == "ecc_uncorrected_volatile"
    }
    assert ecc == {"0": 0.0, "1": 3.0}
    info = [dict(labels) for (name, labels) in samples if name == "gpuconform_node_info"]
    assert info[0]["driver"] == "570.86.15" and info[0]["gpus"] == "NVIDIA H100 80GB HBM3, NVIDIA H100 80GB HBM3"


def test_prometheus_flips_to_passed_and_the_file_is_replaced(run_gpuconform, pytester, two_h100s, monkeypatch):
    (pytester.path / "out").mkdir()
    monkeypatch.setenv("ERROR_VALUE", "0.01")
    assert run(run_gpuconform, pytester).ret == 0
    text = (pytester.path / "out" / "gpuconform.prom").read_text()
    assert "gpuconform_node_passed 1\n" in text and 'gpuconform_node_verdict{verdict="passed"} 1' in text
    assert "gpuconform_node_verified 1\n" in text


def test_a_cpu_node_passes_but_is_not_verified_in_prometheus(run_gpuconform, pytester):
    (pytester.path / "out").mkdir()
    pytester.makepyfile(test_cpu="def test_cpu():\n    pass\n")
    assert run_gpuconform(f"--gpuconform-prometheus={pytester.path / 'out' / 'g.prom'}").ret == 0
    text = (pytester.path / "out" / "g.prom").read_text()
    assert "gpuconform_node_passed 1\n" in text and "gpuconform_node_verified 0\n" in text
    assert 'gpuconform_node_verdict{verdict="cpu"} 1' in text
    assert not list((pytester.path / "out").glob(".*.tmp"))


def test_output_in_a_missing_directory_is_a_usage_error(pytester):
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    for flag in ("--gpuconform-json", "--gpuconform-prometheus"):
        result = pytester.runpytest_subprocess("--gpuconform", "-p", "no:cacheprovider", ".", flag, "/nonexistent/x")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"*{flag}: directory of /nonexistent/x does not exist*"])
