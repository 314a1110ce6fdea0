"""What a NCCL rank needs so that its failures are fast, bounded and explained.

A rank that uses NCCL can fail in ways a gloo rank cannot: a collective whose peer never
arrives blocks a CUDA stream, not Python; NCCL reports asynchronous errors (a peer that
died, a NVLink or InfiniBand fault) from a watchdog thread; and its own explanation goes
to NCCL's log, not to the Python exception. This module holds the decisions, as plain
functions, for the code that starts ranks: the engine's CUDA pools (engine/pool.py,
engine/rank/process.py) and cluster mode's NCCL ranks (cluster/plugin.py):

* ``rank_environment``: set before the rank process starts (NCCL and cuBLAS read their
  variables at initialisation). ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` makes the watchdog
  end the process when a collective times out or NCCL reports an error, without the
  communicator teardown that can itself hang (0 would leave a hung collective hanging
  for ever); ``NCCL_DEBUG=WARN`` into ``NCCL_DEBUG_FILE`` keeps NCCL's own account of
  a failure in a per-rank file; ``CUBLAS_WORKSPACE_CONFIG`` lets the bitwise checks use
  deterministic cuBLAS from the first handle on (checks/numerics.py). A value the user set
  is kept, except an error handling mode that would let hangs hang.
* ``group_options``: ``init_process_group`` options: for NCCL ``device_id`` (the rank's
  GPU), which creates the communicator eagerly (a broken NCCL set-up fails at rank
  start-up, not inside the first test) and binds the group to that GPU (no "devices used by
  this process are currently unknown" guess in barriers).
* ``cluster_rank_setup``: the same environment and options for a rank of a torchrun/srun
  world, which the launcher started: set in the process itself, before its first
  communicator, which is early enough for NCCL and for cuBLAS.

The process group's timeout is its owner's: the engine gives it the test's deadline + 60 s
(the controller's deadline fires first, takes every rank's stack and kills the ranks; the
group's own timeout is only the backstop); cluster mode gives deadline + 30 s, and its
watchdog thread (cluster/faults.py) cuts a collective still blocked 0.5 s after the deadline.
* ``log_sections`` / ``warning_hint``: NCCL's log tail of every rank, for the failure's
  body, and its first ``NCCL WARN`` line, for the one-line message; ``log_size`` taken
  before a test and ``log_tail(since=...)`` limit both to what that test added.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

LOG_NAME = "nccl-rank{rank}.log"  # after the pool's name, when there is one
# Error handling modes that end a rank whose collective timed out (1 tear down and exit,
# 2 clean up only and raise, 3 exit without clean-up); 0 lets a hang hang.
FAILING_MODES = {"1", "2", "3"}
DEFAULT_MODE = "3"
TAIL_LINES = 20
TAIL_BYTES = 64 * 1024


def log_path(log_dir: str | os.PathLike, rank: int, pool: str = "") -> str:
    """Rank ``rank``'s NCCL log in ``log_dir``; ``pool`` (a name unique on the node) keeps
    the logs of different pools and processes sharing one directory apart."""
    name = LOG_NAME.format(rank=rank)
    return str(Path(log_dir) / (f"{pool}-{name}" if pool else name))


def rank_environment(
    rank: int, log_dir: str | os.PathLike, environ: Mapping[str, str] | None = None, pool: str = ""
) -> dict:
    """Variables to add to rank ``rank``'s environment before it starts (see the docstring);
    ``pool`` names its log file (``log_path``)."""
    from ..checks.numerics import CUBLAS_WORKSPACE_CONFIG, DETERMINISTIC_CUBLAS

    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    mode = environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", environ.get("NCCL_ASYNC_ERROR_HANDLING"))
    if mode not in FAILING_MODES:
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = DEFAULT_MODE
    if not environ.get("NCCL_DEBUG"):
        env["NCCL_DEBUG"] = "WARN"
    if not environ.get("NCCL_DEBUG_FILE"):
        env["NCCL_DEBUG_FILE"] = log_path(log_dir, rank, pool)
    if environ.get("CUBLAS_WORKSPACE_CONFIG") not in DETERMINISTIC_CUBLAS:
        env["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    return env


def debug_file(environ: Mapping[str, str], pid: int, host: str | None = None) -> str | None:
    """The file NCCL writes for a process with this environment: NCCL expands ``%h`` to the
    host name and ``%p`` to the pid in NCCL_DEBUG_FILE. None when NCCL logs to stdout."""
    template = environ.get("NCCL_DEBUG_FILE")
    if not template:
        return None
    return template.replace("%h", host or socket.gethostname()).replace("%p", str(pid))


def group_options(backend: str, device=None) -> dict:
    """``init_process_group`` options besides the timeout: ``device_id`` for NCCL (see the
    module docstring); nothing for gloo."""
    import inspect

    import torch.distributed as dist

    if backend == "nccl" and device is not None:
        if "device_id" in inspect.signature(dist.init_process_group).parameters:  # torch >= 2.3
            return {"device_id": device}
    return {}


def cluster_rank_setup(
    rank: int, host: str, device, log_dir: str | os.PathLike, environ: Mapping[str, str] | None = None
) -> tuple[dict, dict]:
    """(variables to add to this process's environment, ``init_process_group`` options) for
    NCCL rank ``rank`` of a cluster run on ``host``: the log is
    ``LOG_DIR/cluster-HOST-PID-nccl-rankR.log`` (NCCL puts the pid for ``%p``: two jobs, or
    two runs, on one host never share a file) unless the job set NCCL_DEBUG_FILE."""
    return rank_environment(rank, log_dir, environ, pool=f"cluster-{host}-%p"), group_options("nccl", device)


def log_size(path: str | os.PathLike) -> int:
    """Where a log ends now: pass it as ``since`` to read only what one test added."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def log_tail(path: str | os.PathLike, lines: int = TAIL_LINES, max_bytes: int = TAIL_BYTES, since: int = 0) -> str:
    """The last ``lines`` lines of a NCCL log written after byte ``since`` ("" when there are
    none). A reused rank keeps one log for many tests; ``since`` keeps earlier tests out."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(since, size - max_bytes, 0))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").rstrip("\n")
    return "\n".join(text.splitlines()[-lines:]) if text else ""


def warn_lines(text: str) -> list[str]:
    """NCCL's warnings ("host:pid:tid [dev] NCCL WARN message"), message part only."""
    found = []
    for line in text.splitlines():
        _, sep, message = line.partition(" NCCL WARN ")
        if sep:
            found.append(message.strip())
    return found


def log_sections(texts: Mapping[int, str]) -> list[tuple[str, str]]:
    """(title, text) per rank, in rank order, for the failure report; ``texts`` maps a rank
    to what its NCCL log gained during the test (``log_tail`` with ``since``). Ranks whose
    log gained nothing get no section."""
    return [(f"NCCL log [rank {rank}]", texts[rank]) for rank in sorted(texts) if texts[rank]]


def warning_hint(texts: Mapping[int, str]) -> str | None:
    """The first warning of the first rank that warned, as "rank R: NCCL WARN <message>",
    for the one-line failure message; None when none did. ``texts`` as for ``log_sections``."""
    for rank in sorted(texts):
        warnings = warn_lines(texts[rank])
        if warnings:
            return f"rank {rank}: NCCL WARN {warnings[0]}"
    return None
