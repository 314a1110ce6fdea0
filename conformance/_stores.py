"""Key-value stores the ranks of a check share, made inside the check.

The store checks test the stores themselves; the barrier checks need a channel beside the
process group to see who has arrived, one that no collective under test takes part in.
Both build their own store: rank 0 serves a TCPStore on a free port and tells the others
where (by copying a string to them, not by a reduction), or rank 0 makes a directory for a
FileStore when every rank runs on one host (a FileStore needs a filesystem all ranks
share; across hosts that cannot be assumed).
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from datetime import timedelta

import torch.distributed as dist

from pytest_gpuconform.checks import gather_text

STORE_TIMEOUT = timedelta(seconds=30)


def hosts(world_size: int) -> list[str]:
    """Every rank's host name, in rank order."""
    return gather_text(socket.gethostname(), world_size)


def tcp_store(rank: int, world_size: int) -> dist.TCPStore:
    """A TCPStore served by rank 0, every rank a client of it."""
    same_host = len(set(hosts(world_size))) == 1
    if rank == 0:
        host = _reachable_address(same_host)
        master = dist.TCPStore(host, 0, world_size, is_master=True, timeout=STORE_TIMEOUT, wait_for_workers=False)
        address = f"{host}:{master.port}"
    gathered = gather_text(address if rank == 0 else "", world_size)
    if rank == 0:
        return master
    host, _, port = gathered[0].rpartition(":")
    return dist.TCPStore(host, int(port), world_size, is_master=False, timeout=STORE_TIMEOUT)


def _reachable_address(same_host: bool) -> str:
    """Where the other ranks can reach rank 0: loopback on one host, else rank 0's fully
    qualified host name (the server listens on every interface). Not MASTER_ADDR: under
    torchrun's c10d rendezvous it names the rendezvous host, which need not run rank 0."""
    return "127.0.0.1" if same_host else socket.getfqdn()


def shared_directory(rank: int, world_size: int) -> str | None:
    """A fresh directory made by rank 0 and known to every rank, or None when the ranks
    run on different hosts (then no directory is known to be shared)."""
    if len(set(hosts(world_size))) != 1:
        return None
    made = tempfile.mkdtemp(prefix="gpuconform-store-") if rank == 0 else ""
    return gather_text(made, world_size)[0]


def all_done(world_size: int) -> None:
    """Return once every rank got here: rank 0's TCPStore server, or the FileStore's
    directory, must outlive every other rank's last request."""
    gather_text("done", world_size)


def remove_directory(path: str, rank: int, world_size: int) -> None:
    """Rank 0 removes the directory once every rank is done with it."""
    all_done(world_size)
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
