"""One GPU per xdist worker, decided on the controller.

``CUDA_VISIBLE_DEVICES`` is written into each worker's execnet spec, so it is set before the
worker interpreter imports torch, and a worker that crashes is replaced from the same spec:
it keeps its GPU (a ``worker_id % n`` rule computed in the worker would not).

Workers are pinned by UUID (``GPU-...``, or ``MIG-...`` for a MIG device), never by index:
an index means a different board under ``FASTEST_FIRST`` and ``PCI_BUS_ID`` order, and
inside an outer allocation (a Slurm or Kubernetes ``CUDA_VISIBLE_DEVICES``) it means a
position in that list. The UUIDs are those of the devices the controller's own CUDA view
has (identity.py), so an outer allocation is narrowed, never replaced. The controller also
hands every worker the node's whole device list (``GPUCONFORM_NODE_GPUS``), from which
multi-rank tests lease GPUs (engine/gpu_lease.py). The xdist hooks that call these
functions are in xdist_glue.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from . import identity, nvml

NODE_GPUS_ENV = "GPUCONFORM_NODE_GPUS"


def gpu_tokens(environ: Mapping[str, str] | None = None, node: nvml.NodeGpus | None = None) -> list[str]:
    """UUIDs of the devices this process may hand out, in its CUDA ordinal order."""
    environ = os.environ if environ is None else environ
    node = nvml.query(environ) if node is None else node
    if node.status != "ok":
        return []
    return identity.worker_tokens(node.visible)


def auto_num_workers() -> int | None:
    """`-n auto`: one worker per visible GPU; CPU nodes keep xdist's own default."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    tokens = gpu_tokens()
    return len(tokens) or None


def pin_workers_to_gpus(specs, tokens: list[str] | None = None) -> None:
    tokens = gpu_tokens() if tokens is None else tokens
    if not tokens:
        return
    for position, spec in enumerate(specs):
        # A UUID names one board whatever CUDA_DEVICE_ORDER the worker has.
        spec.env["CUDA_VISIBLE_DEVICES"] = tokens[position % len(tokens)]
        # Multi-rank tests in a worker lease whole GPUs from the node's list (engine/gpu_lease.py).
        spec.env[NODE_GPUS_ENV] = ",".join(tokens)


def node_gpu_tokens(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The node's GPU tokens handed down by the xdist controller, or None outside xdist."""
    environ = os.environ if environ is None else environ
    raw = environ.get(NODE_GPUS_ENV)
    if not raw:
        return None
    return [t for t in raw.split(",") if t]
