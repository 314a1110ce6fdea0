"""Cluster mode: two torchrun agents form a 2-node world; rank 0 merges.

Each torchrun test runs twice: on loopback (agents that play two hosts by name) and across
two namespace hosts (own hostnames, addresses and network stacks; conftest.py), where
``{host}`` comes from the real hostname and the rendezvous crosses a network.
"""

import socket
import xml.etree.ElementTree as ET

import pytest

from support.torchrun_hosts import start_agents, start_loopback_agents, start_standalone

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(params=["loopback", "netns"])
def two_hosts(request):
    """start(cwd, pytest args) -> Agents on two hosts; .names: the hosts' names."""
    if request.param == "loopback":
        names = ["node0", "node1"]

        def start(cwd, args):
            return start_loopback_agents(names, cwd, args, _free_port())

    else:
        hosts = request.getfixturevalue("make_hosts")(["alpha", "beta"])
        names = [h.name for h in hosts]

        def start(cwd, args):
            return start_agents(list(hosts), cwd, args)

    start.names = names
    return start


def test_two_torchrun_agents_produce_one_merged_report(tmp_path, two_hosts):
    (tmp_path / "test_world.py").write_text(TESTS)
    agents = two_hosts(tmp_path, ["test_world.py", "--junitxml", "reports/junit-{host}-r{rank}.xml"])
    agents.wait(240)
    codes = [agent.returncode for agent in agents]
    assert codes == [1, 1], agents.outputs()  # one test fails on one rank
    per_rank = sorted(p.name for p in (tmp_path / "reports").glob("junit-*-r*.xml"))
    hosts = sorted(two_hosts.names)
    assert len(per_rank) == 2 and {"r0", "r1"} == {p.split("-")[-1][:2] for p in per_rank}, per_rank
    assert sorted(p.split("-")[1] for p in per_rank) == hosts, per_rank  # {host}: each host's own name

    root = ET.parse(tmp_path / "reports" / "junit-cluster.xml").getroot()
    suite = root.find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert (suite.get("tests"), suite.get("failures")) == (str(len(cases)), "1")
    ranks_prop = {p.get("name"): p.get("value") for p in suite.find("properties")}["gpuconform.cluster_ranks"]
    a, b = hosts
    assert sorted(ranks_prop.split()) in ([f"{a}/r0", f"{b}/r1"], [f"{a}/r1", f"{b}/r0"])

    passed = cases["test_world_all_reduce[ws2-cpu]"]
    props = {p.get("name"): p.get("value") for p in passed.find("properties")}
    assert props["sum"] == "3.0" and sorted(props["ranks"].split()) in (
        [f"{a}/r0:passed", f"{b}/r1:passed"],
        [f"{a}/r1:passed", f"{b}/r0:passed"],
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


def test_merge_writes_errors_as_error_elements_and_a_failure_anywhere_wins():
    """An error on one rank (setup or teardown) is an <error> in the merged file, counted in
    ``errors``; a failure on any rank makes the case a <failure> listing every bad rank;
    a rank with a failed call and a teardown error has both in the message."""
    from pytest_gpuconform.cluster.fold import failed, merge

    error = '<error message="failed on setup with &quot;RuntimeError: no GPU&quot;">trace</error>'
    failure = '<failure message="AssertionError: rank 1 disagrees">trace</failure>'
    errored = merge([("a", 0, _rank_xml("t1", "")), ("b", 1, _rank_xml("t1", error))])
    suite = errored.find("testsuite")
    assert failed(errored) and (suite.get("errors"), suite.get("failures")) == ("1", "0")
    assert errored.find(".//failure") is None
    assert (
        errored.find(".//error").get("message") == 'error on host b rank 1: failed on setup with "RuntimeError: no GPU"'
    )
    both = merge([("a", 0, _rank_xml("t2", error)), ("b", 1, _rank_xml("t2", failure))])
    assert (both.find("testsuite").get("errors"), both.find("testsuite").get("failures")) == ("0", "1")
    assert both.find(".//error") is None
    assert both.find(".//failure").get("message") == (
        'error on host a rank 0: failed on setup with "RuntimeError: no GPU"; '
        "failure on host b rank 1: AssertionError: rank 1 disagrees"
    )
    twice = (
        '<testsuites><testsuite name="pytest" tests="2">'
        f'<testcase classname="t" name="t3" time="0.1">{failure}</testcase>'
        f'<testcase classname="t" name="t3" time="0.1">{error}</testcase></testsuite></testsuites>'
    )
    message = merge([("a", 0, _rank_xml("t3", "")), ("b", 1, twice)]).find(".//failure").get("message")
    assert message == (
        "failure on host b rank 1: AssertionError: rank 1 disagrees; "
        'error on host b rank 1: failed on setup with "RuntimeError: no GPU"'
    )


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


@pytest.fixture(params=["standalone", "netns"])
def hang_world(request):
    """start(cwd, pytest args) -> Agents: two ranks under one agent, or one on each of two hosts."""
    if request.param == "standalone":
        return lambda cwd, args: start_standalone(cwd, args, 2, _free_port())
    hosts = request.getfixturevalue("make_hosts")(["alpha", "beta"])
    return lambda cwd, args: start_agents(list(hosts), cwd, args)


def test_cluster_hang_and_early_failure_stay_in_their_own_test(tmp_path, hang_world, record_property):
    """A Python hang (rank 0 sleeps) is cut by SIGALRM at its 3 s deadline; a C-level hang
    (rank 1 blocked in all_reduce after rank 0 failed before its own) is cut by the
    watchdog at the 5 s deadline, not at the process group's timeout (35 s); the next test
    pairs its collectives correctly on rebuilt groups."""
    (tmp_path / "test_hangs.py").write_text(HANGS)
    args = ["test_hangs.py", "-k", "cpu", "--gpuconform-timeout", "5", "--junitxml", "reports/junit-{host}-r{rank}.xml"]
    agents = hang_world(tmp_path, args)
    agents.wait(120)
    output = agents.outputs()
    assert all(a.returncode not in (0, None) for a in agents), output
    root = ET.parse(tmp_path / "reports" / "junit-cluster.xml").getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    hang = cases["test_a_python_hang[ws2-cpu]"].find("failure")
    assert hang is not None and "timed out after 3 s" in hang.get("message") and "rank 0" in hang.get("message")
    blocked = cases["test_b_rank0_fails_early[ws2-cpu]"].find("failure")
    assert blocked is not None and "timed out after 5 s" in blocked.get("message"), blocked.get("message")
    assert "rank 1, blocked inside a C-level call" in blocked.get("message"), blocked.get("message")
    assert cases["test_c_next_test_still_pairs_correctly[ws2-cpu]"].find("failure") is None, output
    # Cut at the deadline, not later: the case's time is its slowest rank's.
    times = {name: float(case.get("time")) for name, case in cases.items()}
    record_property("python_hang_seconds", times["test_a_python_hang[ws2-cpu]"])
    record_property("c_level_hang_seconds", times["test_b_rank0_fails_early[ws2-cpu]"])
    assert 3.0 <= times["test_a_python_hang[ws2-cpu]"] < 3.0 + 2.0, times
    assert 5.0 <= times["test_b_rank0_fails_early[ws2-cpu]"] < 5.0 + 2.0, times
    # the same rank-side isolation as the engine's: a ported body works, the group is rebuilt
    assert cases["test_d_ported_body[ws2-cpu]"].find("failure") is None, output
    assert cases["test_e_after_destroy[ws2-cpu]"].find("failure") is None, output
    rank_file = ET.parse(next((tmp_path / "reports").glob("junit-*-r0.xml"))).getroot()
    ported = next(c for c in rank_file.iter("testcase") if c.get("name") == "test_d_ported_body[ws2-cpu]")
    notes = {p.get("name"): p.get("value") for p in ported.iter("property")}
    assert "destroyed the default process group: rebuilt" in notes.get("gpuconform_isolation", ""), notes
