"""Rank logs: where they live, and the part of one that belongs to a test.

Each rank writes its stdout and stderr (file-descriptor level: C++ and NCCL output too) to
one log. A test's part of it goes into its report, keeping the head and the tail when it is
long: the last lines are where a crash says why, so they always survive, and a marker says
how much was left out. ``--gpuconform-rank-logs DIR`` keeps the whole logs.
"""

from __future__ import annotations

import os

HEAD_BYTES = 32_000
TAIL_BYTES = 96_000


def size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def read_span(path: str, start: int, end: int | None = None) -> str:
    """The log's bytes [start, end) (to its end when None), head and tail when long."""
    stop = size(path) if end is None else end
    length = max(0, stop - start)
    try:
        with open(path, "rb") as handle:
            if length <= HEAD_BYTES + TAIL_BYTES:
                handle.seek(start)
                return handle.read(length).decode("utf-8", errors="replace")
            handle.seek(start)
            head = handle.read(HEAD_BYTES)
            handle.seek(stop - TAIL_BYTES)
            tail = handle.read(TAIL_BYTES)
    except OSError:
        return ""
    head = head[: head.rfind(b"\n") + 1] or head  # cut at line ends where there are any
    tail = tail[tail.find(b"\n") + 1 :] or tail
    elided = length - len(head) - len(tail)
    text = head.decode("utf-8", errors="replace")
    return f"{text}[... {elided} bytes elided ...]\n{tail.decode('utf-8', errors='replace')}"


def last_lines(text: str, count: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-count:])


# Frames of the machinery around a test in a rank: dropped from a crash's summary.
_MACHINERY = ("/_pytest/", "/pluggy/", "/pytest_gpuconform/engine/rank/", "/multiprocessing/", 'File "<string>"')


def crash_lines(text: str, count: int = 30) -> str:
    """What a crash's summary shows: faulthandler's "Fatal Python error" line and the
    crashing thread's own frames (pytest's and the engine's omitted) when there is such a
    dump, else the last lines."""
    lines = text.rstrip().splitlines()
    fatal = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
    if not fatal:
        return last_lines(text, count)
    start = fatal[-1]
    current = next((i for i in range(start, len(lines)) if lines[i].startswith("Current thread")), None)
    if current is None:
        return "\n".join(lines[start : start + count])
    frames = []
    for line in lines[current + 1 :]:
        if not line.startswith("  "):
            break
        if not any(part in line for part in _MACHINERY):
            frames.append(line)
    return "\n".join([lines[start], "", lines[current], *frames[:count]])
