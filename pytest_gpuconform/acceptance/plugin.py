"""The acceptance spec's checks as test items: one per declared field.

``gpuconform-spec::gpu_count``, ``gpuconform-spec::software_driver``, ... (the spec key with
``_`` for ``.``, which pytest would show as ``::``): ordinary test
cases in the terminal, JUnit, the page and every other output, selectable with ``-k`` and
run in the pytest process (they read NVML and the inventory, never CUDA). They are added
to the collection whatever paths were given, because a spec is about the node, not about a
test suite. A failure is one line, expected against found (judge.py).
"""

from __future__ import annotations

from functools import cached_property

import pytest

from ..health import readings
from ..node.inventory import INVENTORY_KEY, Inventory
from .judge import NodeFacts, host_cpu_cores, host_memory_gib, problem
from .spec import Requirement, Spec

COLLECTOR_NAME = "gpuconform-spec"
FEATURE = "spec"


def item_name(key: str) -> str:
    """``gpu.count`` -> ``gpu_count``: pytest's progress lines turn a dot into ``::``."""
    return key.replace(".", "_")


class SpecMismatch(Exception):
    """The node does not meet one requirement of the spec."""


def node_facts(inventory: Inventory) -> NodeFacts:
    node = inventory.node
    found: dict[str, dict] = {}
    not_applicable: dict[str, dict[str, str]] = {}
    error = ""
    if node.gpus:
        try:
            for gpu in readings.read_node(None):
                found[gpu.uuid] = gpu.values
                not_applicable[gpu.uuid] = gpu.not_applicable
        except readings.HealthUnavailable as exc:
            error = str(exc)
    properties = dict(inventory.properties())
    cores = properties.get("cpu_cores")
    memory = properties.get("host_memory_gib")
    return NodeFacts(
        gpus=tuple(node.gpus),
        nvml_status=node.status,
        nvml_message=node.message,
        versions={
            "driver": node.driver_version,
            "torch_cuda": inventory.torch_cuda,
            "driver_cuda": node.cuda_driver_version,
            "nccl": inventory.nccl,
            "torch": inventory.torch,
        },
        readings=found,
        readings_error=error,
        cpu_cores=int(float(cores)) if cores else host_cpu_cores(),
        host_memory_gib=float(memory) if memory else host_memory_gib(),
        not_applicable=not_applicable,
    )


class SpecCollector(pytest.Collector):
    def collect(self):  # pragma: no cover - the items are made by SpecChecks, not collected
        return []


class SpecItem(pytest.Item):
    def __init__(self, *, requirement: Requirement, spec: Spec, plugin: SpecChecks, **kwargs) -> None:
        super().__init__(**kwargs)
        self.requirement = requirement
        self.spec = spec
        self.plugin = plugin
        self.user_properties.append(("feature", FEATURE))
        self.user_properties.append(("expected", requirement.expected_text()))

    def runtest(self) -> None:
        found = problem(self.requirement, self.plugin.facts)
        if found:
            raise SpecMismatch(f"spec {self.spec.name} ({self.spec.path}): {found}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, SpecMismatch):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.spec.path, None, f"{COLLECTOR_NAME}::{self.name}"


class SpecChecks:
    """Adds the spec's items (registered by plugin.py when --gpuconform-spec is given)."""

    PLUGIN_NAME = "gpuconform-spec"

    def __init__(self, config: pytest.Config, spec: Spec) -> None:
        self.config = config
        self.spec = spec

    @cached_property
    def facts(self) -> NodeFacts:
        return node_facts(self.config.stash[INVENTORY_KEY])

    # tryfirst, and registered before the collection policy: these items are in place before
    # -k / -m deselect and the policy's own hook run.
    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        collector = SpecCollector.from_parent(session, name=COLLECTOR_NAME, nodeid=COLLECTOR_NAME)
        made = [
            SpecItem.from_parent(
                collector, name=item_name(requirement.key), requirement=requirement, spec=self.spec, plugin=self
            )
            for requirement in self.spec.requirements
        ]
        items[:0] = made
