"""Fixtures shared by the shipped suite's modules (the plugin's own fixtures are in
pytest_gpuconform.fixtures)."""

import pytest


@pytest.fixture(scope="session")
def cuda_probe(node_inventory):
    """CUDA's own view of the node, asked once in a child process (the controller never
    creates a CUDA context). Skips on nodes where NVML sees no GPU."""
    if node_inventory.node.count == 0:
        pytest.skip(f"NVML sees no GPU on this node ({node_inventory.node.message})")
    from pytest_gpuconform.probe import run_probe

    return run_probe()
