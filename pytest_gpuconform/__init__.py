"""pytest-gpuconform: conformance checks that PyTorch training works on this node or cluster.

Importing this package is cheap on purpose: the pytest plugin is loaded in every pytest
run of an environment, so torch and NVML are only imported once ``--gpuconform`` is given.
"""

__version__ = "0.1.0"
