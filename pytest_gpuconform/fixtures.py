"""Fixtures of an enabled run (registered by plugin.py, so they work with --noconftest).

``device``, ``world_size`` and ``dtype`` receive their values from the parametrization
(collection/parametrize.py); names are turned into torch objects here, at run time, so
collection never imports torch. Everything else a fixture returns was resolved once at
start-up: the settings (settings.py), the node inventory, the test's plan.

Inside a rank of the engine (``RANK_SPEC_KEY`` in the stash) these same fixtures run in the
rank's own pytest session: ``rank``, ``device`` and ``gpu`` are that rank's, the settings
and inventory are the controller's (handed over as data), and ``shared_tmp_path`` is one
directory for all ranks of the test.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .cluster.world import CLUSTER_KEY
from .collection.plan import plan_of
from .collection.policy import STRICT_FAILURE
from .engine.rank.spec import ATTEMPT_KEY, RANK_SPEC_KEY
from .node.inventory import INVENTORY_KEY
from .settings import SETTINGS_KEY


@pytest.fixture
def device(request: pytest.FixtureRequest):
    """torch.device the test runs on: ``cpu``, or ``cuda:0`` (the process's first visible GPU;
    in cluster mode the rank's own GPU)."""
    import torch

    name = getattr(request, "param", "cpu")
    world = request.config.stash.get(CLUSTER_KEY, None)
    if world is not None and name == world.device_kind == "cuda":
        return torch.device("cuda", world.local_rank)
    if name == "cuda" and RANK_SPEC_KEY in request.config.stash:
        return torch.device("cuda", torch.cuda.current_device())  # the rank set its own GPU
    return torch.device("cuda", 0) if name == "cuda" else torch.device("cpu")


@pytest.fixture
def dtype(request: pytest.FixtureRequest):
    """torch dtype of this parameter (fp32 when the test has no dtype marker)."""
    from .collection.dtypes import to_torch

    return to_torch(getattr(request, "param", "fp32"))


@pytest.fixture
def world_size(request: pytest.FixtureRequest) -> int:
    """Number of ranks running this test (1 outside multi-rank tests)."""
    return getattr(request, "param", 1)


@pytest.fixture
def rank(request: pytest.FixtureRequest) -> int:
    """This process's rank (0 outside multi-rank tests; the launcher's rank in cluster mode)."""
    spec = request.config.stash.get(RANK_SPEC_KEY, None)
    if spec is not None:
        return spec.rank
    world = request.config.stash.get(CLUSTER_KEY, None)
    return world.rank if world is not None else 0


@pytest.fixture
def process_group(request: pytest.FixtureRequest):
    """The default process group of a multi-rank test (None outside one)."""
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


@pytest.fixture
def gpu(request: pytest.FixtureRequest):
    """NVML facts (name, UUID, bus id, memory, compute capability) of the test's GPU."""
    if RANK_SPEC_KEY in request.config.stash:
        return _rank_gpu(request)
    node = request.config.stash[INVENTORY_KEY].node
    if not node.visible and request.node.stash.get(STRICT_FAILURE, None):
        return None  # the test fails in its call phase (strict acceptance), not skipped here
    if not node.visible:
        pytest.skip(f"needs a GPU; {node.message or 'none visible'}")
    return node.visible[0]


def _rank_gpu(request: pytest.FixtureRequest):
    """A rank's GPU, asked of NVML in the rank: its CUDA_VISIBLE_DEVICES may be the GPUs
    leased for this pool, not the controller's view."""
    import torch

    from .node import nvml

    node = nvml.query()
    index = torch.cuda.current_device() if torch.cuda.is_available() else None
    if index is None or index >= len(node.visible):
        pytest.skip(f"needs a GPU; rank {request.config.stash[RANK_SPEC_KEY].rank} has none visible")
    # By UUID: CUDA's ordinal order need not be NVML's (node/identity.py).
    return node.find(str(torch.cuda.get_device_properties(index).uuid)) or node.visible[index]


@pytest.fixture
def shared_tmp_path(request: pytest.FixtureRequest, tmp_path):
    """One directory every rank of a multi-rank test sees (``tmp_path`` is per rank): for
    checkpoints saved by some ranks and loaded by others. Outside ranks, ``tmp_path``."""
    spec = request.config.stash.get(RANK_SPEC_KEY, None)
    if spec is None:
        return tmp_path
    import re
    from pathlib import Path

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80]
    path = Path(spec.shared_dir) / f"{safe}-{request.node.stash.get(ATTEMPT_KEY, 0)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def tolerance(request: pytest.FixtureRequest):
    """The tolerance row (rtol, atol, rel_l2, loss_rel, sdpa_*) for this test's dtype."""
    return request.config.stash[SETTINGS_KEY].tolerances[plan_of(request.node).dtype or "fp32"]


@pytest.fixture
def tolerance_table(request: pytest.FixtureRequest):
    """The whole tolerance table, after site overrides: {"fp32": Tolerance, ...}."""
    return dict(request.config.stash[SETTINGS_KEY].tolerances)


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[[str, object], None]:
    """record(name, value): attach a measured number to the JUnit test case and the summary."""
    from .reporting.records import recorder

    return recorder(request.node.user_properties.append)


@pytest.fixture(scope="session")
def gpuconform_settings(request: pytest.FixtureRequest):
    """The run's resolved settings (settings.py): options, ini and defaults, read once."""
    return request.config.stash[SETTINGS_KEY]


@pytest.fixture(scope="session")
def node_inventory(request: pytest.FixtureRequest):
    """The node inventory (versions, driver, GPUs) collected at start-up."""
    return request.config.stash[INVENTORY_KEY]


@pytest.fixture(scope="session")
def expect_gpus(request: pytest.FixtureRequest) -> int:
    """--gpuconform-expect-gpus (0 when not given)."""
    return request.config.stash[SETTINGS_KEY].expect_gpus


@pytest.fixture(scope="session")
def perf_floors(request: pytest.FixtureRequest):
    """The performance floor table: the shipped one or --gpuconform-perf-floors, read at start-up."""
    return request.config.stash[SETTINGS_KEY].perf_floors


@pytest.fixture(scope="session")
def health_watch(request: pytest.FixtureRequest):
    """The run's health watch: start snapshot, XID events, end comparison (health/watch.py)."""
    from .health.watch import WATCH_KEY

    watch = request.config.stash.get(WATCH_KEY, None)
    if watch is None:
        pytest.fail("health_watch lives in the pytest controller; multi-rank tests cannot request it", pytrace=False)
    return watch


@pytest.fixture
def memory_meter():
    """``with memory_meter.track(device) as m:`` -> m.live_bytes, m.peak_bytes (any device,
    counted by a dispatch mode) and m.cuda_peak_bytes / m.cuda_allocated_bytes on CUDA."""
    from .checks.memory import MemoryMeter

    return MemoryMeter()
