"""Looking at report pages the way a person does: headless Chromium, its DOM and screenshots.

``require_tool`` skips a test whose tool is missing, saying which Debian package brings it
(a failure where GPUCONFORM_REQUIRE_TOOLS=1, as in CI). ``png_pixels`` decodes Chromium's
screenshots (8-bit RGB/RGBA PNG) without an imaging library, so a test can ask what colour
the first screen shows.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require_tool(*names: str, debian_package: str = "", how: str = "", dirs: tuple[Path, ...] = ()) -> str:
    """The first tool found (in ``dirs``, then on PATH); a skip saying how to install it
    where none is (a failure in CI, where GPUCONFORM_REQUIRE_TOOLS=1 says it must be there)."""
    for name in names:
        for directory in dirs:
            if (directory / name).exists():
                return str(directory / name)
        path = shutil.which(name)
        if path:
            return path
    message = f"{' / '.join(names)} not installed ({how or f'Debian package {debian_package}'})"
    if os.environ.get("GPUCONFORM_REQUIRE_TOOLS"):
        pytest.fail(message)
    pytest.skip(message)


def chromium(page: Path, profile: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run headless Chromium on ``page``; (the result, wall seconds)."""
    binary = require_tool("chromium", "chromium-browser", debian_package="chromium")
    started = time.perf_counter()
    result = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-2000:]
    return result, took


def open_seconds(page: Path, profile: Path) -> float:
    """How much longer Chromium takes to load and lay out ``page`` than an empty page
    (its own start-up taken out): the page's open time. The better of two tries each."""
    blank = page.parent / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    times = {}
    for which in (blank, page):
        times[which] = min(chromium(which, profile, "--dump-dom")[1] for _ in range(2))
    return max(times[page] - times[blank], 0.0)


def keep_artifact(path: Path) -> None:
    """Copy a screenshot or page to $GPUCONFORM_ARTIFACTS (the test artefacts) when set."""
    target = os.environ.get("GPUCONFORM_ARTIFACTS")
    if target:
        os.makedirs(target, exist_ok=True)
        shutil.copy(path, target)


def png_pixels(path: Path, max_rows: int | None = None) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB or RGBA PNG; only the first
    ``max_rows`` rows are decoded when given (pure Python: about a second per 200 rows)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    offset, chunks, header = 8, [], b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        offset += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6), f"unsupported PNG (depth {depth}, colour type {colour})"
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height if max_rows is None else min(height, max_rows)):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up = previous[x]
            corner = previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + ((left + up) >> 1)) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                predictor = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[x] = (line[x] + predictor) & 0xFF
        previous = line
        rgb = bytes(line) if channels == 3 else bytes(b for i, b in enumerate(line) if i % 4 != 3)
        rows.append(rgb)
    return width, height, rows


def count_colour(rows: list[bytes], colour: tuple[int, int, int], top: int) -> int:
    """How many pixels of the first ``top`` rows have ``colour`` (exactly)."""
    wanted = bytes(colour)
    return sum(1 for row in rows[:top] for x in range(0, len(row), 3) if row[x : x + 3] == wanted)
