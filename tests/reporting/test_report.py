"""``gpuconform report``: the HTML page, rendered in a real headless Chromium.

The end-to-end test simulates two nodes: two ``pytest --gpuconform`` runs with different
host names (``GPUCONFORM_HOST``; node-a with two fake H100s through tests/fake_nvml, node-b
a CPU node whose checkpointing check fails), merges them, renders the page, loads it in
Chromium and reads the matrix back from the DOM Chromium built. A screenshot is kept as a
test artifact (copied to $GPUCONFORM_ARTIFACTS when that names a directory).
"""

from __future__ import annotations

import json
import os
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import support
from pytest_gpuconform.cli import main
from pytest_gpuconform.reporting import html as report
from pytest_gpuconform.reporting.fleet import FAILED, Fleet
from support import browser
from support.browser import keep_artifact, require_tool

DATA = support.DATA
SCHEMA = DATA / "junit-10-testcase-properties.xsd"
FAKE_NVML_DIR = support.FAKE_NVML_DIR


def assert_schema_valid(*paths: Path) -> None:
    xmllint = require_tool("xmllint", debian_package="libxml2-utils")
    result = subprocess.run(
        [xmllint, "--noout", "--schema", str(SCHEMA), *map(str, paths)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return browser.chromium(page, profile, *args)[0]


class PageReader(HTMLParser):
    """What the tests look at in a page: matrix cells, inventory rows, chart shapes, and any
    attribute that would load something."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], str] = {}
        self.inventory: dict[str, list[str]] = {}
        self.shapes: list[dict[str, str]] = []
        self.loads: list[str] = []
        self.tags: set[str] = set()
        self._row: str | None = None
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        for name in ("src", "href", "srcset", "data", "action"):
            if name in attrs and not (name == "href" and attrs[name].startswith("#")):  # in-page links load nothing
                self.loads.append(f"<{tag} {name}={attrs[name]}>")
        if tag == "td" and "data-outcome" in attrs and "data-check" in attrs:
            self.cells[(attrs["data-check"], attrs["data-node"])] = attrs["data-outcome"]
        if tag == "tr" and "data-node" in attrs and "data-check" not in attrs and "data-verdict" not in attrs:
            self._row = attrs["data-node"]
            self.inventory[self._row] = []
        if tag == "td" and self._row:
            self._in_td = True
            self.inventory[self._row].append("")
        if tag in ("rect", "circle") and "data-node" in attrs:
            self.shapes.append(attrs)

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if tag == "td":
            self._in_td = False

    def handle_data(self, data):
        if self._row and self._in_td:
            self.inventory[self._row][-1] += data.strip()


def read_page(html: str) -> PageReader:
    reader = PageReader()
    reader.feed(html)
    return reader


CHECKPOINTING = """
import os
NODE = os.environ["GPUCONFORM_HOST"]

def test_activation_memory(record):
    ratio = 0.3 if NODE == "node-a" else 0.9   # node-b: a checkpoint that saves everything
    record("activation_ratio", ratio)
    record("activation_ratio_bound", 0.5)
    print(f"[sim] host={NODE}")
    assert ratio <= 0.5, f"activation_ratio {ratio} > bound 0.5"

if NODE == "node-a":
    def test_only_on_node_a():
        pass
"""

AMP = """
import pytest

@pytest.mark.dtype("fp16", "bf16")
def test_block_matches_fp32(dtype, record):
    record("out_rel_l2", 0.004)
    record("out_rel_l2_bound", 0.016)

def test_needs_eight_gpus():
    pytest.skip("needs 8 GPUs; this node has fewer")
"""

FAKE_H100S = {
    "driver": "550.54.15",
    "cuda": 12040,
    "gpus": [
        {
            "name": "NVIDIA H100 80GB HBM3",
            "uuid": f"GPU-0000000{i}",
            "bus_id": f"00000000:1{i}:00.0",
            "memory_gib": 80,
            "cc": [9, 0],
        }
        for i in range(2)
    ],
}


def test_two_nodes_merged_page_renders_in_chromium(pytester, monkeypatch, tmp_path):
    pytester.makepyfile(test_checkpointing=CHECKPOINTING, test_amp=AMP)
    (tmp_path / "nvml.json").write_text(json.dumps(FAKE_H100S))
    reports = {}
    for node in ("node-a", "node-b"):
        monkeypatch.setenv("GPUCONFORM_HOST", node)
        if node == "node-a":
            monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_NVML_DIR), os.environ.get("PYTHONPATH", "")]))
            monkeypatch.setenv("FAKE_NVML", str(tmp_path / "nvml.json"))
        else:
            monkeypatch.delenv("FAKE_NVML")
            monkeypatch.delenv("PYTHONPATH", raising=False)
        reports[node] = pytester.path / f"junit-{node}.xml"
        result = pytester.runpytest_subprocess(
            "--gpuconform",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            f"--junitxml={reports[node]}",
            "-o",
            "junit_logging=system-out",
            "test_checkpointing.py",
            "test_amp.py",
        )
        # The terminal summary: area x (device, dtype, world size), and where the JUnit file is.
        result.stdout.fnmatch_lines(
            [
                "*gpuconform summary*",
                "area*device*dtype*ws*pass*fail*error*skip*key numbers",
                "amp *-*bf16*1*1*0*0*0*out_rel_l2=0.004<=0.016",
                "amp *-*fp16*1*1*0*0*0*out_rel_l2=0.004<=0.016",
                "amp *-*[*]*[*]*0*0*0*1*skipped: needs 8 GPUs; this node has fewer",
                "checkpointing *-*-*1*2*0*0*0*activation_ratio=0.3<=0.5"
                if node == "node-a"
                else "checkpointing *-*-*1*0*1*0*0*activation_ratio=0.9>0.5!",
                f"JUnit XML: {reports[node]}",
            ]
        )
        assert result.ret == (0 if node == "node-a" else 1)
    assert_schema_valid(*reports.values())  # what pytest --gpuconform wrote

    merged = tmp_path / "cluster.xml"
    assert main(["merge", str(reports["node-a"]), str(reports["node-b"]), "-o", str(merged)]) == 0
    assert_schema_valid(merged)
    page = tmp_path / "report.html"
    assert main(["report", str(merged), "-o", str(page), "--title", "two-node simulation"]) == 0

    dom = chromium(page, tmp_path / "profile", "--dump-dom").stdout
    seen = read_page(dom)
    assert "two-node simulation" in dom and 'id="matrix"' in dom
    assert seen.cells == {
        ("test_activation_memory", "node-a"): "passed",
        ("test_activation_memory", "node-b"): "failed",
        ("test_only_on_node_a", "node-a"): "passed",
        ("test_only_on_node_a", "node-b"): "absent",
        ("test_block_matches_fp32[fp16]", "node-a"): "passed",
        ("test_block_matches_fp32[fp16]", "node-b"): "passed",
        ("test_block_matches_fp32[bf16]", "node-a"): "passed",
        ("test_block_matches_fp32[bf16]", "node-b"): "passed",
        ("test_needs_eight_gpus", "node-a"): "skipped",
        ("test_needs_eight_gpus", "node-b"): "skipped",
    }
    assert seen.inventory["node-a"][1:3] == ["2 × NVIDIA H100 80GB HBM3", "550.54.15"]
    assert seen.inventory["node-b"][1:3] == ["none", "—"]
    assert "AssertionError: activation_ratio 0.9 &gt; bound 0.5" in dom  # the failure's one-line reason
    bars = {
        (s["data-node"], s["data-measure"]): (s["data-value"], s["fill"])
        for s in seen.shapes
        if s.get("class") == "bar"
    }
    assert bars == {
        ("node-a", "activation_ratio"): ("0.3", "#2e7d32"),
        ("node-b", "activation_ratio"): ("0.9", "#c62828"),
    }
    dots = sorted((s["data-node"], s["data-check"]) for s in seen.shapes if s.get("class") == "dot")
    assert dots == sorted(
        (node, f"test_block_matches_fp32[{d}]") for node in ("node-a", "node-b") for d in ("fp16", "bf16")
    )
    assert seen.loads == [] and "script" not in seen.tags  # self-contained, even after Chromium ran it

    shot = tmp_path / "report.png"
    chromium(page, tmp_path / "profile", "--screenshot=" + str(shot), "--window-size=1280,1600", "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    keep_artifact(shot)
    keep_artifact(page)


def test_page_from_pytest_shaped_files(tmp_path):
    """Data files: node-b has a failure, a setup error and a different GPU and driver."""
    model = Fleet.read([str(DATA / "junit-node-a.xml"), str(DATA / "junit-node-b.xml")])
    html = report.render(model, "data")
    seen = read_page(html)
    assert seen.cells[("test_activation_memory[cuda-fp32]", "node-b")] == "failed"
    assert seen.cells[("test_all_reduce[ws2-cuda-fp32]", "node-b")] == "error"
    assert seen.cells[("test_all_reduce[ws2-cuda-fp32]", "node-a")] == "passed"
    assert [check.area for check in model.checks] == ["checkpointing", "amp", "collectives", "collectives"]
    assert seen.inventory["node-a"][:7] == [
        "node-a",
        "2 × NVIDIA H100 80GB HBM3",
        "570.86.15",
        "12.8 / 12.8",
        "2.13.0+cu128",
        "2.27.5",
        "91000",
    ]
    assert seen.inventory["node-b"][1:3] == ["1 × NVIDIA A100-SXM4-40GB", "550.54.15"]
    assert 'failed on setup with "RuntimeError: needs 2 GPUs for ws2, rank 1 has no device"' in html.replace(
        "&#34;", '"'
    )
    measures = {(s["data-node"], s["data-measure"], s["class"]) for s in seen.shapes}
    assert {
        ("node-a", "activation_ratio", "bar"),
        ("node-b", "activation_ratio", "bar"),
        ("node-a", "memory_ratio", "bar"),
        ("node-a", "out_rel_l2", "dot"),
        ("node-a", "busbw_GBps", "dot"),
    } <= measures
    assert ("node-b", "busbw_GBps", "dot") not in measures  # node-b recorded none
    assert 'id="chart-bounds-bf16"' in html and 'id="chart-bounds-fp32"' in html


def test_ranks_of_one_host_fold_into_its_column(tmp_path):
    base = (DATA / "junit-node-a.xml").read_text()
    (tmp_path / "junit-node-a-r0.xml").write_text(base)
    broken = base.replace(
        "<system-out>[gpuconform] host=node-a gpu=GPU-aaaa</system-out>",
        '<failure message="activation ratio 0.9 &gt; bound 0.5">trace</failure>',
    )
    (tmp_path / "junit-node-a-r1.xml").write_text(broken)
    model = Fleet.read([str(tmp_path / "junit-node-a-r0.xml"), str(tmp_path / "junit-node-a-r1.xml")])
    (node,) = model.nodes
    assert (node.label, node.rank_text()) == ("node-a", "2: r0–r1")
    check = model.by_key[("pytest_gpuconform.conformance.test_checkpointing", "test_activation_memory[cuda-fp32]")]
    assert node.outcome(check.index) == FAILED
    assert model.reason(node, check.index) == "rank 1: activation ratio 0.9 > bound 0.5"


def test_text_from_the_reports_is_escaped(tmp_path):
    hostile = tmp_path / "junit-x.xml"
    hostile.write_text(
        '<testsuite name="pytest" tests="1" failures="1" errors="0"><properties>'
        '<property name="gpuconform.host" value="&lt;img src=x&gt;"/></properties>'
        '<testcase classname="test_x" name="test_&lt;b&gt;[1]">'
        '<failure message="&lt;script&gt;alert(1)&lt;/script&gt;"/></testcase></testsuite>'
    )
    html = report.render(Fleet.read([str(hostile)]), "<title>")
    seen = read_page(html)
    assert "script" not in seen.tags and "img" not in seen.tags and seen.loads == []
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img src=x&gt;" in html


@pytest.mark.parametrize(
    "content, expected", [("", "is empty (0 bytes)"), ('<testsuites><testsuite name="x"', "not well-formed XML")]
)
def test_bad_input_is_named_exit_2_and_no_page(tmp_path, capsys, content, expected):
    bad = tmp_path / "junit-bad.xml"
    bad.write_text(content)
    page = tmp_path / "report.html"
    assert main(["report", str(DATA / "junit-node-a.xml"), str(bad), "-o", str(page)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpuconform report: error: {bad}: ") and expected in err
    assert not page.exists() and sorted(os.listdir(tmp_path)) == ["junit-bad.xml"]
