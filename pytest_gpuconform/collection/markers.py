"""Read the plugin's markers, validating every argument at collection time.

A misused marker is a collection error that names the test and says what is accepted
(``MarkerError``), never a failure later at run time: ``world_size(2, timeout="soon")`` is
caught while collecting, like ``dtype("fp8")``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from . import dtypes


class MarkerError(pytest.Collector.CollectError):
    """A marker used wrongly: a collection error that names the test, shown without a
    traceback of pytest's internals."""


@dataclass(frozen=True)
class GpuNeed:
    n: int = 1
    bf16: bool = False
    min_compute_capability: tuple[int, int] | None = None
    min_memory_gib: float | None = None


@dataclass(frozen=True)
class WorldSizeSpec:
    sizes: tuple[int, ...]
    timeout: float | None  # None: the run's --gpuconform-timeout
    fresh: bool


def gpu_need(marker: pytest.Mark | None, nodeid: str) -> GpuNeed | None:
    if marker is None:
        return None
    kwargs = dict(marker.kwargs)
    if marker.args:
        kwargs.setdefault("n", marker.args[0])
    n = kwargs.pop("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MarkerError(f"{nodeid}: gpu(n={n!r}): n must be a whole number >= 1")
    cc = kwargs.pop("min_compute_capability", None)
    if cc is not None:
        try:
            cc = tuple(int(p) for p in (cc if isinstance(cc, tuple) else str(cc).split(".")))
        except ValueError:
            raise MarkerError(f"{nodeid}: gpu(min_compute_capability={cc!r}): expected e.g. '8.0' or (8, 0)") from None
    memory = kwargs.pop("min_memory_gib", None)
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0):
        raise MarkerError(f"{nodeid}: gpu(min_memory_gib={memory!r}): expected a number of GiB > 0")
    bf16 = kwargs.pop("bf16", False)
    if not isinstance(bf16, bool):
        raise MarkerError(f"{nodeid}: gpu(bf16={bf16!r}): expected True or False")
    if kwargs:
        raise MarkerError(
            f"{nodeid}: gpu() got unknown keywords {sorted(kwargs)}; "
            "accepted: n, bf16, min_compute_capability, min_memory_gib"
        )
    return GpuNeed(n=n, bf16=bf16, min_compute_capability=cc, min_memory_gib=memory)


def world_size_spec(marker: pytest.Mark | None, nodeid: str) -> WorldSizeSpec | None:
    if marker is None:
        return None
    sizes = list(marker.args)
    bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if not sizes or bad:
        raise MarkerError(
            f"{nodeid}: world_size{tuple(sizes)!r}: sizes must be whole numbers >= 1, "
            "e.g. @pytest.mark.world_size(2, 4)"
        )
    unknown = set(marker.kwargs) - {"timeout", "fresh"}
    if unknown:
        raise MarkerError(f"{nodeid}: world_size() got unknown keywords {sorted(unknown)}; accepted: timeout, fresh")
    timeout = marker.kwargs.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0
    ):
        raise MarkerError(
            f"{nodeid}: world_size(timeout={timeout!r}): expected a number of seconds > 0, "
            "e.g. timeout=60 (leave it out for --gpuconform-timeout)"
        )
    fresh = marker.kwargs.get("fresh", False)
    if not isinstance(fresh, bool):
        raise MarkerError(f"{nodeid}: world_size(fresh={fresh!r}): expected True or False")
    return WorldSizeSpec(tuple(dict.fromkeys(sizes)), None if timeout is None else float(timeout), fresh)


def dtype_names(marker: pytest.Mark | None, nodeid: str) -> list[str] | None:
    if marker is None:
        return None
    if not marker.args:
        raise MarkerError(f"{nodeid}: dtype() needs at least one of {', '.join(dtypes.CANONICAL)}")
    if marker.kwargs:
        raise MarkerError(f"{nodeid}: dtype() takes no keywords, got {sorted(marker.kwargs)}")
    try:
        return list(dict.fromkeys(dtypes.canonical(a) for a in marker.args))
    except dtypes.UnknownDtype as exc:
        raise MarkerError(f"{nodeid}: {exc}") from None
