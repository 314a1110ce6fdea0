"""Node-local leases on whole GPUs, so multi-rank tests can run under ``pytest -n``.

With xdist each worker is pinned to one GPU, yet a ``world_size(2)`` CUDA test needs two.
Rather than skip it, or let it share GPUs that neighbours are timing, the engine leases
GPUs through one lock file per GPU: a single-device test holds the lease of its own GPU
while it runs; a multi-rank test takes the leases of the GPUs it needs, always in the same
(sorted) order, so two tests can never each hold what the other waits for. The xdist
controller hands every worker the node's GPU list (node/pinning.py).
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from contextlib import contextmanager

log = logging.getLogger(__name__)


def lock_dir() -> str:
    path = os.environ.get("GPUCONFORM_LOCK_DIR") or os.path.join(tempfile.gettempdir(), "gpuconform-gpu-leases")
    os.makedirs(path, exist_ok=True)
    return path


class LeaseTimeout(TimeoutError):
    pass


def _token_file(token: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in token)
    return os.path.join(lock_dir(), f"gpu-{safe}.lock")


@contextmanager
def lease(tokens: list[str], timeout: float):
    """Hold exclusive leases on these GPUs for the duration of the block."""
    held = []
    deadline = time.monotonic() + timeout
    try:
        for token in sorted(set(tokens)):
            handle = open(_token_file(token), "a+")
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
