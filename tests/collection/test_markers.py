"""Markers expand into per-parameter test ids; misuse is a collection error naming the test."""

import pytest

IDS = """
import pytest

@pytest.mark.world_size(2, 4)
@pytest.mark.dtype("fp32", "bfloat16")
def test_grid(world_size, dtype):
    pass

@pytest.mark.dtype("fp16", "bf16")
def test_device_and_dtype(device, dtype):
    pass
"""


def test_ids_per_world_size_device_and_dtype(pytester):
    pytester.makepyfile(test_ids=IDS)
    result = pytester.runpytest_subprocess("--gpuconform", "-p", "no:cacheprovider", ".", "--collect-only", "-q")
    result.stdout.fnmatch_lines(
        [
            "test_ids.py::test_grid[ws2-cpu-fp32]",
            "test_ids.py::test_grid[ws2-cpu-bf16]",
            "test_ids.py::test_grid[ws2-cuda-fp32]",
            "test_ids.py::test_grid[ws2-cuda-bf16]",
            "test_ids.py::test_grid[ws4-cpu-fp32]",
            "*",
            "test_ids.py::test_device_and_dtype[cpu-fp16]",
            "test_ids.py::test_device_and_dtype[cpu-bf16]",
            "test_ids.py::test_device_and_dtype[cuda-fp16]",
            "test_ids.py::test_device_and_dtype[cuda-bf16]",
        ]
    )


def test_dtype_fixture_is_a_torch_dtype_and_skips_carry_reasons(run_gpuconform, pytester):
    pytester.makepyfile(
        test_dt="""
        import pytest, torch

        @pytest.mark.dtype("fp16", torch.bfloat16)
        def test_dtype(device, dtype, tolerance):
            assert dtype in (torch.float16, torch.bfloat16)
            assert tolerance.dtype == {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    """
    )
    result = run_gpuconform("-rs")
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines(["*SKIPPED*needs 1 GPU(s), node has no GPU*"])


@pytest.mark.parametrize(
    "marker, expected",
    [
        ('dtype("fp8")', "*test_bad*unknown dtype 'fp8'; accepted: fp32, fp16, bf16*"),
        ("world_size(0)", "*test_bad*world_size(0,): sizes must be whole numbers >= 1*"),
        ('world_size("2")', "*test_bad*world_size('2',): sizes must be whole numbers >= 1*"),
        ("world_size(2.5)", "*test_bad*world_size(2.5,): sizes must be whole numbers >= 1*"),
        ("gpu(n=0)", "*test_bad*gpu(n=0): n must be a whole number >= 1*"),
        ("gpu(vram=8)", "*test_bad*gpu() got unknown keywords*vram*accepted: n, bf16*"),
    ],
)
def test_marker_misuse_is_a_collection_error(run_gpuconform, pytester, marker, expected):
    pytester.makepyfile(test_m=f"import pytest\n\n@pytest.mark.{marker}\ndef test_bad():\n    pass\n")
    result = run_gpuconform()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([expected])
    result.stdout.no_fnmatch_line("*_multicall*")


BAD_KEYWORDS = {
    "test_soon": (
        'world_size(2, timeout="soon")',
        "*test_soon.py::test_bad*world_size(timeout='soon'): expected a number of seconds > 0*",
    ),
    "test_zero": (
        "world_size(2, timeout=0)",
        "*test_zero.py::test_bad*world_size(timeout=0): expected a number of seconds > 0*",
    ),
    "test_fresh": (
        'world_size(2, fresh="yes")',
        "*test_fresh.py::test_bad*world_size(fresh='yes'): expected True or False*",
    ),
    "test_foo": ("gpu(n=1, foo=2)", "*test_foo.py::test_bad*gpu() got unknown keywords *'foo'*; accepted: n, bf16*"),
    "test_bf16": ('gpu(bf16="yes")', "*test_bf16.py::test_bad*gpu(bf16='yes'): expected True or False*"),
    "test_dtkw": ('dtype("fp32", strict=True)', "*test_dtkw.py::test_bad*dtype() takes no keywords*"),
}


def test_bad_marker_keywords_are_collection_errors_naming_the_test(run_gpuconform, pytester):
    """Keyword values are checked while collecting, never at run time (one run, one error each)."""
    for name, (marker, _) in BAD_KEYWORDS.items():
        pytester.makepyfile(**{name: f"import pytest\n\n@pytest.mark.{marker}\ndef test_bad():\n    pass\n"})
    result = run_gpuconform()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([f"*{len(BAD_KEYWORDS)} errors*"])
    for _, expected in BAD_KEYWORDS.values():
        result.stdout.fnmatch_lines([expected])
    result.stdout.no_fnmatch_line("*_multicall*")


def test_gpu_marker_skips_with_reason_on_cpu_node(run_gpuconform, pytester):
    pytester.makepyfile(
        test_g="""
        import pytest

        @pytest.mark.gpu(n=2, bf16=True)
        def test_needs_two():
            raise AssertionError("must not run on a CPU node")
    """
    )
    result = run_gpuconform("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs 2 GPU(s), node has no GPU (no NVIDIA driver*"])


def test_gpu_capabilities_come_from_nvml(run_gpuconform, pytester, fake_nvml):
    from support import h100

    volta = dict(h100(0), name="Tesla V100-SXM2-16GB", cc=[7, 0], memory_gib=16)
    fake_nvml({"gpus": [volta]})
    pytester.makepyfile(
        test_caps="""
        import pytest

        @pytest.mark.gpu(bf16=True)
        def test_bf16():
            pass

        @pytest.mark.gpu(min_memory_gib=40)
        def test_big_memory():
            pass

        @pytest.mark.gpu(min_compute_capability="8.0")
        def test_ampere():
            pass

        @pytest.mark.world_size(2)
        def test_two_ranks():
            pass

        @pytest.mark.dtype("bf16")
        def test_bf16_dtype(device, dtype):
            pass
    """
    )
    result = run_gpuconform("-rs", "-k", "not cpu")
    result.assert_outcomes(skipped=5)
    result.stdout.fnmatch_lines_random(
        [
            "*needs bf16 (compute capability >= 8.0); GPU 0 (*): Tesla V100-SXM2-16GB*",
            "*needs >= 40 GiB GPU memory; GPU 0 (*): Tesla V100*",
            "*needs compute capability >= 8.0; GPU 0 (*): Tesla V100*",
            "*needs 2 GPU(s), node has 1 visible GPU(s)*",
            "*bf16 needs compute capability >= 8.0 (Ampere or newer); GPU 0 (*): Tesla V100*",
        ]
    )


def test_cpu_world_size_capacity_option(run_gpuconform, pytester):
    pytester.makepyfile(
        test_cap="""
        import pytest

        @pytest.mark.world_size(3)
        def test_three():
            pass
    """
    )
    result = run_gpuconform("-rs", "--gpuconform-cpu-ranks", "2", "-k", "cpu")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs 3 gloo ranks; this CPU node hosts at most 2 (--gpuconform-cpu-ranks)*"])


def test_multi_rank_cuda_tests_skip_on_mig_slices_with_the_reason(run_gpuconform, pytester, fake_nvml):
    """NCCL cannot talk between MIG devices: a ws2 cuda test on two MIG slices skips saying so."""
    from support import h100

    migs = [
        {"uuid": f"MIG-{i}0000000-1111-2222-3333-444444444444", "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb"}
        for i in (1, 2)
    ]
    fake_nvml({"gpus": [h100(0, mig={"enabled": 1, "devices": migs})]})
    pytester.makepyfile(
        test_mig="""
        import pytest

        @pytest.mark.world_size(2)
        @pytest.mark.gpu
        def test_two_ranks():
            raise AssertionError("must not run on MIG slices")
    """
    )
    result = run_gpuconform("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs 2 whole GPUs; the visible devices are MIG slices*NCCL cannot communicate*"])
