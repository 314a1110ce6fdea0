"""The namespace-hosts fixture itself: what a host is, and that nothing outlives it."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from support import netns_hosts
from support.netns_hosts import NETNS_DIR, STATE_DIR, Hosts


def test_each_host_has_its_own_name_address_and_loopback_and_shares_the_files(make_hosts, tmp_path):
    hosts = make_hosts(["alpha", "beta"])
    probe = (
        "import socket, sys; print(socket.gethostname(), socket.gethostbyname('beta'));"
        "s = socket.create_server(('127.0.0.1', 0)); print('loopback up');"
        "open(sys.argv[1], 'w').write(socket.gethostname())"
    )
    for host in hosts:
        done = host.run(["python3", "-c", probe, str(tmp_path / host.name)], check=True)
        assert done.stdout.split() == [host.name, hosts[1].address, "loopback", "up"], done
        assert (tmp_path / host.name).read_text() == host.name  # the shared filesystem
        addresses = host.run(["ip", "-4", "-br", "addr", "show", "dev", "eth0"]).stdout
        assert f"{host.address}/24" in addresses
    assert hosts[0].address != hosts[1].address
    assert not [n for n in netns_hosts._used_networks() if n.prefixlen and n.overlaps(hosts.subnet)]
    # The machine's own network is untouched: the bridge and the veths live in namespaces.
    root_links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout
    assert "br0" not in root_links.split() and hosts.token not in root_links


@pytest.mark.usefixtures("netns_ready")
def test_close_kills_everything_inside_and_removes_what_it_made():
    hosts = Hosts(["solo"])
    sleeper = hosts[0].popen(["sleep", "600"])
    orphan = hosts[0].run(["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 & echo $!"], check=True).stdout.strip()
    names = [hosts[0].netns, hosts.switch]
    hosts.close()
    assert sleeper.poll() is not None
    assert not _alive(int(orphan)), "a process that left its parent still died with its host"
    assert not [n for n in names if (NETNS_DIR / n).exists()]
    assert not list(STATE_DIR.glob(f"{hosts.token}*"))


@pytest.mark.usefixtures("netns_ready")
def test_stale_hosts_of_a_dead_run_are_removed_and_a_live_run_is_left_alone():
    # A run that died: its owner token names a process that no longer exists.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns_hosts.PREFIX}{dead.pid}x1-0-h0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    mine = Hosts(["alive"])
    try:
        removed = netns_hosts.remove_stale()
        assert stale in removed and not (NETNS_DIR / stale).exists()
        assert (NETNS_DIR / mine[0].netns).exists(), "hosts of a running owner must stay"
    finally:
        mine.close()
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


def _alive(pid: int) -> bool:
    end = time.monotonic() + 2
    while time.monotonic() < end:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state == "Z":
            return False
        time.sleep(0.05)
    return True


def test_without_namespaces_the_tests_skip_saying_why_and_fail_where_required(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv(netns_hosts.REQUIRE_NETNS, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"network namespaces need root .*running as uid 1000"):
        netns_hosts.require_netns()
    monkeypatch.setenv(netns_hosts.REQUIRE_NETNS, "1")
    with pytest.raises(pytest.fail.Exception, match="GPUCONFORM_REQUIRE_NETNS=1 says they must run here"):
        netns_hosts.require_netns()
