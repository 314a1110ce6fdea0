"""One ``TestPlan`` per collected item: where, how and with what it runs.

Computed once at collection from the item's markers and parameters and the run's settings,
then kept on the item (``item.stash[PLAN_KEY]``). The engine, cluster mode, the collection
policy (skips, JUnit properties) and the fixtures all read the plan instead of each
re-deriving device, backend or deadline from ``callspec.params`` and markers; this module
is the only place that reads them.

Placements:

* ``in-process``: the pytest process runs the test as usual.
* ``cuda-worker``: it needs a GPU but no process group; one rank process runs it, since
  the pytest controller never creates a CUDA context.
* ``ranks``: N spawned rank processes with a process group (gloo on CPU, NCCL on CUDA).
* ``cluster``: the launcher's world (torchrun/srun); every rank's pytest runs it in-process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pytest

from .markers import GpuNeed, gpu_need, world_size_spec

IN_PROCESS = "in-process"
CUDA_WORKER = "cuda-worker"
RANKS = "ranks"
CLUSTER = "cluster"

# Properties the plugin attaches to every test case: the context of a result, never a
# measurement (reporting/measures.py leaves them out of the key numbers).
CONTEXT_PROPERTIES = ("feature", "device", "dtype", "world_size", "backend")


@dataclass(frozen=True)
class TestPlan:
    __test__ = False  # not a test class, whatever module imports it

    feature: str  # the area: the test module's name without "test_"
    device: str | None  # "cpu" | "cuda" | None (the test asked for no device)
    dtype: str | None  # canonical dtype name of the dtype marker, or None
    world_size: int | None  # ranks of a multi-rank test, None otherwise
    backend: str | None  # "gloo" | "nccl" for multi-rank tests
    placement: str
    deadline: float  # seconds for one run of the test in ranks
    fresh: bool  # new rank processes for this test
    seed: int  # the same on every rank, derived from the test id
    gpu_need: GpuNeed | None
    device_parametrized: bool  # the device is a parameter (part of the test id)
    unparametrizable_sizes: tuple[int, ...] = ()  # world_size(2, 4) on a unittest method: a usage error

    @property
    def pool_key(self) -> tuple[int, str | None, str] | None:
        """(world size, backend, device kind) of the rank pool this test runs in, or None."""
        if self.placement == RANKS:
            assert self.world_size is not None and self.device is not None
            return self.world_size, self.backend, self.device
        if self.placement == CUDA_WORKER:
            return 1, None, "cuda"
        return None

    @property
    def multi_rank(self) -> bool:
        return self.world_size is not None

    def properties(self) -> list[tuple[str, Any]]:
        """The context properties of this test's JUnit case (CONTEXT_PROPERTIES, in order)."""
        props: list[tuple[str, Any]] = [("feature", self.feature)]
        if self.device_parametrized:
            props.append(("device", self.device))
        if self.dtype is not None:
            props.append(("dtype", self.dtype))
        if self.world_size is not None:
            props += [("world_size", self.world_size), ("backend", self.backend)]
        return props


PLAN_KEY: pytest.StashKey[TestPlan] = pytest.StashKey()


def params_of(item: pytest.Item) -> dict[str, Any]:
    """The item's parameters (empty for unparametrized tests)."""
    callspec = getattr(item, "callspec", None)
    return dict(callspec.params) if callspec is not None else {}


def seed_of(nodeid: str) -> int:
    return int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:4], "little")


def _feature(item: pytest.Item) -> str:
    module = getattr(item, "module", None)
    return (module.__name__.rsplit(".", 1)[-1] if module else item.name).removeprefix("test_")


def _is_unittest(item: pytest.Item) -> bool:
    """unittest.TestCase methods: pytest never parametrizes them (no pytest_generate_tests)."""
    import sys

    unittest = sys.modules.get("unittest")
    cls = getattr(item, "cls", None)
    return unittest is not None and isinstance(cls, type) and issubclass(cls, unittest.TestCase)


def make_plan(item: pytest.Item, timeout: float, fresh_ranks: bool, cluster: bool) -> TestPlan:
    """The plan of ``item`` under the run's deadline, fresh-ranks setting and mode."""
    params = params_of(item)
    need = gpu_need(item.get_closest_marker("gpu"), item.nodeid)
    spec = world_size_spec(item.get_closest_marker("world_size"), item.nodeid)
    device = params.get("device") or ("cuda" if need is not None else None)
    world_size = params.get("world_size")
    unparametrizable: tuple[int, ...] = ()
    if world_size is None and spec is not None and _is_unittest(item):
        # One size is taken as the test's world; several cannot become ids and are refused.
        if len(spec.sizes) == 1:
            world_size = spec.sizes[0]
        else:
            unparametrizable = spec.sizes
    if world_size is not None:
        placement = CLUSTER if cluster else RANKS
        backend = "nccl" if device == "cuda" else "gloo"
        device = device or "cpu"
    else:
        placement = CUDA_WORKER if device == "cuda" and not cluster else IN_PROCESS
        backend = None
    return TestPlan(
        feature=_feature(item),
        device=device,
        dtype=params.get("dtype"),
        world_size=world_size,
        backend=backend,
        placement=placement,
        deadline=spec.timeout if spec is not None and spec.timeout is not None else timeout,
        fresh=fresh_ranks or bool(spec is not None and spec.fresh),
        seed=seed_of(item.nodeid),
        gpu_need=need,
        device_parametrized="device" in params,
        unparametrizable_sizes=unparametrizable,
    )


def plan_of(item: pytest.Item) -> TestPlan:
    """The item's plan; made on first use for items added after collection (by other plugins)."""
    plan = item.stash.get(PLAN_KEY, None)
    if plan is None:
        from ..cluster.world import CLUSTER_KEY
        from ..settings import SETTINGS_KEY

        settings = item.config.stash[SETTINGS_KEY]
        plan = make_plan(item, settings.timeout, settings.fresh_ranks, CLUSTER_KEY in item.config.stash)
        item.stash[PLAN_KEY] = plan
    return plan
