"""Host faults in a cluster run across two namespace hosts (alpha = rank 0, beta = rank 1).

Each fault is injected while both ranks are inside the same test, each test has a hard
bound, and each records how long the surviving side took to fail (``record_property``).
Before cluster/faults.py, a host lost mid-test left the survivor crashing in its final
report exchange with no merged report, and a partition left both sides waiting for the
process group's timeout and then the control group's (5 minutes) with no report at all.

The hang faults (a Python hang, a C-level collective hang) are in test_cluster_mode.py,
run on these hosts too.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from support.tools import schema_errors as _schema_errors
from support.torchrun_hosts import start_agents

DEADLINE = 8.0  # --gpuconform-timeout of the faulted runs
SLACK = 6.0  # "the deadline plus a few seconds": probe (2 s) and the report exchange fit in it

IN_FLIGHT = """
import os, time
from pathlib import Path
import pytest, torch
import torch.distributed as dist

@pytest.mark.world_size(2)
def test_a_before_the_fault(rank):
    t = torch.full((4,), float(rank + 1))
    dist.all_reduce(t)
    assert torch.equal(t, torch.full((4,), 3.0))

@pytest.mark.world_size(2)
def test_b_in_flight(rank):
    Path(f"in-flight-{rank}").write_text(str(os.getpid()))
    while True:  # collectives until the fault ends this
        dist.all_reduce(torch.ones(1024))

@pytest.mark.world_size(2)
def test_c_after_the_fault(rank):
    dist.all_reduce(torch.ones(1))
"""


def _cases(path: Path) -> dict[str, ET.Element]:
    return {c.get("name"): c for c in ET.parse(path).getroot().iter("testcase")}


def _message(case: ET.Element) -> str:
    failure = case.find("failure")
    assert failure is not None, ET.tostring(case, encoding="unicode")[:2000]
    return failure.get("message") or ""


def _process_alive(pid: int) -> bool:
    """Running (a rank is not our child: its torchrun reaps it, so a zombie counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _run_until_in_flight(tmp_path: Path, hosts) -> tuple:
    (tmp_path / "test_in_flight.py").write_text(IN_FLIGHT)
    args = ["test_in_flight.py", "-k", "cpu", "--gpuconform-timeout", f"{DEADLINE:g}"]
    agents = start_agents(list(hosts), tmp_path, [*args, "--junitxml", "reports/junit-{host}-r{rank}.xml"])
    markers = [tmp_path / "in-flight-0", tmp_path / "in-flight-1"]
    end = time.monotonic() + 90
    while not all(m.exists() and m.read_text() for m in markers):
        assert time.monotonic() < end and all(a.returncode is None for a in agents), agents.outputs()
        agents.wait(0.05)
    started = time.monotonic()  # within 50 ms of the test body's start on the later rank
    time.sleep(0.5)  # both ranks are now looping in all_reduce
    pids = [int(m.read_text()) for m in markers]
    return agents, pids, started


@pytest.mark.parametrize("lost", [1, 0], ids=["beta-rank1", "alpha-rank0-and-rendezvous"])
def test_host_lost_mid_test(tmp_path, make_hosts, record_property, lost):
    """Every process on one host killed (the host died) while both ranks are in all_reduce:
    the survivor fails the in-flight test at once naming the lost host and rank, writes its
    JUnit and exits 1. Where rank 0 survives it also writes junit-cluster.xml, the lost
    rank's results as errors "no report from host H rank R"; where alpha (rank 0, and the
    rendezvous store with it) is lost, beta has nobody to send its report to and says so
    only in its own file."""
    hosts = make_hosts(["alpha", "beta"])
    survivor = 1 - lost
    dead, alive = hosts[lost].name, hosts[survivor].name
    agents, pids, _ = _run_until_in_flight(tmp_path, hosts)
    killed_at = time.monotonic()
    hosts[lost].kill_all()
    end = killed_at + DEADLINE + SLACK
    while _process_alive(pids[survivor]) and time.monotonic() < end:
        time.sleep(0.05)
    took = time.monotonic() - killed_at
    record_property("time_to_fail_s", round(took, 2))
    assert not _process_alive(pids[survivor]), f"{alive}'s pytest still running after {took:.1f} s\n{agents.outputs()}"
    agents.wait(10, only=[agents[survivor]])
    assert agents[survivor].returncode == 1, agents.outputs()  # torchrun passes its rank's exit code on

    reports = tmp_path / "reports"
    own_file = reports / f"junit-{alive}-r{survivor}.xml"
    assert _schema_errors(own_file) == ""
    own = _cases(own_file)
    assert set(own) == {"test_a_before_the_fault[ws2-cpu]", "test_b_in_flight[ws2-cpu]"}, "the run stops after the loss"
    message = _message(own["test_b_in_flight[ws2-cpu]"])
    assert message.startswith(f"host {dead} rank {lost} lost: nothing listens on its liveness port 10.203."), message
    assert f"(connection refused): its process is gone (seen from host {alive} rank {survivor} during" in message
    print(f"host {dead} lost: {alive}'s pytest exited {took:.2f} s after the kill: {message}")

    merged_file = reports / "junit-cluster.xml"
    if lost == 0:
        assert not merged_file.exists(), "only rank 0 writes the merged file"
        return
    assert _schema_errors(merged_file) == ""
    merged = _cases(merged_file)
    before = merged["test_a_before_the_fault[ws2-cpu]"].find("error")
    assert before is not None and before.get("message").startswith("no report from host beta rank 1: ")
    in_flight = _message(merged["test_b_in_flight[ws2-cpu]"])
    assert in_flight.startswith("failure on host alpha rank 0: host beta rank 1 lost: "), in_flight
    assert "; no report from host beta rank 1: " in in_flight


def test_network_partition_mid_collective(tmp_path, make_hosts, record_property):
    """beta's link set down (no FIN, no RST) while both ranks are inside all_reduce: each
    side's collective is cut at the deadline (it would otherwise wait for the group's own
    timeout, deadline + 30 s), the probe names the other side as unreachable, each writes
    its JUnit and its pytest exits 1; alpha (rank 0) also writes junit-cluster.xml."""
    hosts = make_hosts(["alpha", "beta"])
    agents, pids, started = _run_until_in_flight(tmp_path, hosts)
    cut_at = time.monotonic()
    hosts[1].link_down()
    agents.wait(DEADLINE + SLACK, only=[agents[0]])
    alpha_took = (agents[0].ended or time.monotonic()) - cut_at
    end = time.monotonic() + 10
    while _process_alive(pids[1]) and time.monotonic() < end:
        time.sleep(0.05)
    beta_took = time.monotonic() - cut_at
    alpha_in_test = (agents[0].ended or time.monotonic()) - started
    record_property("time_to_fail_s", round(alpha_took, 2))
    record_property("test_start_to_exit_s", round(alpha_in_test, 2))
    record_property("partitioned_side_exit_s", round(beta_took, 2))
    assert agents[0].returncode == 1, f"alpha after {alpha_took:.1f} s\n{agents.outputs()}"
    assert not _process_alive(pids[1]), f"beta's pytest still running {beta_took:.1f} s after the cut"
    assert alpha_in_test < DEADLINE + SLACK, f"the in-flight test ran {alpha_in_test:.1f} s on alpha"

    reports = tmp_path / "reports"
    files = [reports / "junit-alpha-r0.xml", reports / "junit-beta-r1.xml", reports / "junit-cluster.xml"]
    assert _schema_errors(*files) == ""
    alpha = _message(_cases(files[0])["test_b_in_flight[ws2-cpu]"])
    # No answer within the probe's 2 s, or "No route to host" once ARP gave up: both say so.
    assert alpha.startswith("host beta rank 1 lost: "), alpha
    assert "host down or network partitioned (seen from host alpha rank 0 during this test)" in alpha
    beta = _message(_cases(files[1])["test_b_in_flight[ws2-cpu]"])
    assert beta.startswith("host alpha rank 0 lost: "), beta
    assert "host down or network partitioned (seen from host beta rank 1 during this test)" in beta
    in_flight = _cases(files[0])["test_b_in_flight[ws2-cpu]"].find("failure").text or ""
    assert f"timed out after {DEADLINE:g} s on host alpha rank 0, blocked inside a C-level call" in in_flight
    merged = _cases(files[2])
    before = merged["test_a_before_the_fault[ws2-cpu]"].find("error")
    assert before is not None and before.get("message").startswith("no report from host beta rank 1: ")
    if agents[1].returncode is None:
        # beta's torchrun agent itself waits on its rendezvous store across the cut link:
        # torch elastic's own timeouts, not the plugin's; the hosts' clean-up ends it.
        print("beta's torchrun agent is still waiting for its rendezvous store (expected)")
    print(
        f"partition: alpha exited {alpha_took:.2f} s after the cut ({alpha_in_test:.2f} s after the test began), "
        f"beta's pytest {beta_took:.2f} s after the cut: {alpha}"
    )


SLOW_SELECTION = ["-k", "ws2-cpu-fp32-sum"]  # the shipped all_reduce check that records bus bandwidth


def _bandwidth_run(tmp_path: Path, hosts, name: str) -> tuple[float, dict[str, str]]:
    run_dir = tmp_path / name
    run_dir.mkdir()
    agents = start_agents(list(hosts), run_dir, [*SLOW_SELECTION, "--junitxml", "reports/junit-{host}-r{rank}.xml"])
    agents.wait(120)
    assert [a.returncode for a in agents] == [0, 0], agents.outputs()
    (case,) = _cases(run_dir / "reports" / "junit-cluster.xml").values()
    assert case.find("failure") is None and case.find("skipped") is None
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    return max(a.seconds for a in agents), props


def test_slow_link_passes_slower_with_lower_bus_bandwidth(tmp_path, make_hosts, record_property):
    """beta's link limited to 100 Mbit/s each way (tc tbf on both ends of its veth): the
    shipped all_reduce check still passes, exactly, only slower, and the bus bandwidth it
    records falls to the link's rate. At 2 ranks busbw = S / t (nccl-tests' factor
    2(n-1)/n = 1), and each rank must send S bytes over the link (S/2 reduce-scatter + S/2
    all-gather), so t >= S / rate: busbw <= rate, and near it when the link is the limit."""
    rate_mbit = 100.0
    link_gbps = rate_mbit * 1e6 / 8 / 1e9  # GB/s, as busbw_GBps
    hosts = make_hosts(["alpha", "beta"])
    fast_seconds, fast = _bandwidth_run(tmp_path, hosts, "fast")
    hosts[1].limit_rate(rate_mbit)
    slow_seconds, slow = _bandwidth_run(tmp_path, hosts, "slow")
    fast_bw, slow_bw = float(fast["busbw_GBps"]), float(slow["busbw_GBps"])
    for name, value in (("fast", fast_bw), ("slow", slow_bw)):
        record_property(f"busbw_GBps_{name}", value)
    record_property("link_GBps", link_gbps)
    record_property("run_seconds_fast", round(fast_seconds, 1))
    record_property("run_seconds_slow", round(slow_seconds, 1))
    summary = f"busbw {fast_bw:.4f} -> {slow_bw:.4f} GB/s (link {link_gbps:.4f}), run {fast_seconds:.1f} -> {slow_seconds:.1f} s"
    # The bucket's 64 kB burst lets a little more through than the rate: 1.1 covers it.
    assert slow_bw <= link_gbps * 1.1, summary
    assert slow_bw >= link_gbps * 0.3, summary  # the link limits it, not something else
    assert fast_bw > 2 * slow_bw, summary
    assert slow_seconds > fast_seconds, summary
    print(f"slow link: {summary}")
