"""Cut this process's process-group connections from another thread.

A gloo collective waits in C++ with the GIL released, so SIGALRM's Python handler cannot
run until it returns, and ``ProcessGroupGloo.abort()`` (torch 2.13) returns at once without
waking it: the collective ends only at the group's own timeout. Shutting its TCP
connections down does wake it: gloo's I/O loop sees the connection end and the waiting
collective raises "Connection closed by peer" at once; the peers' operations on those
pairs end the same way. The group is unusable afterwards and is rebuilt, as after any
failed multi-rank test.

What is never cut: listening sockets (an error there makes gloo's accept loop abort the
whole process), the connections a ``capture()`` recorded as protected (the control group,
which must carry the reports afterwards), and the rendezvous store's connections (found by
its port: the store is shared with the agent and the next process group).

Linux only (``/proc/self/fd``); elsewhere ``cut`` finds nothing and says so.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager


def socket_inodes() -> dict[int, int]:
    """{socket inode: fd} of this process's open sockets."""
    found: dict[int, int] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found[int(target[len("socket:[") : -1])] = int(name)
    return found


@contextmanager
def capture() -> Iterator[set[int]]:
    """The inodes of the sockets opened inside the block (filled in when it ends)."""
    before = set(socket_inodes())
    opened: set[int] = set()
    try:
        yield opened
    finally:
        opened.update(set(socket_inodes()) - before)


def _endpoint(address) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


def cut(
    *,
    keep: AbstractSet[int] = frozenset(),
    keep_ports: AbstractSet[int] = frozenset(),
    only: AbstractSet[int] | None = None,
) -> list[str]:
    """Shut down connected TCP sockets of this process: those in ``only`` when given, else
    all but ``keep`` and those with a local or remote port in ``keep_ports``. Returns
    "local -> remote" for each socket cut."""
    done = []
    for inode, fd in socket_inodes().items():
        if inode in keep or (only is not None and inode not in only):
            continue
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # closed meanwhile
        try:
            if os.fstat(sock.fileno()).st_ino != inode:
                continue  # the number was reused by another file meanwhile
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
            try:
                local, remote = sock.getsockname(), sock.getpeername()
            except OSError:
                continue  # not connected
            if local[1] in keep_ports or remote[1] in keep_ports:
                continue
            sock.shutdown(socket.SHUT_RDWR)
            done.append(f"{_endpoint(local)} -> {_endpoint(remote)}")
        except OSError:
            continue
        finally:
            sock.close()  # closes the duplicate only; the owner's descriptor stays valid
    return done
