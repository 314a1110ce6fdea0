"""The parts cluster/faults.py is built from, one by one: cutting connections, the liveness
beacon and its probe, the watchdog, and the merged file's account of missing ranks.
(The parts together, on namespace hosts: test_host_faults.py and test_cluster_mode.py.)"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from pytest_gpuconform.cluster import connections, fold, peers
from pytest_gpuconform.cluster.watchdog import Watchdog


@pytest.fixture
def connected_pair():
    """(listener, client, server side) TCP sockets on loopback, closed afterwards."""
    listener = socket.create_server(("127.0.0.1", 0))
    with connections.capture() as opened:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    yield listener, client, server, opened
    for sock in (listener, client, server):
        sock.close()


def _inode(sock: socket.socket) -> int:
    return next(i for i, fd in connections.socket_inodes().items() if fd == sock.fileno())


def test_capture_sees_only_the_sockets_opened_inside(connected_pair):
    listener, client, server, opened = connected_pair
    assert opened == {_inode(client), _inode(server)}
    assert _inode(listener) not in opened


def test_cut_wakes_a_thread_blocked_in_recv(connected_pair):
    _, client, server, _ = connected_pair
    received = []
    reader = threading.Thread(target=lambda: received.append(client.recv(10)))
    reader.start()
    time.sleep(0.1)
    assert reader.is_alive()
    done = connections.cut(only={_inode(client)})
    reader.join(timeout=5)
    assert not reader.is_alive() and received == [b""], "recv should have returned at once"
    assert len(done) == 1 and done[0].startswith("127.0.0.1:")
    server.sendall(b"x")  # the other direction of the server's socket is not cut


def test_cut_spares_kept_sockets_kept_ports_and_listeners(connected_pair):
    listener, client, server, _ = connected_pair
    port = listener.getsockname()[1]
    everything = {_inode(listener), _inode(client), _inode(server)}
    assert connections.cut(only=everything, keep={_inode(client)}, keep_ports={port}) == []
    assert connections.cut(only={_inode(listener)}) == [], "a listener is never shut down"
    client.sendall(b"still open")
    assert server.recv(20) == b"still open"


def test_beacon_answers_and_a_closed_one_is_refused():
    beacon = peers.Beacon("127.0.0.1", "gpuconform pid 1 host h rank 3")
    peer = peers.Peer("h", 3, "127.0.0.1", beacon.port, beacon.token)
    assert peers.probe([peer]) == {}
    beacon.close()
    reason = peers.probe([peer])[3]
    assert reason == (
        f"nothing listens on its liveness port 127.0.0.1:{beacon.port} any more (connection refused): "
        "its process is gone"
    )
    assert peers.describe({3: reason}, {3: peer}) == f"host h rank 3 lost: {reason}"


def test_probe_of_a_silent_or_foreign_listener():
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never answers
    stranger = peers.Beacon("127.0.0.1", "someone else")
    try:
        lost = peers.probe(
            [
                peers.Peer("a", 0, "127.0.0.1", silent.getsockname()[1], "token a"),
                peers.Peer("b", 1, "127.0.0.1", stranger.port, "token b"),
            ],
            seconds=0.3,
        )
    finally:
        silent.close()
        stranger.close()
    assert lost[0].endswith("within 0.3 s: host down or network partitioned"), lost
    assert (
        lost[1] == f"another process answers on its liveness port 127.0.0.1:{stranger.port}: the rank's process is gone"
    )


def test_local_address_is_the_route_towards_the_store():
    assert peers.local_address("127.0.0.1", 29500) == "127.0.0.1"


def test_watchdog_fires_once_can_be_disarmed_and_extended():
    dog = Watchdog()
    fired: list[float] = []
    start = time.monotonic()
    dog.arm(0.2, lambda: fired.append(time.monotonic() - start))
    time.sleep(0.5)
    assert len(fired) == 1 and 0.2 <= fired[0] < 0.45
    dog.arm(0.2, lambda: fired.append(-1.0))
    dog.disarm()
    time.sleep(0.35)
    assert len(fired) == 1, "a disarmed watch must not fire"
    calls: list[int] = []
    dog.arm(0.1, lambda: (calls.append(1), 0.1 if len(calls) < 3 else None)[1])
    time.sleep(0.6)
    assert len(calls) == 3, "an action asking for more time is called again, until it is done"
    dog.close()


def _rank_xml(name: str) -> str:
    return (
        '<testsuites><testsuite name="pytest" tests="1">'
        f'<testcase classname="t" name="{name}" time="0.1" /></testsuite></testsuites>'
    )


def test_merged_file_lists_a_missing_rank_as_an_error_with_the_reason():
    merged = fold.merge(
        [("alpha", 0, _rank_xml("t1")), ("beta", 1, "")],
        {1: "no answer from its liveness port 10.0.0.2:1 within 2 s: host down or network partitioned"},
    )
    error = merged.find(".//error")
    assert error is not None and merged.find(".//failure") is None, "a rank without a verdict is an error"
    assert error.get("message") == (
        "no report from host beta rank 1: no answer from its liveness port 10.0.0.2:1 within 2 s: "
        "host down or network partitioned"
    )
    assert fold.failed(merged) and merged.find("testsuite").get("errors") == "1"
    without_reason = fold.merge([("alpha", 0, _rank_xml("t1")), ("beta", 1, "")]).find(".//error")
    assert without_reason.get("message") == "no report from host beta rank 1: rank crashed or its report is missing"


def test_salvage_collects_the_survivors_reports_through_the_store(tmp_path, monkeypatch):
    """Rank 0 of a 4-rank world that lost rank 2: rank 1's report arrives through the store,
    rank 3 (alive when probed) sends nothing and is listed with that reason."""
    import types

    import torch.distributed as dist

    from pytest_gpuconform.cluster import faults
    from pytest_gpuconform.cluster.world import ClusterWorld

    monkeypatch.setattr(faults, "SALVAGE_SECONDS", 0.3)
    store = dist.HashStore()
    own = tmp_path / "junit-a-r0.xml"
    own.write_text(_rank_xml("t1"))
    world = ClusterWorld("torchrun", 0, 4, 0, "a")
    mode = types.SimpleNamespace(world=world, store=store, timeout=5.0, backend="gloo")
    salvager = faults.ClusterFaults(mode)  # type: ignore[arg-type]
    salvager.table = {r: peers.Peer("abcd"[r], r, "127.0.0.1", 1, f"t{r}") for r in range(4)}
    salvager.lost = {2: "its process is gone"}
    store.set(faults.SALVAGE_KEY.format(rank=1), _rank_xml("t1"))
    reports = salvager._salvage(str(own))
    assert [(h, r, bool(t)) for h, r, t in reports] == [
        ("a", 0, True),
        ("b", 1, True),
        ("c", 2, False),
        ("d", 3, False),
    ]
    assert salvager.lost == {2: "its process is gone", 3: "alive when the loss was found, but sent no report in 0.3 s"}
    error = fold.merge(reports, salvager.lost).find(".//error")
    assert error.get("message") == (
        "no report from host c rank 2: its process is gone; "
        "no report from host d rank 3: alive when the loss was found, but sent no report in 0.3 s"
    )


def test_annotate_puts_the_headline_first_and_keeps_what_the_test_raised():
    from pytest_gpuconform.cluster.faults import annotate

    report = pytest.TestReport("t.py::t", ("t.py", 0, "t"), {}, "failed", "timed out after 5 s; stack: ...", "call")
    annotate(report, "host b rank 1 lost: its process is gone", "details")
    assert str(report.longrepr).splitlines()[0] == "host b rank 1 lost: its process is gone"
    assert str(report.longrepr).endswith("the test raised: timed out after 5 s; stack: ...")
