"""Expand the ``world_size``, ``device`` and ``dtype`` markers into test ids.

Order is fixed so ids read the same everywhere: ``test_x[ws2-cuda-bf16]``. Parameters are
indirect: the fixtures turn names into torch objects at run time, so collection never
imports torch. Each parameter is its own test id, so CI history is kept per world size,
device and dtype. Markers are validated here (markers.py), so misuse is a collection error.
"""

from __future__ import annotations

import pytest

from .markers import dtype_names, gpu_need, world_size_spec

DEVICES = ("cpu", "cuda")


def _ensure_argname(metafunc: pytest.Metafunc, name: str) -> None:
    # Tests may use a marker without requesting the fixture by name; parametrize needs it
    # in the closure.
    if name not in metafunc.fixturenames:
        metafunc.fixturenames.append(name)


def generate(metafunc: pytest.Metafunc) -> None:
    definition = metafunc.definition
    need = gpu_need(definition.get_closest_marker("gpu"), definition.nodeid)
    spec = world_size_spec(definition.get_closest_marker("world_size"), definition.nodeid)
    names = dtype_names(definition.get_closest_marker("dtype"), definition.nodeid)
    if spec is not None:
        _ensure_argname(metafunc, "world_size")
        metafunc.parametrize("world_size", spec.sizes, ids=[f"ws{n}" for n in spec.sizes], indirect=True)
    if spec is not None or "device" in metafunc.fixturenames:
        _ensure_argname(metafunc, "device")
        devices = ["cuda"] if need is not None else list(DEVICES)
        metafunc.parametrize("device", devices, ids=devices, indirect=True)
    if names is not None:
        _ensure_argname(metafunc, "dtype")
        metafunc.parametrize("dtype", names, ids=names, indirect=True)
