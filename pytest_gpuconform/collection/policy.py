"""Collection-time decisions of an enabled run: parameters, plans, skips, properties.

For every item: its ``TestPlan`` (plan.py), its context properties at the front of its
JUnit properties, and whether this node can run it. A test the node cannot run is skipped
with the reason, except under strict acceptance (``--gpuconform-expect-gpus N`` on a node
with fewer GPUs), where a missing GPU fails the test in its call phase, so JUnit shows a
``<failure>`` rather than an ``<error>``.

In a rank of the engine (``rank_mode``) only the parameters and plans are made: the
controller already decided that the test runs, and it owns the JUnit properties.
"""

from __future__ import annotations

import pytest

from ..node.inventory import Inventory
from ..node.pinning import node_gpu_tokens
from ..settings import Settings
from . import parametrize
from .plan import CLUSTER, PLAN_KEY, TestPlan, make_plan
from .reasons import dtype_shortfall, gpu_capability_shortfall, gpu_count_shortfall

STRICT_FAILURE: pytest.StashKey[str] = pytest.StashKey()


class CollectionPolicy:
    PLUGIN_NAME = "gpuconform-collection"

    def __init__(self, settings: Settings, inventory: Inventory, cluster_world, rank_mode: bool = False) -> None:
        self.settings = settings
        self.node = inventory.node
        self.cluster_world = cluster_world  # cluster/world.py ClusterWorld, or None
        self.rank_mode = rank_mode

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        parametrize.generate(metafunc)

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session, config, items) -> None:
        for item in items:
            plan = make_plan(item, self.settings.timeout, self.settings.fresh_ranks, self.cluster_world is not None)
            item.stash[PLAN_KEY] = plan
            if self.rank_mode:
                continue
            item.user_properties[:0] = plan.properties()
            if plan.unparametrizable_sizes:
                item.stash[STRICT_FAILURE] = (
                    f"world_size{plan.unparametrizable_sizes} on a unittest.TestCase method: pytest cannot "
                    "parametrize unittest tests, so the marker must name exactly one world size"
                )
                continue
            self._apply_requirements(item, plan)

    def gpu_reason(self, plan: TestPlan) -> tuple[str | None, bool]:
        """(reason this test cannot run here, whether the reason is missing GPUs)."""
        device, need = plan.device, plan.gpu_need
        ranks = plan.world_size or 1
        in_cluster_world = plan.placement == CLUSTER
        if in_cluster_world:
            reason = self._cluster_reason(ranks, device)
            if reason:
                return reason, False
        n = max(need.n if need else 0, ranks if device == "cuda" else 0)
        if n and not in_cluster_world:  # a cluster world's GPUs are spread over its nodes
            tokens = node_gpu_tokens() if plan.multi_rank else None
            reason = gpu_count_shortfall(self.node, n, None if tokens is None else len(tokens))
            if reason:
                return reason, True
        if n > 1 and not in_cluster_world and any(g.is_mig for g in self.node.visible[:n]):
            # Peer-to-peer and CUDA IPC, which NCCL's transports use, do not work between
            # MIG devices; and every rank would need a device list of its own.
            return (
                f"needs {n} whole GPUs; the visible devices are MIG slices, between which "
                "NCCL cannot communicate (run multi-rank checks with MIG off)"
            ), False
        if need:
            reason = gpu_capability_shortfall(self.node, need)
            if reason:
                return reason, False
        if plan.dtype is not None and device:
            reason = dtype_shortfall(self.node, plan.dtype, device, max(n, 1))
            if reason:
                return reason, False
        cpu_ranks = self.settings.cpu_ranks
        if device == "cpu" and plan.multi_rank and ranks > cpu_ranks and not in_cluster_world:
            return (
                f"needs {ranks} gloo ranks; this CPU node hosts at most {cpu_ranks} (--gpuconform-cpu-ranks)"
            ), False
        return None, False

    def _cluster_reason(self, ranks: int, device: str | None) -> str | None:
        world = self.cluster_world
        if ranks != world.world_size:
            return (
                f"needs world size {ranks}; {world.launcher} launched {world.world_size} ranks "
                "(cluster mode runs only tests whose size equals the launched world)"
            )
        wanted = "cuda" if world.backend == "nccl" else "cpu"
        if device != wanted:
            return f"cluster world uses {world.backend} ({wanted}); the {device} variant runs in per-node mode"
        return None

    def _apply_requirements(self, item: pytest.Item, plan: TestPlan) -> None:
        reason, missing_gpus = self.gpu_reason(plan)
        if reason is None:
            return
        expect = self.settings.expect_gpus
        if missing_gpus and self.node.count < expect:
            item.stash[STRICT_FAILURE] = f"strict acceptance (--gpuconform-expect-gpus {expect}): {reason}"
        else:
            item.add_marker(pytest.mark.skip(reason=reason))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        # In the call phase, not setup, so JUnit shows a <failure>, not an <error>.
        message = item.stash.get(STRICT_FAILURE, None)
        if message:
            pytest.fail(message, pytrace=False)
