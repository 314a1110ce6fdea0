"""Several hosts on one machine: Linux network namespaces joined by a bridge.

Cluster mode has to be tried across hosts -- separate hostnames, separate network stacks,
a link that can go down or slow down, a host whose processes all die -- and CI has one
machine. Each host here is a network namespace with its own UTS namespace (hostname), its
own address on a private /24, loopback up and an ``/etc/hosts`` that names every host (so
torchrun's rendezvous, which passes hostnames around, resolves them as a cluster's DNS
would). The filesystem is shared, as on a cluster with a shared home, and so is /sys (with
its cgroup mounts).

The bridge lives in a namespace of its own (the "switch"), so nothing is added to the
machine's own network: no address, route or link of the root namespace is touched, and two
test runs at once cannot see each other's hosts. The /24 is still chosen among those the
machine does not use, so an address in a log is never ambiguous.

Everything made is named ``gpuconform-<owner pid>x<owner start time>-...``. ``Hosts.close``
(a pytest finalizer, and atexit for a run that ends without finalizers) kills every process
in the hosts' namespaces and removes namespaces, links, UTS bind mounts and hosts files
(under /run/gpuconform-netns);
``remove_stale`` removes what an earlier run left when it died (SIGKILL, power loss), and
only when its owner process is gone -- a concurrent run's hosts are left alone.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "gpuconform-"
NETNS_DIR = Path("/run/netns")
STATE_DIR = Path("/run/gpuconform-netns")  # per host: NAME.uts (its UTS namespace, bind-mounted) and NAME.hosts
SUBNETS = [f"10.203.{third}.0/24" for third in range(0, 250, 7)]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (with the pid, unique for the boot)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def owner_token(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}x{_start_ticks(pid)}"


def unavailable_reason() -> str | None:
    """Why namespace hosts cannot be made here (None when they can): tried, not guessed."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (Debian package iproute2)"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "util-linux unshare/nsenter not installed"
    if os.geteuid() != 0:
        return f"network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); running as uid {os.geteuid()}"
    probe = f"{PREFIX}{owner_token()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


REQUIRE_NETNS = "GPUCONFORM_REQUIRE_NETNS"  # set by .ci/run: CI runs as root, so these tests must run


def require_netns() -> None:
    """Skip (or, under GPUCONFORM_REQUIRE_NETNS=1, fail) where namespace hosts cannot be made."""
    import pytest

    reason = unavailable_reason()
    if reason is None:
        return
    message = f"namespace hosts unavailable: {reason}"
    if os.environ.get(REQUIRE_NETNS):
        pytest.fail(f"{message} ({REQUIRE_NETNS}=1 says they must run here)")
    pytest.skip(message)


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Networks of the machine's own addresses and routes (root namespace)."""
    used = []
    for entry in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = entry.get("dst", "")
        if dst and dst != "default":
            try:
                used.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
            except ValueError:
                pass
    for link in json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]"):
        for addr in link.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    return used


def free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    for candidate in map(ipaddress.IPv4Network, SUBNETS):
        if not any(candidate.overlaps(net) for net in used if net.prefixlen > 0):
            return candidate
    raise RuntimeError(f"every candidate /24 ({SUBNETS[0]} ... {SUBNETS[-1]}) is in use on this machine")


@dataclass
class Host:
    """One host: run commands in it, kill everything in it, cut or slow its link."""

    name: str  # its hostname
    netns: str
    address: str
    uts: Path
    hosts_file: Path
    switch: str  # the switch namespace
    port: str  # the bridge port (switch side of the host's veth)
    started: list[subprocess.Popen] = field(default_factory=list)

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv run inside this host: its network, its hostname, its /etc/hosts (bind-mounted
        in a mount namespace of its own). Not `ip netns exec`: that also mounts a fresh
        /sys, which hides /sys/fs/cgroup, and slurmd will not start without it."""
        mount_hosts = 'mount --bind "$0" /etc/hosts && exec "$@"'
        return [
            "nsenter",
            f"--net={NETNS_DIR / self.netns}",
            f"--uts={self.uts}",
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "slave",
            "--",
            "sh",
            "-c",
            mount_hosts,
            str(self.hosts_file),
            *argv,
        ]

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(self.command(argv), **kwargs)
        self.started.append(process)
        return process

    def run(self, argv: Sequence[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv), timeout=timeout, **kwargs)

    def pids(self) -> list[int]:
        listed = _ip("netns", "pids", self.netns, check=False).stdout.split()
        return [int(pid) for pid in listed if pid.isdigit()]

    def kill_all(self, timeout: float = 10) -> list[int]:
        """SIGKILL every process in this host (a host that died), until none is left."""
        return _kill_netns(self.netns, timeout)

    def link_down(self) -> None:
        """A network partition: the host's cable pulled, on the switch side (no RST, no FIN)."""
        _ip("-n", self.switch, "link", "set", self.port, "down")

    def link_up(self) -> None:
        _ip("-n", self.switch, "link", "set", self.port, "up")

    def limit_rate(self, mbit: float) -> None:
        """A slow link: a token bucket (tc tbf) on both ends of the host's veth, so each
        direction carries at most ``mbit`` megabits per second. (A delay would need netem,
        which kernels built without CONFIG_NET_SCH_NETEM lack: "Specified qdisc kind is
        unknown"; tbf is built into nearly every kernel.)"""
        for netns, dev in ((self.netns, "eth0"), (self.switch, self.port)):
            shape = ["tbf", "rate", f"{mbit:g}mbit", "burst", "64kb", "latency", "100ms"]
            done = subprocess.run(
                ["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", *shape],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if done.returncode != 0:
                raise RuntimeError(f"tc {' '.join(shape)} on {dev} failed: {done.stderr.strip()}")


class Hosts:
    """N hosts on one bridge. Use as a context manager, or call close()."""

    def __init__(self, names: Sequence[str]) -> None:
        self.token = f"{PREFIX}{owner_token()}-{next(_SERIAL)}"
        self.switch = f"{self.token}-sw"
        self.subnet = free_subnet()
        self.hosts: list[Host] = []
        self.closed = False
        _OPEN.append(self)
        try:
            self._make(list(names))
        except BaseException:
            self.close()
            raise

    def __iter__(self):
        return iter(self.hosts)

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __len__(self) -> int:
        return len(self.hosts)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make(self, names: list[str]) -> None:
        addresses = list(self.subnet.hosts())[9 : 9 + len(names)]  # .10, .11, ...
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        hosts_file = "127.0.0.1\tlocalhost\n" + "".join(f"{a}\t{n}\n" for a, n in zip(addresses, names, strict=True))
        for index, (name, address) in enumerate(zip(names, addresses, strict=True)):
            netns = f"{self.token}-h{index}"
            port = f"p{index}"
            uts = STATE_DIR / f"{netns}.uts"
            hosts = STATE_DIR / f"{netns}.hosts"
            _ip("netns", "add", netns)
            host = Host(name, netns, str(address), uts, hosts, self.switch, port)
            self.hosts.append(host)
            _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            hosts.write_text(hosts_file)
            uts.touch()
            subprocess.run(["unshare", f"--uts={uts}", "hostname", name], check=True, capture_output=True, timeout=30)
        self._wait_until_reachable()

    def _wait_until_reachable(self, timeout: float = 10) -> None:
        """A fresh veth can take a moment to pass packets; connect to a closed port until the
        peer answers (refused = reachable)."""
        probe = (
            "import socket,sys,time\n"
            "end=time.time()+float(sys.argv[2])\n"
            "while True:\n"
            "    s=socket.socket(); s.settimeout(0.5)\n"
            "    try: s.connect((sys.argv[1], 9)); break\n"
            "    except ConnectionRefusedError: break\n"
            "    except OSError:\n"
            "        if time.time()>end: raise\n"
            "        time.sleep(0.05)\n"
        )
        first = self.hosts[0]
        for other in self.hosts[1:]:
            first.run(["python3", "-c", probe, other.address, str(timeout)], timeout=timeout + 10, check=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for host in self.hosts:
            for process in host.started:
                if process.poll() is None:
                    process.kill()
        for host in self.hosts:
            _remove_host(host.netns)
        _kill_netns(self.switch)
        _ip("netns", "del", self.switch, check=False)
        for host in self.hosts:
            for process in host.started:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if self in _OPEN:
            _OPEN.remove(self)


def _kill_netns(netns: str, timeout: float = 10) -> list[int]:
    killed: list[int] = []
    end = time.monotonic() + timeout
    while True:
        listed = _ip("netns", "pids", netns, check=False).stdout.split()
        pids = [int(pid) for pid in listed if pid.isdigit() and int(pid) != os.getpid()]
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > end:
            raise RuntimeError(f"processes {pids} in namespace {netns} survive SIGKILL")
        time.sleep(0.05)


def _remove_host(netns: str) -> None:
    _kill_netns(netns)
    _ip("netns", "del", netns, check=False)
    uts = STATE_DIR / f"{netns}.uts"
    if uts.exists():
        subprocess.run(["umount", str(uts)], capture_output=True, timeout=30)
        uts.unlink(missing_ok=True)
    (STATE_DIR / f"{netns}.hosts").unlink(missing_ok=True)


def _owner_alive(name: str) -> bool:
    """Is the run that made ``gpuconform-<pid>x<ticks>-...`` still running?"""
    owner = name[len(PREFIX) :].split("-", 1)[0]
    pid, _, ticks = owner.partition("x")
    return pid.isdigit() and _start_ticks(int(pid)) == ticks


def remove_stale() -> list[str]:
    """Remove hosts of earlier runs whose owner process is gone; return their names."""
    names = set()
    if NETNS_DIR.is_dir():
        names |= {p.name for p in NETNS_DIR.iterdir() if p.name.startswith(PREFIX)}
    if STATE_DIR.is_dir():
        names |= {p.stem for p in STATE_DIR.glob(f"{PREFIX}*") if p.suffix in (".uts", ".hosts")}
    removed = []
    for name in sorted(names):
        if _owner_alive(name):
            continue
        _remove_host(name)
        removed.append(name)
    return removed


_OPEN: list[Hosts] = []
_SERIAL = itertools.count()


@atexit.register
def _close_all() -> None:
    for hosts in list(_OPEN):
        hosts.close()
