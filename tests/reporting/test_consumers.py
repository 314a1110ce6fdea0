"""JUnit for every consumer: the real parsers read our files with the counts and names we mean.

Two files are checked: what ``pytest --gpuconform --junitxml`` writes for a node (a pass, a
failure, a fixture error, a skip, recorded numbers), and ``gpuconform merge`` of two such
nodes. Each consumer that installs here reads both:

| consumer | how | what must agree |
|---|---|---|
| junitparser (PyPI) | ``JUnitXml.fromfile`` | per suite: tests / failures / errors / skipped; case names and classnames |
| junit2html (PyPI) | ``junit2htmlreport.parser.Junit`` + the HTML it writes | passed / failed (errors count as failed there) / skipped; names |
| test-results-parser (PyPI, Codecov's) | ``parse_junit_xml`` | pass / failure / error / skip per case; names, classnames, suite |
| junit2json (npm) | its CLI's JSON | root and suite totals (skipped too); cases |
| xunit-viewer (npm) | its console renderer | one line per case with the right symbol, under its suite |

and the schema in tests/data accepts what plain pytest writes (both ``junit_family`` values).
The npm tools are found in ``$GPUCONFORM_NPM_TOOLS`` or ``.tools/npm`` (scripts/run-tests
installs them there); where one is missing its test skips saying so (fails under
GPUCONFORM_REQUIRE_TOOLS=1).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from xml.etree import ElementTree

import pytest

from pytest_gpuconform.cli import main
from pytest_gpuconform.reporting.junit import case_outcome
from support import DATA, ROOT
from support.browser import require_tool

SCHEMA = DATA / "junit-10-testcase-properties.xsd"
NODE_TESTS = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture fails on purpose")

def test_pass(record):
    record("x_tflops", 1.5)
    record("x_tflops_floor", 1.0)

def test_fail():
    assert 1 == 2, "one is not two"

def test_error(broken):
    pass

def test_skip():
    pytest.skip("not on this node")
"""


def truth(path: Path) -> dict[str, dict]:
    """What the file says, read by our own reader: per suite, counts and case outcomes."""
    root = ElementTree.parse(path).getroot()
    suites = {}
    for suite in [root] if root.tag == "testsuite" else root.findall("testsuite"):
        cases = {(c.get("classname"), c.get("name")): case_outcome(c)[0] for c in suite.iter("testcase")}
        counts = Counter(cases.values())
        suites[suite.get("name")] = {"cases": cases, "counts": counts}
    return suites


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A node's own JUnit file (node-x) and the merge of two nodes (node-x, node-y)."""
    directory = tmp_path_factory.mktemp("consumers")
    (directory / "test_node.py").write_text(NODE_TESTS)
    files = {}
    for host in ("node-x", "node-y"):
        files[host] = directory / f"junit-{host}.xml"
        done = subprocess.run(
            [str(Path(sys.executable).parent / "pytest")]
            + ["--gpuconform", "-p", "no:cacheprovider", "-p", "no:randomly", "test_node.py"]
            + [f"--junitxml={files[host]}"],
            cwd=directory,
            env=dict(os.environ, GPUCONFORM_HOST=host),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1, done.stdout[-2000:]
    merged = directory / "merged.xml"
    assert main(["merge", str(files["node-x"]), str(files["node-y"]), "-o", str(merged)]) == 0
    return {"node": files["node-x"], "merged": merged}


KINDS = ("node", "merged")


def test_our_truth_is_what_the_tests_did(reports):
    node = truth(reports["node"])
    (suite,) = node.values()
    assert suite["counts"] == Counter(passed=1, failed=1, error=1, skipped=1)
    merged = truth(reports["merged"])
    assert list(merged) == ["node-x", "node-y"]
    root = ElementTree.parse(reports["merged"]).getroot()
    assert [root.get(k) for k in ("tests", "failures", "errors", "skipped")] == ["8", "2", "2", "2"]


@pytest.mark.parametrize("kind", KINDS)
def test_schema_accepts_it(reports, kind):
    xmllint = require_tool("xmllint", debian_package="libxml2-utils")
    done = subprocess.run(
        [xmllint, "--noout", "--schema", str(SCHEMA), str(reports[kind])], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("family", ["xunit1", "xunit2"])
def test_schema_accepts_what_plain_pytest_writes(pytester, family):
    """Without the plugin: pytest's own <error>, properties, xunit1 file/line attributes."""
    xmllint = require_tool("xmllint", debian_package="libxml2-utils")
    pytester.makepyfile(
        test_plain=NODE_TESTS.replace("(record)", "(record_property)").replace("record(", "record_property(")
        + "\ndef test_suite_property(record_testsuite_property):\n    record_testsuite_property('k', 'v')\n"
        + "\ndef test_output(capsys):\n    print('out')\n    import sys; print('err', file=sys.stderr)\n"
    )
    pytester.runpytest(
        "-p",
        "no:cacheprovider",
        f"--junitxml={pytester.path / 'plain.xml'}",
        "-o",
        f"junit_family={family}",
        "-o",
        "junit_logging=all",
    )
    text = (pytester.path / "plain.xml").read_text()
    assert "<error" in text and "<skipped" in text
    done = subprocess.run(
        [xmllint, "--noout", "--schema", str(SCHEMA), str(pytester.path / "plain.xml")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_junitparser(reports, kind):
    from junitparser import Error, Failure, JUnitXml, Skipped

    expected = truth(reports[kind])
    parsed = JUnitXml.fromfile(str(reports[kind]))
    seen = {}
    for suite in parsed:
        cases = {}
        for case in suite:
            kinds = {type(r) for r in case.result}
            cases[(case.classname, case.name)] = (
                "error"
                if Error in kinds
                else "failed"
                if Failure in kinds
                else "skipped"
                if Skipped in kinds
                else "passed"
            )
        seen[suite.name] = cases
        counts = expected[suite.name]["counts"]
        assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (
            sum(counts.values()),
            counts["failed"],
            counts["error"],
            counts["skipped"],
        )
    assert seen == {name: s["cases"] for name, s in expected.items()}
    if kind == "merged":
        assert (parsed.tests, parsed.failures, parsed.errors, parsed.skipped) == (8, 2, 2, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_junit2html(reports, kind, tmp_path):
    from junit2htmlreport import parser

    expected = truth(reports[kind])
    report = parser.Junit(str(reports[kind]))
    for suite in report.suites:
        counts = expected[suite.name]["counts"]
        outcomes = Counter(str(case.outcome().value) for case in suite.all())
        # junit2html has no "error" outcome: errors are failed there.
        assert outcomes == Counter(
            passed=counts["passed"], failed=counts["failed"] + counts["error"], skipped=counts["skipped"]
        )
        assert {(c.testclass.name, c.name) for c in suite.all()} == set(expected[suite.name]["cases"])
    html = report.html()
    for name in expected:
        assert name in html


@pytest.mark.parametrize("kind", KINDS)
def test_test_results_parser(reports, kind):
    parse = pytest.importorskip("test_results_parser", reason="pip install test-results-parser").parse_junit_xml
    expected = truth(reports[kind])
    words = {"pass": "passed", "failure": "failed", "error": "error", "skip": "skipped"}
    parsed = parse(reports[kind].read_bytes())
    seen: dict[str, dict] = {}
    for run in parsed.testruns:
        seen.setdefault(run.testsuite, {})[(run.classname, run.name)] = words[str(run.outcome)]
    assert seen == {name: s["cases"] for name, s in expected.items()}


def npm_tool(name: str) -> str:
    """An npm CLI installed by scripts/run-tests (or on PATH); a skip saying how otherwise."""
    homes = filter(None, [os.environ.get("GPUCONFORM_NPM_TOOLS"), str(ROOT / ".tools" / "npm")])
    return require_tool(
        name,
        how="npm package; scripts/run-tests installs it into .tools/npm",
        dirs=tuple(Path(home) / "node_modules" / ".bin" for home in homes),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_junit2json(reports, kind):
    done = subprocess.run([npm_tool("junit2json"), str(reports[kind])], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    suites = data["testsuite"] if "testsuite" in data else [data]
    expected = truth(reports[kind])
    for suite in suites:
        counts = expected[suite["name"]]["counts"]
        assert (suite["tests"], suite["failures"], suite["errors"], suite["skipped"]) == (
            sum(counts.values()),
            counts["failed"],
            counts["error"],
            counts["skipped"],
        )
        cases = {}
        for case in suite["testcase"]:
            outcome = (
                "error"
                if "error" in case
                else "failed"
                if "failure" in case
                else "skipped"
                if "skipped" in case
                else "passed"
            )
            cases[(case["classname"], case["name"])] = outcome
        assert cases == expected[suite["name"]]["cases"]
    if kind == "merged":
        assert (data["tests"], data["failures"], data["errors"], data["skipped"]) == (8, 2, 2, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_xunit_viewer(reports, kind, tmp_path):
    tool = npm_tool("xunit-viewer")
    # cwd: the console renderer also writes index.html into the current directory.
    done = subprocess.run(
        [tool, "-r", str(reports[kind]), "-c", "-C", "-n"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    symbols = {"✓": "passed", "✗": "failed", "!": "error", "⊘": "skipped"}
    seen: dict[str, dict[str, str]] = {}
    suite = None
    for line in done.stdout.splitlines():
        header = re.match(r"^ (\S.*)$", line)
        case = re.match(r"^     (\S) (\S+) time=", line)
        if header:
            suite = header.group(1).strip()
        elif case and case.group(1) in symbols:
            assert suite is not None
            seen.setdefault(suite, {})[case.group(2)] = symbols[case.group(1)]
    expected = {name: {n: o for (_, n), o in s["cases"].items()} for name, s in truth(reports[kind]).items()}
    assert seen == expected
    if kind != "merged":
        return
    page = tmp_path / "xunit-viewer.html"
    done = subprocess.run(
        [tool, "-r", str(reports[kind]), "-o", str(page)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and page.stat().st_size > 10_000
