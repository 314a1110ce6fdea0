"""Fixtures of an enabled run (registered by plugin.py, so they work with --noconftest).

``device``, ``world_size`` and ``dtype`` receive their values from the parametrization in
parametrize.py; the names are turned into torch objects here, at run time.
"""

from __future__ import annotations

from typing import Callable

import pytest

from .session import STATE_KEY, GpuconformSession


def _state(request: pytest.FixtureRequest) -> GpuconformSession:
    return request.config.stash[STATE_KEY]


def _param(request: pytest.FixtureRequest, name: str, default):
    callspec = getattr(request.node, "callspec", None)
    return callspec.params.get(name, default) if callspec else default


@pytest.fixture
def device(request: pytest.FixtureRequest):
    """torch.device the test runs on: ``cpu``, or ``cuda:0`` (the process's first visible GPU)."""
    import torch

    name = getattr(request, "param", "cpu")
    cluster = _state(request).cluster
    if cluster is not None:
        return cluster.device() if name == ("cuda" if cluster.backend == "nccl" else "cpu") else torch.device(name)
    return torch.device("cuda", 0) if name == "cuda" else torch.device("cpu")


@pytest.fixture
def dtype(request: pytest.FixtureRequest):
    """torch dtype of this parameter (fp32 when the test has no dtype marker)."""
    from .dtypes import to_torch

    return to_torch(getattr(request, "param", "fp32"))


@pytest.fixture
def world_size(request: pytest.FixtureRequest) -> int:
    """Number of ranks running this test (1 outside multi-rank tests)."""
    return getattr(request, "param", 1)


@pytest.fixture
def rank(request: pytest.FixtureRequest) -> int:
    """This process's rank (0 outside multi-rank tests; the launcher's rank in cluster mode)."""
    cluster = _state(request).cluster
    return cluster.world.rank if cluster is not None else 0


@pytest.fixture
def process_group(request: pytest.FixtureRequest):
    """The default process group of a multi-rank test (None outside one)."""
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


@pytest.fixture
def gpu(request: pytest.FixtureRequest):
    """NVML facts (name, UUID, bus id, memory, compute capability) of the test's GPU."""
    from .session import STRICT_FAILURE

    node = _state(request).node
    if not node.visible and request.node.stash.get(STRICT_FAILURE, None):
        return None  # the test fails in its call phase (strict acceptance), not skipped here
    if not node.visible:
        pytest.skip(f"needs a GPU; {node.message or 'none visible'}")
    return node.visible[0]


@pytest.fixture
def tolerance(request: pytest.FixtureRequest):
    """The tolerance row (rtol, atol, rel_l2, loss_rel, cosine) for this test's dtype."""
    return _state(request).tolerances[_param(request, "dtype", "fp32")]


@pytest.fixture
def tolerance_table(request: pytest.FixtureRequest):
    """The whole tolerance table, after site overrides: {"fp32": Tolerance, ...}."""
    return dict(_state(request).tolerances)


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[[str, object], None]:
    """record(name, value): attach a measured number to the JUnit test case and the summary."""
    from .recording import recorder

    return recorder(request.node.user_properties.append)


@pytest.fixture(scope="session")
def node_inventory(request: pytest.FixtureRequest):
    """The node inventory (versions, driver, GPUs) collected at start-up."""
    return _state(request).inventory


@pytest.fixture(scope="session")
def expect_gpus(request: pytest.FixtureRequest) -> int:
    """--gpuconform-expect-gpus (0 when not given)."""
    return _state(request).expect_gpus


@pytest.fixture
def memory_meter():
    """``with memory_meter.track(device) as m:`` -> m.live_bytes, m.peak_bytes (any device,
    counted by a dispatch mode) and m.cuda_peak_bytes / m.cuda_allocated_bytes on CUDA."""
    from .checks.memory import MemoryMeter

    return MemoryMeter()
