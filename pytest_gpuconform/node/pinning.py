"""One GPU per xdist worker, decided on the controller.

``CUDA_VISIBLE_DEVICES`` is written into each worker's execnet spec, so it is set before the
worker interpreter imports torch, and a worker that crashes is replaced from the same spec:
it keeps its GPU (a ``worker_id % n`` rule computed in the worker would not).
An outer ``CUDA_VISIBLE_DEVICES`` (a Slurm or Kubernetes allocation) is indexed into,
never replaced. The controller also hands every worker the node's whole GPU list
(``GPUCONFORM_NODE_GPUS``), from which multi-rank tests lease GPUs (engine/gpu_lease.py).
The xdist hooks that call these functions are in xdist_glue.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from . import nvml

NODE_GPUS_ENV = "GPUCONFORM_NODE_GPUS"


def gpu_tokens(environ: Mapping[str, str] | None = None) -> list[str]:
    """The device tokens this process may hand out, in order."""
    environ = os.environ if environ is None else environ
    outer = environ.get("CUDA_VISIBLE_DEVICES")
    node = nvml.query(environ)
    if node.status != "ok":
        return []
    if outer is not None:
        return [t.strip() for t in outer.split(",") if t.strip()][: node.count]
    return [str(g.index) for g in node.visible]


def auto_num_workers() -> int | None:
    """`-n auto`: one worker per visible GPU; CPU nodes keep xdist's own default."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    tokens = gpu_tokens()
    return len(tokens) or None


def pin_workers_to_gpus(specs) -> None:
    tokens = gpu_tokens()
    if not tokens:
        return
    for position, spec in enumerate(specs):
        spec.env["CUDA_VISIBLE_DEVICES"] = tokens[position % len(tokens)]
        spec.env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        # Multi-rank tests in a worker lease whole GPUs from the node's list (engine/gpu_lease.py).
        spec.env[NODE_GPUS_ENV] = ",".join(tokens)


def node_gpu_tokens(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The node's GPU tokens handed down by the xdist controller, or None outside xdist."""
    environ = os.environ if environ is None else environ
    raw = environ.get(NODE_GPUS_ENV)
    if not raw:
        return None
    return [t for t in raw.split(",") if t]
