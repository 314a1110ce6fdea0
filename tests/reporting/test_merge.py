"""``gpuconform merge``: many nodes' reports into one that CI reporters keep apart.

Inputs are pytest-shaped JUnit files in tests/data (node-a passes, node-b has a failure,
a setup error and a skip); the real two-node pytest runs are in test_report.py, the real
consumers (junitparser, junit2html, test-results-parser, npm tools) in test_consumers.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

import support
from pytest_gpuconform.cli import main

DATA = support.DATA
SCHEMA = DATA / "junit-10-testcase-properties.xsd"
NODE_A = DATA / "junit-node-a.xml"
NODE_B = DATA / "junit-node-b.xml"


def require_tool(name: str, debian_package: str) -> str:
    """The tool's path; a skip with the reason where it is missing (a failure in CI, where
    GPUCONFORM_REQUIRE_TOOLS=1 says it must be installed)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (Debian package {debian_package})"
        if os.environ.get("GPUCONFORM_REQUIRE_TOOLS"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def assert_schema_valid(path: Path) -> None:
    xmllint = require_tool("xmllint", "libxml2-utils")
    result = subprocess.run(
        [xmllint, "--noout", "--schema", str(SCHEMA), str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def cases(root: ElementTree.Element) -> dict[tuple[str, str], ElementTree.Element]:
    return {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}


def props(element: ElementTree.Element) -> list[tuple[str, str]]:
    return [(p.get("name"), p.get("value")) for p in element.iterfind("properties/property")]


def test_two_nodes_stay_apart_counts_add_up_properties_survive(tmp_path, capsys):
    out = tmp_path / "cluster.xml"
    assert main(["merge", str(NODE_A), str(NODE_B), "-o", str(out)]) == 0
    assert "2 node(s), 8 tests" in capsys.readouterr().out

    merged = ElementTree.parse(out).getroot()
    suites = {s.get("name"): s for s in merged.findall("testsuite")}
    assert list(suites) == ["node-a", "node-b"]
    # Counts add up, at the root too (skipped included: consumers read the root's totals):
    # 8 tests; node-b's failure and its setup error (kept as pytest's <error>); a skip per node.
    totals = ("tests", "failures", "errors", "skipped")
    assert tuple(merged.get(name) for name in totals) == ("8", "1", "1", "2")
    assert [tuple(s.get(name) for name in totals) for s in suites.values()] == [
        ("4", "0", "0", "1"),
        ("4", "1", "1", "1"),
    ]
    assert [s.get("hostname") for s in suites.values()] == ["node-a", "node-b"]
    assert float(merged.get("time")) == pytest.approx(3.75)

    # The same test from both nodes: two cases, host in the classname (GitLab's suite key).
    inputs = {"node-a": ElementTree.parse(NODE_A).getroot(), "node-b": ElementTree.parse(NODE_B).getroot()}
    out_cases = cases(merged)
    for node, source in inputs.items():
        source_suite = source.find("testsuite")
        # Suite properties (the inventory) survive, with the node's identity and source added.
        assert props(suites[node])[: len(props(source_suite))] == props(source_suite)
        assert ("gpuconform.source", f"junit-{node}.xml") in props(suites[node])
        for (classname, name), case in cases(source).items():
            copy = out_cases[(f"{node}.{classname}", name)]
            assert props(copy) == props(case)  # measured numbers survive
            assert copy.findtext("system-out") == case.findtext("system-out")

    error = out_cases[("node-b.pytest_gpuconform.conformance.test_collectives", "test_all_reduce[ws2-cuda-fp32]")]
    (element,) = error.findall("error")
    assert element.get("message") == 'failed on setup with "RuntimeError: needs 2 GPUs for ws2, rank 1 has no device"'
    assert_schema_valid(out)


def test_merged_output_reads_in_junitparser_and_merges_again_unchanged(tmp_path):
    from junitparser import xunit2

    first = tmp_path / "a.xml"
    assert main(["merge", str(NODE_A), "-o", str(first)]) == 0
    again = tmp_path / "again.xml"
    assert main(["merge", str(first), str(NODE_B), "-o", str(again)]) == 0
    parsed = xunit2.JUnitXml.fromfile(str(again))
    names = {(suite.name, case.classname) for suite in parsed for case in suite}
    assert ("node-a", "node-a.pytest_gpuconform.conformance.test_amp") in names  # not prefixed twice
    case = next(c for s in parsed for c in s if c.name == "test_model_matches_fp32[cuda-bf16]" and s.name == "node-a")
    assert {p.name: p.value for p in case.properties()}["out_rel_l2"] == "0.0061"
    assert_schema_valid(again)


def test_per_rank_files_are_labelled_host_and_rank(tmp_path):
    rank_file = tmp_path / "junit-node-a-r3.xml"
    shutil.copy(NODE_A, rank_file)
    out = tmp_path / "cluster.xml"
    assert main(["merge", str(rank_file), str(NODE_B), "-o", str(out)]) == 0
    suite = ElementTree.parse(out).getroot().find("testsuite")
    assert suite.get("name") == "node-a-r3"
    assert ("gpuconform.rank", "3") in props(suite) and ("gpuconform.host", "node-a") in props(suite)
    assert all(c.get("classname").startswith("node-a-r3.") for c in suite.iter("testcase"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "junit-gone.xml", "no such file"),
    "empty": (lambda d: _write(d / "junit-empty.xml", ""), "is empty (0 bytes)"),
    "truncated": (lambda d: _write(d / "junit-cut.xml", NODE_A.read_text()[:700]), "not well-formed XML"),
    "not junit": (
        lambda d: _write(d / "page.xml", "<html><body/></html>"),
        "not a JUnit report (root element is <html>",
    ),
    "no suite": (lambda d: _write(d / "junit-none.xml", "<testsuites/>"), "contains no <testsuite>"),
    "directory": (lambda d: d, "is a directory"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_named_exit_2_and_nothing_written(tmp_path, capsys, kind):
    make, expected = BAD_INPUTS[kind]
    (tmp_path / "in").mkdir()
    bad = make(tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "cluster.xml"
    out.write_text("previous report")
    assert main(["merge", str(NODE_A), str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpuconform merge: error: {bad}: ") and expected in err
    assert out.read_text() == "previous report"  # untouched, and no temporary file left
    assert os.listdir(out_dir) == ["cluster.xml"]


def test_same_node_twice_and_output_among_inputs_are_refused(tmp_path, capsys):
    twin = tmp_path / "junit-node-a-again.xml"
    shutil.copy(NODE_A, twin)
    out = tmp_path / "cluster.xml"
    assert main(["merge", str(NODE_A), str(twin), "-o", str(out)]) == 2
    assert "of node node-a is also in" in capsys.readouterr().err and not out.exists()
    assert main(["merge", str(NODE_A), str(NODE_A), "-o", str(out)]) == 2
    assert "given twice" in capsys.readouterr().err and not out.exists()
    assert main(["merge", str(NODE_A), str(twin), "-o", str(twin)]) == 2
    assert "the output is also one of the inputs" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    """The installed ``gpuconform`` command, as CI calls it."""
    script = shutil.which("gpuconform", path=os.path.dirname(sys.executable)) or shutil.which("gpuconform")
    assert script, "the gpuconform console script is not installed beside this Python"
    empty = _write(tmp_path / "junit-empty.xml", "")
    result = subprocess.run(
        [script, "merge", str(empty), "-o", str(tmp_path / "x.xml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "junit-empty.xml: is empty" in result.stderr
    assert not (tmp_path / "x.xml").exists()


def test_unwritable_output_is_named_exit_2_before_any_work(tmp_path, capsys):
    """/proc takes no files: the error names the output and the reason, no traceback."""
    for command in ("merge", "report"):
        assert main([command, str(NODE_A), "-o", "/proc/gpuconform-x.out"]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"gpuconform {command}: error: /proc/gpuconform-x.out: cannot write (") and "\n" == err[-1]
        )
        assert "Traceback" not in err
    (tmp_path / "a-dir").mkdir()
    assert main(["merge", str(NODE_A), "-o", str(tmp_path / "a-dir")]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["inventory", "-o", "/proc/gpuconform-inventory.json"]) == 2
    assert capsys.readouterr().err.startswith(
        "gpuconform inventory: error: /proc/gpuconform-inventory.json: cannot write"
    )


def test_memory_does_not_grow_with_the_number_of_nodes(tmp_path):
    """Streaming: the merge's peak Python memory at 40 nodes is about that at 10 (one
    node's suite at a time); a merge that held the fleet would need 4x."""
    import tracemalloc

    from pytest_gpuconform.reporting import merge
    from support.fleet import make_fleet

    plan = make_fleet(DATA / "junit-real-cpu-node.xml", tmp_path / "fleet", 40)
    peaks = {}
    for count in (10, 40):
        tracemalloc.start()
        merge.merge_to([str(p) for p in plan.paths[:count]], str(tmp_path / f"merged-{count}.xml"))
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[40] < peaks[10] * 1.5, peaks
    root = ElementTree.parse(tmp_path / "merged-40.xml").getroot()
    assert len(root.findall("testsuite")) == 40 and root.get("tests") == str(sum(1 for _ in root.iter("testcase")))


def test_merged_output_merges_again_and_a_merged_input_is_read_incrementally(tmp_path, monkeypatch):
    """A merged file re-merged (as a large file, read suite by suite) gives the same suites."""
    from pytest_gpuconform.reporting import suites

    first = tmp_path / "first.xml"
    assert main(["merge", str(NODE_A), str(NODE_B), "-o", str(first)]) == 0
    monkeypatch.setattr(suites, "WHOLE_FILE_BYTES", 0)  # take the incremental path
    again = tmp_path / "again.xml"
    assert main(["merge", str(first), "-o", str(again)]) == 0
    assert ElementTree.tostring(ElementTree.parse(first).getroot()) == ElementTree.tostring(
        ElementTree.parse(again).getroot()
    )
    truncated = tmp_path / "cut.xml"
    truncated.write_text(first.read_text()[:-40])
    assert main(["merge", str(truncated), "-o", str(tmp_path / "x.xml")]) == 2
    assert not (tmp_path / "x.xml").exists()


def test_a_test_repeated_within_one_file_is_kept(tmp_path):
    """pytest writes a failed call and an error in its teardown as two <testcase>s."""
    double = tmp_path / "junit-node-c.xml"
    double.write_text(
        '<testsuites><testsuite name="pytest" tests="2" failures="1" errors="1"><properties>'
        '<property name="gpuconform.host" value="node-c"/></properties>'
        '<testcase classname="test_x" name="test_a"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="test_x" name="test_a"><error message="failed on teardown"/></testcase>'
        "</testsuite></testsuites>"
    )
    out = tmp_path / "cluster.xml"
    assert main(["merge", str(double), "-o", str(out)]) == 0
    root = ElementTree.parse(out).getroot()
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("2", "1", "1")
    assert_schema_valid(out)
