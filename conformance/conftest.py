"""Fixtures shared by the shipped suite's modules (the plugin's own fixtures are in
pytest_gpuconform/fixtures.py)."""

import pytest


@pytest.fixture(scope="session")
def cuda_probe(node_inventory):
    """CUDA's own view of the node, asked once in a child process (the controller never
    creates a CUDA context). Skips on nodes where NVML sees no GPU."""
    if node_inventory.node.count == 0:
        pytest.skip(f"NVML sees no GPU on this node ({node_inventory.node.message})")
    from pytest_gpuconform.checks.hardware import run_probe

    return run_probe()


@pytest.fixture
def one_intra_op_thread():
    """Run the test with one intra-op thread. The single-device models of the suite are
    tiny: torch's intra-op threads only add contention (on a busy 2-core box two threads
    made checks 10-100x slower), and the numerics compared do not depend on the thread
    count, since both sides of every comparison run with the same setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
