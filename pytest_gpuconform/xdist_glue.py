"""Everything the plugin does with pytest-xdist, in one place.

``XdistRole`` answers "which xdist process is this?" for every module that cares (reports
are written by the controller, health counters are compared there once more, baselines
are saved there). ``XdistGlue`` holds the xdist hooks; plugin.py registers it only when
the xdist plugin is active, as pytest-randomly does, so nothing here runs otherwise.

On a GPU node each worker owns one GPU: the controller pins worker N to a GPU by UUID through
its execnet spec (so ``CUDA_VISIBLE_DEVICES`` is set before the worker imports torch, a
restarted worker keeps its GPU, and the UUID means the same board whatever the worker's
``CUDA_DEVICE_ORDER``) and hands every worker the node's GPU list, from which
multi-rank tests lease whole GPUs (engine/gpu_lease.py). ``-n auto`` means one worker per
GPU; xdist resolves it before ``pytest_configure``, so that one hook is declared in plugin.py
and answered by ``XdistGlue.auto_num_workers``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


class XdistRole:
    """Which process of an xdist run this is, from the configuration alone."""

    @staticmethod
    def is_worker(config: pytest.Config) -> bool:
        return hasattr(config, "workerinput")

    @staticmethod
    def workers(config: pytest.Config) -> int:
        """How many workers this (controller) process starts; 0 without -n."""
        if XdistRole.is_worker(config):
            return 0
        value = getattr(config.option, "numprocesses", None)
        return value if isinstance(value, int) and value > 0 else 0

    @staticmethod
    def is_controller(config: pytest.Config) -> bool:
        return XdistRole.workers(config) > 0


class XdistGlue:
    PLUGIN_NAME = "gpuconform-xdist"

    def __init__(self, config: pytest.Config, worker_input: Callable[[], dict[str, Any]]) -> None:
        self.config = config
        self.worker_input = worker_input  # what every worker gets from the controller (health/watch.py)

    @staticmethod
    def auto_num_workers() -> int | None:
        """`-n auto`: one worker per visible GPU; CPU nodes keep xdist's own default."""
        from .node.pinning import auto_num_workers

        return auto_num_workers()

    def check_usage(self, cluster_world, node) -> None:
        """-n with cluster mode, or more workers than GPUs, is a usage error (exit code 4)."""
        workers = XdistRole.workers(self.config)
        if not workers:
            return
        if cluster_world is not None:
            raise pytest.UsageError(
                f"-n {workers} cannot be combined with cluster mode ({cluster_world.launcher} started "
                f"{cluster_world.world_size} ranks): every rank must run the same tests in the same order; "
                "drop -n (or pass --gpuconform-cluster off for independent per-node runs)"
            )
        if node.count and workers > node.count:
            raise pytest.UsageError(
                f"-n {workers} on a node with {node.count} visible GPU(s) would make workers share GPUs; "
                f"use -n auto (one worker per GPU) or -n {node.count} or fewer"
            )

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_setupnodes(self, config: pytest.Config, specs) -> None:
        """Pin from the run's inventory, so workers get exactly the GPUs the header listed."""
        from .node.inventory import INVENTORY_KEY
        from .node.pinning import gpu_tokens, pin_workers_to_gpus

        inventory = config.stash.get(INVENTORY_KEY, None)
        pin_workers_to_gpus(specs, gpu_tokens(node=inventory.node) if inventory is not None else None)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        """Give each worker the run's GPUs and the controller's health snapshot: a worker's
        own view is pinned to one GPU, and the comparison at the end needs the start."""
        node.workerinput.update(self.worker_input())
