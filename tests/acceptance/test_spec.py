"""The acceptance spec (``--gpuconform-spec FILE``): each declared field is a named check that
fails with expected against found; bad spec files are usage errors naming file and key.

Faults are planted in the node, never in the spec's judgement: the fake NVML
(tests/fake_nvml) shows fewer GPUs, another model, less memory, NVLinks down, a PCIe link
that cannot train to x16, an old driver; the host facts the spec reads are the real ones.
"""

from __future__ import annotations

import os
from importlib import resources

import pytest

from pytest_gpuconform.acceptance import spec as spec_module
from pytest_gpuconform.acceptance.judge import NodeFacts, problem
from pytest_gpuconform.node.nvml import GpuInfo
from support import h100

EXAMPLES = ("h100-sxm-8x.toml", "h200-8x.toml", "a100-sxm-8x.toml", "cpu-ci-runner.toml")


def example(name: str) -> str:
    return resources.files("pytest_gpuconform.acceptance").joinpath("examples").joinpath(name).read_text()


@pytest.mark.parametrize("name", EXAMPLES)
def test_shipped_example_specs_parse(name):
    spec = spec_module.parse(example(name), name)
    assert spec.name and spec.requirements
    assert {r.key.split(".")[0] for r in spec.requirements} >= {"gpu", "software", "host"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("[gpu]\ncount = 8\nnvlink = 18\n", "[gpu] unknown key(s) nvlink; known: count, model"),
        ("[gpus]\ncount = 8\n", "unknown key(s) gpus; expected name, description and the tables gpu, software, host"),
        ("[gpu]\ncount = 'eight'\n", "gpu.count: expected a number or a table { min = ..., max = ... }, got 'eight'"),
        ("[gpu]\nmemory_gib = { least = 79 }\n", "gpu.memory_gib: unknown key(s) least (use min and max)"),
        ("[gpu]\nmemory_gib = { min = 80, max = 40 }\n", "gpu.memory_gib: min 80 is above max 40"),
        ("[software]\ndriver = '550'\n", "software.driver: '550' is not a version range"),
        ("[software]\ntorch = 2.4\n", "software.torch: expected a version range"),
        ("[gpu]\nmodel = []\n", "gpu.model: expected a name or a list of names"),
        ("name = 'x'\n", "declares nothing"),
        ("[gpu\ncount = 8\n", "not valid TOML"),
    ],
)
def test_bad_spec_files_are_refused_naming_the_key(text, message):
    with pytest.raises(spec_module.BadSpec) as caught:
        spec_module.parse(text, "site.toml")
    assert str(caught.value).startswith("site.toml: ") and message in str(caught.value)


def test_bad_spec_is_a_usage_error_at_start_up(pytester):
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    (pytester.path / "node.toml").write_text("[gpu]\ncount = 8\nnvlink = 18\n")
    result = pytester.runpytest_subprocess(
        "--gpuconform", "-p", "no:cacheprovider", ".", "--gpuconform-spec", "node.toml"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gpuconform-spec: node.toml: [[]gpu[]] unknown key(s) nvlink*"])
    result = pytester.runpytest_subprocess(
        "--gpuconform", "-p", "no:cacheprovider", ".", "--gpuconform-spec", "gone.toml"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gpuconform-spec: cannot read spec file gone.toml: No such file or directory*"])


def gpu(index: int, name: str = "NVIDIA H100 80GB HBM3", memory_gib: float = 79.6) -> GpuInfo:
    return GpuInfo(
        index, name, f"GPU-{index:04d}", f"00000000:{0x18 + index:02X}:00.0", int(memory_gib * 2**30), (9, 0)
    )


def facts(**changes) -> NodeFacts:
    gpus = tuple(gpu(i) for i in range(8))
    base = dict(
        gpus=gpus,
        nvml_status="ok",
        nvml_message="driver 570.86.15",
        versions={
            "driver": "570.86.15",
            "torch_cuda": "12.8",
            "driver_cuda": "12.8",
            "nccl": "2.27.5",
            "torch": "2.13.0+cu128",
        },
        readings={g.uuid: {"nvlink_up": [True] * 18, "pcie_max_gen": 5, "pcie_max_width": 16} for g in gpus},
        cpu_cores=192,
        host_memory_gib=2015.6,
    )
    base.update(changes)
    return NodeFacts(**base)


H100_SPEC = spec_module.parse(example("h100-sxm-8x.toml"), "h100.toml")


def test_a_node_that_is_what_the_spec_says_passes_every_field():
    assert [problem(r, facts()) for r in H100_SPEC.requirements] == [None] * len(H100_SPEC.requirements)


def broken_readings(uuid: str, **values):
    readings = facts().readings
    return {**readings, uuid: {**readings[uuid], **values}}


@pytest.mark.parametrize(
    "key, changes, expected",
    [
        (
            "gpu.count",
            dict(gpus=tuple(gpu(i) for i in range(7))),
            "gpu.count: expected 8 GPU(s), found 7: NVIDIA H100 80GB HBM3",
        ),
        (
            "gpu.model",
            dict(gpus=tuple(gpu(i, "NVIDIA H100 PCIe" if i == 3 else "NVIDIA H100 80GB HBM3") for i in range(8))),
            "gpu.model: expected 'H100 80GB HBM3' per GPU; GPU 3 (GPU-0003, bus 00000000:1B:00.0) (NVIDIA H100 PCIe): 'NVIDIA H100 PCIe'",
        ),
        (
            "gpu.memory_gib",
            dict(gpus=tuple(gpu(i, memory_gib=39.4 if i == 5 else 79.6) for i in range(8))),
            "gpu.memory_gib: expected >= 79 per GPU; GPU 5 (GPU-0005, bus 00000000:1D:00.0) (NVIDIA H100 80GB HBM3): 39.4 GiB",
        ),
        (
            "gpu.nvlinks",
            dict(readings=broken_readings("GPU-0002", nvlink_up=[True] * 12 + [False] * 6)),
            "gpu.nvlinks: expected 18 per GPU; GPU 2 (GPU-0002, bus 00000000:1A:00.0) (NVIDIA H100 80GB HBM3): 12 of 18 NVLinks active",
        ),
        (
            "gpu.pcie_width",
            dict(readings=broken_readings("GPU-0001", pcie_max_width=8)),
            "gpu.pcie_width: expected 16 per GPU; GPU 1 (GPU-0001, bus 00000000:19:00.0) (NVIDIA H100 80GB HBM3): x8",
        ),
        (
            "gpu.pcie_gen",
            dict(readings=broken_readings("GPU-0007", pcie_max_gen=4)),
            "gpu.pcie_gen: expected 5 per GPU; GPU 7 (GPU-0007, bus 00000000:1F:00.0) (NVIDIA H100 80GB HBM3): gen4",
        ),
        (
            "software.driver",
            dict(versions={**facts().versions, "driver": "525.60.13"}),
            "software.driver: expected >=535.104, found 525.60.13",
        ),
        (
            "software.nccl",
            dict(versions={**facts().versions, "nccl": ""}),
            "software.nccl: expected >=2.18, found none",
        ),
        ("host.cpu_cores", dict(cpu_cores=64), "host.cpu_cores: expected >= 96 logical CPUs, found 64"),
        ("host.memory_gib", dict(host_memory_gib=503.2), "host.memory_gib: expected >= 1800 GiB, found 503.2 GiB"),
        (
            "gpu.memory_gib",
            dict(gpus=(), nvml_status="absent", nvml_message="no NVIDIA driver"),
            "gpu.memory_gib: expected >= 79 per GPU, found no GPU (no NVIDIA driver)",
        ),
    ],
)
def test_each_mismatch_names_the_field_expected_and_found(key, changes, expected):
    requirement = H100_SPEC.requirement(key)
    assert requirement is not None
    assert problem(requirement, facts(**changes)) == expected


def test_the_spec_checks_run_as_named_tests_and_fail_with_expected_vs_found(run_gpuconform, pytester, fake_nvml):
    """End to end: 2 fake H100s, one with a link that trains to x8 only, against a spec of 4."""
    fake_nvml({"driver": "570.86.15", "cuda": 12080, "gpus": [h100(0), h100(1, pcie_max_width=8)]})
    (pytester.path / "node.toml").write_text(
        'name = "4 × H100"\n[gpu]\ncount = 4\nmodel = "H100"\npcie_width = 16\n'
        '[software]\ndriver = ">=550"\n[host]\ncpu_cores = { min = 1 }\n'
    )
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    result = run_gpuconform("--gpuconform-spec", "node.toml", "-v", "--junitxml=out.xml")
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            "gpuconform: acceptance spec 4 × H100 (node.toml): gpu.count, gpu.model, gpu.pcie_width, software.driver, host.cpu_cores",
            "*gpuconform-spec::gpu_count FAILED*",
            "*gpuconform-spec::gpu_model PASSED*",
            "*gpuconform-spec::gpu_pcie_width FAILED*",
            "*gpuconform-spec::software_driver PASSED*",
            "*gpuconform-spec::host_cpu_cores PASSED*",
            "*test_plain.py::test_plain PASSED*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*spec 4 × H100 (node.toml): gpu.count: expected 4 GPU(s), found 2: NVIDIA H100 80GB HBM3",
            "*spec 4 × H100 (node.toml): gpu.pcie_width: expected 16 per GPU; GPU 1 (*): x8",
            "verdict: FAIL: 2 of 6 checks failed (2 causes) on 2 × H100 80GB HBM3 against spec 4 × H100",
        ]
    )
    xml = (pytester.path / "out.xml").read_text()
    assert 'classname="gpuconform-spec" name="gpu_count"' in xml
    assert '<property name="gpuconform.spec" value="4 × H100" />' in xml
    result = run_gpuconform("--gpuconform-spec", "node.toml", "-k", "model")  # selectable like any test
    result.assert_outcomes(passed=1, deselected=5)


def test_cpu_runner_spec_verifies_a_cpu_node(run_gpuconform, pytester, tmp_path):
    spec = tmp_path / "cpu.toml"
    spec.write_text(example("cpu-ci-runner.toml").replace("min = 7", "min = 0.5"))
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    result = run_gpuconform(f"--gpuconform-spec={spec}", f"--gpuconform-json={tmp_path / 'node.json'}")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "verdict: PASSED AS A CPU NODE: CPU node: GPU checks not run (no NVIDIA driver); 5 checks passed against spec CPU-only CI",
            "  runner",  # wrapped, never cut: the summary fits 120 columns
        ]
    )
    import json

    data = json.loads((tmp_path / "node.json").read_text())
    assert data["verdict"]["kind"] == "cpu" and data["verdict"]["verified"] is True
    assert data["spec"]["requirements"]["gpu.count"] == "0"


def test_host_facts_are_the_real_ones():
    from pytest_gpuconform.acceptance.judge import host_cpu_cores, host_memory_gib

    assert host_cpu_cores() == os.cpu_count()
    memory = host_memory_gib()
    assert memory is not None and 0.1 < memory < 100_000


def test_version_ranges_accept_prereleases_and_local_builds():
    """NGC images ship torch such as 2.6.0a0+ecf3bae40a: a prerelease with a local part."""
    (requirement,) = spec_module.parse('[software]\ntorch = ">=2.4,<2.7"\n', "s.toml").requirements
    assert requirement.allows("2.6.0a0+ecf3bae40a") and requirement.allows("2.13.0+cpu") is False
    assert requirement.allows("2.5.1+cu124") and not requirement.allows("2.3.1") and not requirement.allows("none")
