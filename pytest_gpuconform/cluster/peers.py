"""Which ranks of the world are still there: a liveness beacon per rank, probed directly.

When a collective breaks or a wait overruns, "a peer is gone" is not enough for an
operator: the report must say which host and rank. Collectives cannot say it (a gloo error
names at most an address, a hang names nothing) and the rendezvous store cannot either (it
lives on one host, which may be the lost one). So every rank listens on a port of its own
(its beacon) and answers each connection with a token naming its run and rank; the table of
every rank's host, rank, address and port is exchanged once at start. Probing is direct,
concurrent and bounded, and only done when something went wrong, so a healthy run pays one
thread and one socket per rank.

A peer whose beacon answers with the right token is alive (its process runs: the beacon
is a Python thread, and a rank blocked in a collective has released the GIL). Anything
else is lost, with the reason: refused (the host is up, the process is gone), no answer in
time (the host is down or cut off), unreachable, or a stranger's answer.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

PROBE_SECONDS = 2.0  # far above any healthy cluster's connect time, far below a deadline


@dataclass(frozen=True)
class Peer:
    host: str
    rank: int
    address: str
    port: int
    token: str

    @property
    def where(self) -> str:
        return f"host {self.host} rank {self.rank}"


def local_address(towards: str, port: int) -> str:
    """The address this host uses to reach ``towards`` (the rendezvous host): the one its
    peers reach it at. No packet is sent (a UDP socket's connect only picks the route)."""
    family, _, _, _, target = socket.getaddrinfo(towards, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(target)
        return probe.getsockname()[0]


class Beacon:
    """A daemon thread answering every connection with this rank's token."""

    def __init__(self, address: str, token: str) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.token = token
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((address, 0))
        self._listener.listen(64)
        self.address = address
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="gpuconform-beacon", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        answer = (self.token + "\n").encode()
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                connection.sendall(answer)
            except OSError:
                pass
            finally:
                connection.close()

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()


def probe_one(peer: Peer, seconds: float = PROBE_SECONDS) -> str | None:
    """None when ``peer`` answers with its token; else why it counts as lost."""
    where = f"{peer.address}:{peer.port}"
    try:
        with socket.create_connection((peer.address, peer.port), timeout=seconds) as sock:
            received = b""
            while not received.endswith(b"\n"):
                chunk = sock.recv(256)
                if not chunk:
                    break
                received += chunk
    except ConnectionRefusedError:
        return f"nothing listens on its liveness port {where} any more (connection refused): its process is gone"
    except TimeoutError:
        return f"no answer from its liveness port {where} within {seconds:g} s: host down or network partitioned"
    except OSError as error:
        return f"its liveness port {where} is unreachable ({error.strerror or error}): host down or network partitioned"
    if received.decode(errors="replace").strip() != peer.token:
        return f"another process answers on its liveness port {where}: the rank's process is gone"
    return None


def probe(peers: Iterable[Peer], seconds: float = PROBE_SECONDS) -> dict[int, str]:
    """{rank: reason} for every lost peer, probing all of them at once (bounded by ``seconds``)."""
    peers = list(peers)
    if not peers:
        return {}
    with ThreadPoolExecutor(max_workers=min(64, len(peers)), thread_name_prefix="gpuconform-probe") as pool:
        answers = list(pool.map(lambda p: probe_one(p, seconds), peers))
    return {peer.rank: reason for peer, reason in zip(peers, answers, strict=True) if reason is not None}


def describe(lost: dict[int, str], table: dict[int, Peer]) -> str:
    """'host b rank 1 lost: <reason>; host c rank 2 lost: <reason>'."""
    return "; ".join(f"{table[rank].where} lost: {reason}" for rank, reason in sorted(lost.items()))
