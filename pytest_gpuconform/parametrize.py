"""Expand the ``world_size``, ``device`` and ``dtype`` markers into test ids.

Order is fixed so ids read the same everywhere: ``test_x[ws2-cuda-bf16]``. Parameters are
indirect: the fixtures in fixtures.py turn names into torch objects at run time, so
collection never imports torch. Each parameter is its own test id, so CI history is kept
per world size, device and dtype.
"""

from __future__ import annotations

import pytest

from . import dtypes
from .requirements import MarkerError, gpu_need

DEVICES = ("cpu", "cuda")


def world_sizes(metafunc: pytest.Metafunc) -> list[int] | None:
    marker = metafunc.definition.get_closest_marker("world_size")
    if marker is None:
        return None
    sizes = list(marker.args)
    bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if not sizes or bad:
        raise MarkerError(
            f"{metafunc.definition.nodeid}: world_size{tuple(sizes)!r}: sizes must be whole numbers >= 1, "
            f"e.g. @pytest.mark.world_size(2, 4)"
        )
    unknown = set(marker.kwargs) - {"timeout", "fresh"}
    if unknown:
        raise MarkerError(f"{metafunc.definition.nodeid}: world_size() got unknown keywords {sorted(unknown)}; "
                          "accepted: timeout, fresh")
    return list(dict.fromkeys(sizes))


def dtype_names(metafunc: pytest.Metafunc) -> list[str] | None:
    marker = metafunc.definition.get_closest_marker("dtype")
    if marker is None:
        return None
    if not marker.args:
        raise MarkerError(f"{metafunc.definition.nodeid}: dtype() needs at least one of {', '.join(dtypes.CANONICAL)}")
    try:
        return list(dict.fromkeys(dtypes.canonical(a) for a in marker.args))
    except dtypes.UnknownDtype as exc:
        raise MarkerError(f"{metafunc.definition.nodeid}: {exc}") from None


def _ensure_argname(metafunc: pytest.Metafunc, name: str) -> None:
    # Tests may use a marker without requesting the fixture by name; parametrize needs it
    # in the closure.
    if name not in metafunc.fixturenames:
        metafunc.fixturenames.append(name)


def generate(metafunc: pytest.Metafunc) -> None:
    gpu_need(metafunc.definition.get_closest_marker("gpu"), metafunc.definition.nodeid)  # validate early
    sizes = world_sizes(metafunc)
    if sizes is not None:
        _ensure_argname(metafunc, "world_size")
        metafunc.parametrize("world_size", sizes, ids=[f"ws{n}" for n in sizes], indirect=True)
    if sizes is not None or "device" in metafunc.fixturenames:
        _ensure_argname(metafunc, "device")
        devices = ["cuda"] if metafunc.definition.get_closest_marker("gpu") else list(DEVICES)
        metafunc.parametrize("device", devices, ids=devices, indirect=True)
    names = dtype_names(metafunc)
    if names is not None:
        _ensure_argname(metafunc, "dtype")
        metafunc.parametrize("dtype", names, ids=names, indirect=True)
