"""Cluster mode: two torchrun agents on loopback form a 2-node world; rank 0 merges."""

import os
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = """
import pytest, torch
import torch.distributed as dist

@pytest.mark.world_size(2)
def test_world_all_reduce(rank, world_size, device, record):
    t = torch.full((3,), float(rank + 1))
    dist.all_reduce(t)
    record("sum", float(t[0]))
    assert torch.equal(t, torch.full((3,), 3.0))

@pytest.mark.world_size(4)
def test_bigger_than_world(rank):
    raise AssertionError("must be skipped")

def test_every_rank(rank):
    assert rank in (0, 1)

@pytest.mark.world_size(2)
def test_fails_on_one_rank(rank):
    assert rank == 0, f"rank {rank} disagrees"
"""

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_agents_produce_one_merged_report(tmp_path):
    (tmp_path / "test_world.py").write_text(TESTS)
    port = _free_port()
    agents, logs = [], []
    for node in (0, 1):
        env = dict(os.environ, GPUCONFORM_HOST=f"node{node}")
        logs.append(open(tmp_path / f"agent{node}.log", "w+"))
        agents.append(
            subprocess.Popen(
                [
                    TORCHRUN,
                    "--nnodes",
                    "2",
                    "--nproc-per-node",
                    "1",
                    "--node-rank",
                    str(node),
                    "--rdzv-backend",
                    "c10d",
                    "--rdzv-endpoint",
                    f"127.0.0.1:{port}",
                    "--rdzv-id",
                    "gpuconform-test",
                    "-m",
                    "pytest",
                    "--gpuconform",
                    "-p",
                    "no:cacheprovider",
                    "test_world.py",
                    "--junitxml",
                    "reports/junit-{host}-r{rank}.xml",
                ],
                cwd=tmp_path,
                env=env,
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for agent in agents:  # output goes to files: two agents writing to pipes read in turn could block
        agent.wait(timeout=240)
    outputs = [(log.seek(0), log.read())[1] for log in logs]
    codes = [agent.returncode for agent in agents]
    assert codes == [1, 1], "\n".join(o[-2000:] for o in outputs)  # one test fails on one rank
    per_rank = sorted(p.name for p in (tmp_path / "reports").glob("junit-node*.xml"))
    assert len(per_rank) == 2 and {"r0", "r1"} == {p.split("-")[-1][:2] for p in per_rank}, per_rank

    root = ET.parse(tmp_path / "reports" / "junit-cluster.xml").getroot()
    suite = root.find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert (suite.get("tests"), suite.get("failures")) == (str(len(cases)), "1")
    ranks_prop = {p.get("name"): p.get("value") for p in suite.find("properties")}["gpuconform.cluster_ranks"]
    assert sorted(ranks_prop.split()) in (["node0/r0", "node1/r1"], ["node0/r1", "node1/r0"])

    passed = cases["test_world_all_reduce[ws2-cpu]"]
    props = {p.get("name"): p.get("value") for p in passed.find("properties")}
    assert props["sum"] == "3.0" and sorted(props["ranks"].split()) in (
        ["node0/r0:passed", "node1/r1:passed"],
        ["node0/r1:passed", "node1/r0:passed"],
    )
    assert (
        cases["test_bigger_than_world[ws4-cpu]"]
        .find("skipped")
        .get("message")
        .startswith("needs world size 4; torchrun launched 2 ranks")
    )
    failure = cases["test_fails_on_one_rank[ws2-cpu]"].find("failure")
    host_of_rank1 = next(h.split("/")[0] for h in ranks_prop.split() if h.endswith("/r1"))
    assert failure.get("message").startswith(
        f"failure on host {host_of_rank1} rank 1: AssertionError: rank 1 disagrees"
    )


def test_cluster_mode_with_xdist_is_a_usage_error(pytester, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = pytester.runpytest_subprocess("--gpuconform", "-p", "no:cacheprovider", "-n", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*-n 2 cannot be combined with cluster mode (torchrun started 2 ranks)*"])


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"TORCHELASTIC_RUN_ID": "j", "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, ("torchrun", 3, 8)),
        (
            {
                "SLURM_PROCID": "5",
                "SLURM_NTASKS": "16",
                "SLURM_NNODES": "2",
                "SLURM_LOCALID": "5",
                "SLURM_STEP_ID": "0",
            },
            ("srun", 5, 16),
        ),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_NNODES": "2"}, None),  # the batch script, not a step
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NNODES": "2"}, None),  # one task per node: per-node sweep
        ({}, None),
    ],
)
def test_cluster_detection(environ, expected):
    from pytest_gpuconform.cluster.world import detect

    world = detect(dict(environ, GPUCONFORM_HOST="h"))
    assert (None if world is None else (world.launcher, world.rank, world.world_size)) == expected


def _rank_xml(name: str, result: str, multi_rank: bool = True) -> str:
    props = '<properties><property name="world_size" value="2" /></properties>' if multi_rank else ""
    return (
        f'<testsuites><testsuite name="pytest" tests="1"><testcase classname="t" name="{name}" time="0.1">'
        f"{props}{result}</testcase></testsuite></testsuites>"
    )


def test_merge_fails_a_multi_rank_test_whose_ranks_disagree_about_skipping():
    from pytest_gpuconform.cluster.fold import failed, merge

    skip = '<skipped message="no bf16 here" />'
    merged = merge([("a", 0, _rank_xml("t1", skip)), ("b", 1, _rank_xml("t1", ""))])
    assert failed(merged)
    assert "ranks disagree about skipping: a/r0:skipped, b/r1:passed" in merged.find(".//failure").get("message")
    per_node = merge([("a", 0, _rank_xml("t2", skip, False)), ("b", 1, _rank_xml("t2", "", False))])
    assert not failed(per_node), "a per-node check may skip on one node and pass on another"
    both = merge([("a", 0, _rank_xml("t3", skip)), ("b", 1, _rank_xml("t3", skip))])
    assert not failed(both) and both.find(".//skipped").get("message") == "no bf16 here"


def test_srun_without_rendezvous_address_is_a_clear_usage_error(pytester, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NNODES", "1")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    result = pytester.runpytest_subprocess("--gpuconform", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*cluster mode under srun: MASTER_ADDR and MASTER_PORT not set*"])


HANGS = """
import time
import pytest, torch
import torch.distributed as dist

@pytest.mark.world_size(2, timeout=3)
def test_a_python_hang(rank):
    if rank == 0:
        time.sleep(3600)

@pytest.mark.world_size(2)
def test_b_rank0_fails_early(rank):
    if rank == 0:
        raise RuntimeError("rank 0 gave up before its all_reduce")
    dist.all_reduce(torch.ones(1))

@pytest.mark.world_size(2)
def test_c_next_test_still_pairs_correctly(rank):
    t = torch.full((1,), 10.0 * (rank + 1))
    dist.all_reduce(t)
    assert t.item() == 30.0, f"got {t.item()}: collectives of an earlier test leaked into this one"

@pytest.mark.world_size(2)
def test_d_ported_body(rank):
    import os
    os.environ["CLUSTER_LEAK"] = "1"
    dist.init_process_group("gloo")  # the world this rank is already in: a no-op
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2.0
    dist.destroy_process_group()

@pytest.mark.world_size(2)
def test_e_after_destroy(rank):
    import os
    assert "CLUSTER_LEAK" not in os.environ
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2.0
"""


def test_cluster_hang_and_early_failure_stay_in_their_own_test(tmp_path):
    (tmp_path / "test_hangs.py").write_text(HANGS)
    port = _free_port()
    log = open(tmp_path / "torchrun.log", "w+")
    run = subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "pytest",
            "--gpuconform",
            "-p",
            "no:cacheprovider",
            "test_hangs.py",
            "-k",
            "cpu",
            "--gpuconform-timeout",
            "5",
            "--junitxml",
            "reports/junit-{host}-r{rank}.xml",
        ],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
        env=dict(os.environ, MASTER_PORT=str(port)),
    )
    log.seek(0)
    output = log.read()
    assert run.returncode != 0, output[-3000:]
    cases = {c.get("name"): c for c in ET.parse(tmp_path / "reports" / "junit-cluster.xml").getroot().iter("testcase")}
    hang = cases["test_a_python_hang[ws2-cpu]"].find("failure")
    assert hang is not None and "timed out after 3 s" in hang.get("message") and "rank 0" in hang.get("message")
    assert cases["test_b_rank0_fails_early[ws2-cpu]"].find("failure") is not None
    assert cases["test_c_next_test_still_pairs_correctly[ws2-cpu]"].find("failure") is None, output[-4000:]
    # the same rank-side isolation as the engine's: a ported body works, the group is rebuilt
    assert cases["test_d_ported_body[ws2-cpu]"].find("failure") is None, output[-4000:]
    assert cases["test_e_after_destroy[ws2-cpu]"].find("failure") is None, output[-4000:]
    rank_file = ET.parse(next((tmp_path / "reports").glob("junit-*-r0.xml"))).getroot()
    ported = next(c for c in rank_file.iter("testcase") if c.get("name") == "test_d_ported_body[ws2-cpu]")
    notes = {p.get("name"): p.get("value") for p in ported.iter("property")}
    assert "destroyed the default process group: rebuilt" in notes.get("gpuconform_isolation", ""), notes
