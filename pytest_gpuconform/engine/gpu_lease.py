"""Node-local leases on whole GPUs, so multi-rank tests can run under ``pytest -n``.

With xdist each worker is pinned to one GPU, yet a ``world_size(2)`` CUDA test needs two.
Rather than skip it, or let it share GPUs that neighbours are timing, the engine leases
GPUs through one lock file per GPU: a single-device test holds the lease of its own GPU
while it runs; a multi-rank test takes the leases of the GPUs it needs, always in the same
(sorted) order, so two tests can never each hold what the other waits for. The xdist
controller hands every worker the node's GPU list (node/pinning.py).

Tokens are UUIDs (node/pinning.py pins by UUID), and a lock file is named after the
device's UUID in one spelling (identity.lock_name), so two pytest runs on one node, with
different CUDA_DEVICE_ORDER or CUDA_VISIBLE_DEVICES, still exclude each other. The lock
directory is shared by every user of the node (sticky and world-writable, like /tmp):
another user's lock file is opened read-only, which is all ``flock`` needs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from contextlib import contextmanager

from ..node.identity import lock_name

log = logging.getLogger(__name__)


def lock_dir() -> str:
    path = os.environ.get("GPUCONFORM_LOCK_DIR") or os.path.join(tempfile.gettempdir(), "gpuconform-gpu-leases")
    try:
        os.mkdir(path)
        os.chmod(path, 0o1777)  # every user's runs lease the same GPUs (mkdir's mode obeys the umask)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)
    return path


class LeaseTimeout(TimeoutError):
    pass


def _token_file(token: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in lock_name(token))
    return os.path.join(lock_dir(), f"gpu-{safe}.lock")


def _open_lock(path: str):
    """The lock file, created world-writable; another user's file is opened read-only."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    return os.fdopen(fd, "rb")


@contextmanager
def lease(tokens: list[str], timeout: float):
    """Hold exclusive leases on these GPUs for the duration of the block."""
    held = []
    deadline = time.monotonic() + timeout
    try:
        for token in sorted(set(tokens)):
            handle = _open_lock(_token_file(token))
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        handle.close()
                        raise LeaseTimeout(
                            f"GPU {token} stayed leased by another pytest worker for {timeout:.0f} s "
                            f"(lock file {_token_file(token)})"
                        ) from None
                    time.sleep(0.05)
            held.append(handle)
        if held:
            log.debug(
                "leased GPU(s) %s after %.2f s", ",".join(sorted(set(tokens))), timeout - (deadline - time.monotonic())
            )
        yield
    finally:
        for handle in reversed(held):
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
