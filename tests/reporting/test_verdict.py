"""What was verified, in one line; a GPU-less node never gets a bare PASS; strict failures of
one cause are listed once; the terminal summary fits 120 columns; ``--co`` prints none."""

from __future__ import annotations

import pytest

from pytest_gpuconform.acceptance.verdict import node_verdict
from support import h100

H100S = {f"gpu{i}_name": "NVIDIA H100 80GB HBM3" for i in range(8)}


@pytest.mark.parametrize(
    "facts, counts, causes, text, verified",
    [
        (
            dict(H100S, gpu_count="8", nvml="ok"),
            dict(passed=389),
            None,
            "PASS: 8 × H100 80GB HBM3 verified: 389 checks",
            True,
        ),
        (
            dict(H100S, gpu_count="8", nvml="ok"),
            dict(passed=389, gpu_passed=270),
            None,
            "PASS: 8 × H100 80GB HBM3 verified: 389 checks",
            True,
        ),
        (  # every cuda variant skipped or deselected (a MIG node, -k cpu): the GPUs were not checked
            dict(H100S, gpu_count="8", nvml="ok"),
            dict(passed=40, skipped=349, gpu_passed=0),
            None,
            "NOT VERIFIED: no check ran on a GPU of 8 × H100 80GB HBM3: 40 checks passed elsewhere (349 skipped)",
            False,
        ),
        (
            dict(H100S, gpu_count="8", nvml="ok", spec="8 × H100 SXM"),
            dict(passed=380, skipped=9),
            None,
            "PASS: 8 × H100 80GB HBM3 verified against spec 8 × H100 SXM: 380 checks (9 skipped)",
            True,
        ),
        (
            dict(gpu_count="0", nvml="absent", nvml_message="no NVIDIA driver (NVML Shared Library Not Found)"),
            dict(passed=115, skipped=274),
            None,
            "PASSED AS A CPU NODE: CPU node: GPU checks not run (no NVIDIA driver); 115 checks passed (274 skipped)",
            False,
        ),
        (
            dict(gpu_count="0", nvml="absent", nvml_message="no NVIDIA driver", spec="CPU runner", spec_gpu_count="0"),
            dict(passed=3),
            None,
            "PASSED AS A CPU NODE: CPU node: GPU checks not run (no NVIDIA driver); 3 checks passed against spec CPU runner",
            True,
        ),
        (
            dict(gpu_count="0", nvml="absent", nvml_message="no NVIDIA driver"),
            dict(passed=115, failed=193, error=6),
            1,
            "FAIL: 199 of 314 checks failed (1 cause); CPU node: GPU checks not run (no NVIDIA driver)",
            False,
        ),
        (
            dict(H100S, gpu_count="8"),
            dict(skipped=4),
            None,
            "NOT VERIFIED: no check ran (4 skipped) on 8 × H100 80GB HBM3",
            False,
        ),
        (
            dict(gpu_count="0", nvml="error", nvml_message="nvmlInit failed: LibRmVersionMismatch"),
            dict(passed=1, failed=1),
            1,
            "FAIL: 1 of 2 checks failed (1 cause); CPU node: GPU checks not run (NVML error: nvmlInit failed: LibRmVersionMismatch)",
            False,
        ),
    ],
)
def test_verdict_lines(facts, counts, causes, text, verified):
    verdict = node_verdict(facts, counts, causes)
    assert (verdict.text(), verdict.verified) == (text, verified)
    assert verdict.word != "PASS" or int(facts.get("gpu_count", "0")) > 0


MIXED = """
import pytest

@pytest.mark.gpu
def test_needs_gpu():
    pass

def test_cpu():
    pass
"""


def test_cpu_node_says_what_it_verified(run_gpuconform, pytester):
    pytester.makepyfile(test_mixed=MIXED)
    result = run_gpuconform()
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        ["verdict: PASSED AS A CPU NODE: CPU node: GPU checks not run (no NVIDIA driver*); 1 check passed (1 skipped)"]
    )
    assert "verdict: PASS:" not in result.stdout.str()


def test_gpu_node_where_no_check_ran_on_a_gpu_is_not_verified(run_gpuconform, pytester, fake_nvml):
    """Two H100s, but every check ran on the CPU (the cuda variants skipped or were not
    collected): the node's GPUs were not checked, so the verdict must not be PASS."""
    fake_nvml({"gpus": [h100(0), h100(1)]})
    pytester.makepyfile(test_cpu="def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    result = run_gpuconform()
    result.stdout.fnmatch_lines(
        ["verdict: NOT VERIFIED: no check ran on a GPU of 2 × H100 80GB HBM3: 2 checks passed elsewhere"]
    )


STRICT = """
import pytest

@pytest.fixture(scope="module")
def needs_gpu(expect_gpus, node_inventory):
    # as the shipped health checks' fixture stops: the same words as the plugin's own
    reason = f"needs 1 GPU(s), node has no GPU ({node_inventory.node.message})"
    pytest.fail(f"strict acceptance (--gpuconform-expect-gpus {expect_gpus}): {reason}", pytrace=False)

@pytest.mark.gpu
@pytest.mark.parametrize("i", range(5))
def test_gpu(i):
    pass

def test_fixture_stops(needs_gpu):
    pass

def test_real_failure():
    assert 1 == 2
"""


def test_strict_failures_of_one_cause_are_listed_once_with_their_count(run_gpuconform, pytester):
    pytester.makepyfile(test_strict=STRICT)
    result = run_gpuconform("--gpuconform-expect-gpus", "1", "--junitxml=strict.xml")
    assert result.ret == 1
    out = result.stdout.str()
    # pytest's own last line keeps every result; its failure lists show the cause once.
    result.stdout.fnmatch_lines(["*6 failed, 1 error in*"])
    # One failure section body states the cause (summary lines are cut to the terminal's width).
    cause = "strict acceptance (--gpuconform-expect-gpus 1): needs 1 GPU(s), node has no GPU (no NVIDIA"
    assert sum(line.startswith(cause) for line in out.splitlines()) == 1
    assert out.count("FAILED test_strict.py::test_gpu") == 1 and "FAILED test_strict.py::test_real_failure" in out
    result.stdout.fnmatch_lines(
        [
            "failures sharing a cause (1): count, one message, first test",
            "  6 × Failed: strict acceptance (--gpuconform-expect-gpus 1): needs 1 GPU(s), node has no GPU*",
            "      first: test_strict.py::test_gpu[[]0[]]",
            "(5 strict-acceptance result(s) of a cause listed above are left out of pytest's failure lists; JUnit has each)",
        ]
    )
    xml = (pytester.path / "strict.xml").read_text()
    assert xml.count("strict acceptance (--gpuconform-expect-gpus 1)") >= 6  # JUnit keeps each


def test_collect_only_prints_no_summary(run_gpuconform, pytester):
    pytester.makepyfile(test_mixed=MIXED)
    result = run_gpuconform("--co")
    assert result.ret == 0
    assert "gpuconform summary" not in result.stdout.str() and "no tests ran" not in result.stdout.str()


LONG = """
import pytest

@pytest.mark.parametrize("i", range(3))
def test_numbers(i, record):
    for name in ("alpha_error_with_a_long_name", "beta_error_with_a_long_name", "gamma_error_with_a_long_name"):
        record(name, 0.001 * (i + 1))
        record(name + "_bound", 0.01)
    record("widget_ratio", 0.5)
"""

LONG_SKIP = """
import pytest

def test_skip_long():
    pytest.skip("needs the quantum flux capacitor installed in every rack of the datacenter, "
                "which this node has not got, and the reason goes on for a very long time")
"""


def test_summary_fits_120_columns_and_rs_keeps_the_full_reason(run_gpuconform, pytester):
    pytester.makepyfile(test_long=LONG, test_other=LONG_SKIP)
    result = run_gpuconform("-rs")
    lines = result.stdout.str().split("gpuconform summary", 1)[1].splitlines()
    table = [line for line in lines[1:] if line.strip() and not line.startswith(("JUnit XML", "=", "SKIPPED"))]
    assert table and max(len(line) for line in table) <= 120, max(table, key=len)
    (row,) = [line for line in table if line.startswith("long ")]
    assert row.endswith(", +3 more")  # the numbers that did not fit are counted, none cut in the middle
    (skip_row,) = [line for line in table if line.startswith("other ")]
    words = skip_row.split("skipped: ", 1)[1]
    assert words.endswith("…") and words.startswith("needs the quantum flux capacitor")
    assert LONG_SKIP.replace("\n", " ").count(" " + words.rstrip("…").split()[-1] + " ") >= 1  # cut at a word
    result.stdout.fnmatch_lines(["SKIPPED*which this node has not got, and the reason goes on for a very long time"])


def test_verdict_command_one_line_per_node_and_its_exit_code(capsys):
    from pytest_gpuconform.cli import main
    from support import DATA

    assert main(["verdict", str(DATA / "junit-node-a.xml"), str(DATA / "junit-real-cpu-node.xml")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "node-a: PASS: 2 × H100 80GB HBM3 verified: 3 checks (1 skipped)",
        "vm: PASSED AS A CPU NODE: CPU node: GPU checks not run (no NVIDIA driver); 115 checks passed (274 skipped)",
    ]
    assert main(["verdict", "--first-failure", str(DATA / "junit-node-b.xml")]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    host, check, reason = line.split("\t")
    assert (host, check) == ("node-b", "test_activation_memory[cuda-fp32]") and reason.startswith("AssertionError")


def test_verdict_kind_is_one_word_per_node_for_scripts(capsys):
    from pytest_gpuconform.cli import main
    from support import DATA

    files = ["junit-node-a.xml", "junit-node-b.xml", "junit-real-cpu-node.xml"]
    assert main(["verdict", "--kind", *(str(DATA / name) for name in files)]) == 1
    assert capsys.readouterr().out.splitlines() == ["node-a\tpassed", "node-b\tfailed", "vm\tcpu"]
