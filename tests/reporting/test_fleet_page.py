"""The page for a fleet, at 1,000 nodes and at one, read back from the DOM headless Chromium
built, with screenshots kept as test artefacts ($GPUCONFORM_ARTIFACTS).

The fleet is made once per module from one real run (tests/support/fleet.py) with known
faults: slow GPUs, ECC errors, wrong all_reduce elements, nodes without a driver, and
inventory outliers (older driver, other torch and NCCL, a node with 7 GPUs). The page must
put each where an operator looks first, with the right hosts, within the size and time the
fleet allows (<= 5 MB, <= 20 s of CPU to build, <= 3 s for Chromium to open it).
"""

from __future__ import annotations

import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pytest_gpuconform.reporting import html
from pytest_gpuconform.reporting.fleet import Fleet
from pytest_gpuconform.reporting.hostlist import compress
from support import DATA
from support.browser import chromium, count_colour, keep_artifact, open_seconds, png_pixels
from support.fleet import GPUS, make_fleet

BASE = DATA / "junit-real-cpu-node.xml"
NODES = 1000
MAX_PAGE_BYTES = 5_000_000
MAX_BUILD_CPU_S = 20.0
MAX_OPEN_S = 3.0
FAIL_RED = (198, 40, 40)  # #c62828, the verdict banner of a failed fleet
PASS_GREEN = (46, 125, 50)  # #2e7d32


class Dom(HTMLParser):
    """Elements with data-* attributes, by id or kind, as the tests look them up."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.rows: dict[str, list[dict[str, str]]] = {}  # table id -> its <tr data-*>
        self.details: list[dict[str, str]] = []
        self.tags: set[str] = set()
        self._table: str | None = None
        self._open: list[str | None] = []  # ids of the open span / ul / p / li elements
        self.text: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        if "id" in attrs:
            self.by_id[attrs["id"]] = attrs
            self.text.setdefault(attrs["id"], "")
        if tag in ("span", "ul", "p", "li"):
            self._open.append(attrs.get("id"))
        if tag == "table":
            self._table = attrs.get("id")
        if tag == "tr" and self._table and any(k.startswith("data-") for k in attrs):
            self.rows.setdefault(self._table, []).append(attrs)
        if tag == "details" and "data-node" in attrs:
            self.details.append(attrs)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        if tag in ("span", "ul", "p", "li") and self._open:
            self._open.pop()

    def handle_data(self, data):
        for name in self._open:
            if name:
                self.text[name] += data


def dom_of(text: str) -> Dom:
    dom = Dom()
    dom.feed(text)
    return dom


def first_screen_pixels(page: Path, tmp_path: Path, name: str, colour: tuple[int, int, int]) -> int:
    """Screenshot the first screen (kept as a test artefact); pixels of ``colour`` in its top 160 rows."""
    shot = tmp_path / name
    chromium(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars")
    keep_artifact(shot)
    _, _, rows = png_pixels(shot, max_rows=160)
    return count_colour(rows, colour, 160)


@pytest.fixture(scope="module")
def fleet_page(tmp_path_factory):
    """The 1,000-node fleet, its page and how long the page took to build (CPU seconds)."""
    directory = tmp_path_factory.mktemp("fleet")
    plan = make_fleet(BASE, directory / "reports", NODES)
    started = time.process_time()
    text = html.render(Fleet.read([str(p) for p in plan.paths]), "fleet of 1000")
    build = time.process_time() - started
    page = directory / "fleet.html"
    page.write_text(text, encoding="utf-8")
    return plan, page, build


def test_fleet_page_size_and_build_time(fleet_page):
    plan, page, build = fleet_page
    size = page.stat().st_size
    print(f"1,000-node page: {size / 1e6:.2f} MB, built in {build:.1f} s CPU")
    assert size <= MAX_PAGE_BYTES, f"page is {size / 1e6:.2f} MB, bound {MAX_PAGE_BYTES / 1e6} MB"
    assert build <= MAX_BUILD_CPU_S, f"built in {build:.1f} s of CPU, bound {MAX_BUILD_CPU_S} s"


def test_fleet_page_in_chromium_verdict_causes_outliers_distributions(fleet_page, tmp_path):
    plan, page, _ = fleet_page
    dom = dom_of(chromium(page, tmp_path / "profile", "--dump-dom")[0].stdout)
    assert "script" not in dom.tags

    # First screen: the verdict, and nodes passed / failed / not verified.
    assert dom.by_id["verdict"]["data-verdict"] == "failed"
    counts = " ".join(dom.text["node-counts"].split())
    failed, cpu = len(plan.failed), len(plan.cpu_nodes)
    assert counts == f"1000 node(s): {NODES - failed - cpu} passed, {failed} failed, {cpu} not verified"
    verified = " ".join(dom.text["verified"].split())
    assert f"PASS: {GPUS} × H100 80GB HBM3 verified: " in verified
    assert f"PASS: {GPUS - 1} × H100 80GB HBM3 verified" in verified and plan.seven_gpus[0] in verified
    assert "PASSED AS A CPU NODE: CPU node: GPU checks not run (no NVIDIA driver)" in verified

    # Failures grouped by root cause, each with exactly the hosts that share it.
    causes = {row["data-cause"]: row for row in dom.rows["causes"]}
    expected = {
        "bf16 GEMM": sorted(plan.slow_gpu),
        "volatile uncorrectable ECC": plan.ecc,
        "elements wrong": plan.wrong_elements,
    }
    assert len(causes) == len(expected), list(causes)
    for words, hosts in expected.items():
        (cause,) = [c for c in causes if words in c]
        assert causes[cause]["data-hosts"] == str(len(hosts)) and causes[cause]["data-results"] == str(len(hosts))
    by_check = {row["data-check"]: row["data-hosts"] for row in dom.rows["failing-checks"]}
    assert by_check["test_gemm_throughput[bf16]"] == str(len(plan.slow_gpu))

    # Inventory outliers: every field where some nodes differ, with how many.
    outliers = {(row["data-field"], row["data-value"]): int(row["data-hosts"]) for row in dom.rows["outliers"]}
    assert outliers[("driver", "550.54.15")] == len(plan.old_driver)
    assert outliers[("torch", "2.12.1+cu128")] == len(plan.other_torch)
    assert outliers[("nccl", "2.26.2")] == len(plan.other_nccl)
    assert outliers[("gpu_count", str(GPUS - 1))] == 1
    assert outliers[("nvml", "absent")] == cpu

    # Distributions: the slow GPUs stand out below the floor of the pooled GEMM numbers.
    rows = {row["data-measure"]: row for row in dom.rows["distributions"]}
    gemm = rows["gpu*_bf16_tflops"]
    assert gemm["data-past"] == str(len(plan.slow_gpu)) and int(gemm["data-slow"]) >= len(plan.slow_gpu)
    assert "all_reduce_busbw_gbps" in rows

    # Area x node view and a drill-down for every node.
    assert len(dom.rows["areas"]) == NODES and dom.rows["areas"][0]["data-verdict"] == "failed"
    verdicts = {d["data-node"]: d["data-verdict"] for d in dom.details}
    assert len(verdicts) == NODES
    assert {h for h, v in verdicts.items() if v == "failed"} == plan.failed
    assert {h for h, v in verdicts.items() if v == "cpu"} == set(plan.cpu_nodes)


def test_fleet_page_opens_fast_and_its_first_screen_is_the_verdict(fleet_page, tmp_path):
    plan, page, _ = fleet_page
    took = open_seconds(page, tmp_path / "profile")
    print(f"Chromium opens the 1,000-node page in {took:.2f} s (beyond its own start-up)")
    assert took <= MAX_OPEN_S
    assert first_screen_pixels(page, tmp_path, "fleet-1000-nodes.png", FAIL_RED) > 1000, "no red FAIL banner on top"


def test_hosts_sharing_a_cause_are_a_slurm_hostlist(fleet_page):
    plan, page, _ = fleet_page
    assert compress(plan.ecc) in page.read_text(encoding="utf-8")
    assert compress(["gpu-0001", "gpu-0002", "gpu-0003", "gpu-0010", "gpu-1000"]) == "gpu-[0001-0003,0010,1000]"


def test_one_node_page_in_chromium(tmp_path):
    plan = make_fleet(BASE, tmp_path / "one", 1)
    page = tmp_path / "one-node.html"
    html.run([str(plan.paths[0])], str(page), "one node")
    dom = dom_of(chromium(page, tmp_path / "profile", "--dump-dom")[0].stdout)
    assert dom.by_id["verdict"]["data-verdict"] == "passed"
    assert " ".join(dom.text["node-counts"].split()) == "1 node(s): 1 passed, 0 failed, 0 not verified"
    assert f"PASS: {GPUS} × H100 80GB HBM3 verified: " in dom.text["verified"]
    assert "matrix" in dom.by_id and "inventory" in dom.by_id  # a small fleet keeps the full matrix
    (drill,) = dom.details
    assert "open" in drill and drill["data-verdict"] == "passed"
    assert first_screen_pixels(page, tmp_path, "fleet-1-node.png", PASS_GREEN) > 1000, "no green PASS banner on top"


def test_cpu_node_never_gets_a_bare_pass(tmp_path):
    """The real CPU-node report: no GPU, nothing failed: 'passed as a CPU node', not PASS."""
    page = tmp_path / "cpu.html"
    html.run([str(BASE)], str(page), "cpu")
    dom = dom_of(page.read_text(encoding="utf-8"))
    assert dom.by_id["verdict"]["data-verdict"] == "not-verified"
    assert "PASSED AS A CPU NODE: CPU node: GPU checks not run (no NVIDIA driver)" in dom.text["verified"]
    assert ">PASS<" not in page.read_text(encoding="utf-8")
