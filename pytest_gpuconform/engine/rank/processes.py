"""Process-tree facts and kills, Linux /proc based (both sides use them).

A rank is a child subreaper: anything a test starts, and anything that process starts and
orphans, stays a descendant of the rank, so it can be found after the test and killed by
name. The controller uses the same walk to kill a rank together with everything below it.
Elsewhere (no /proc) the walk finds nothing and only the rank itself is killed.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent() -> bool:
    """SIGKILL this process when its parent dies (even by SIGKILL), so a rank blocked in a
    collective can never outlive the run and keep its GPU."""
    return _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's list: a child belongs to the thread that
    forked it)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.extend(int(p) for p in handle.read().split())
        except (OSError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before their children."""
    found: list[int] = []
    queue = children(pid)
    while queue:
        child = queue.pop(0)
        if child in found:
            continue
        found.append(child)
        queue.extend(children(child))
    return found


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True  # gone already


def describe(pid: int) -> str:
    """'sleep 1000 (pid 4242)': the command line, or the name the kernel keeps."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    if not command:
        try:
            with open(f"/proc/{pid}/comm") as handle:
                command = f"[{handle.read().strip()}]"
        except OSError:
            command = "?"
    if len(command) > 120:
        command = command[:117] + "..."
    return f"{command} (pid {pid})"


def kill_tree(pid: int, include_root: bool = True) -> list[int]:
    """SIGKILL ``pid`` and everything below it; the descendants are listed first, so a
    parent cannot start new children between the walk and its own death. Returns the pids
    signalled."""
    below = descendants(pid)
    targets = ([pid] if include_root else []) + below
    for target in targets:
        try:
            os.kill(target, signal.SIGKILL)
        except OSError:
            pass
    return targets
