"""The toolkit of hardware checks: GPU health from NVML, throughput measurements, floors.

What the shipped suite's ``test_health.py`` and ``test_performance.py`` use, for teams
that write their own hardware checks the same way: read counters (``read_node``), judge
them (``health_rules``), time GEMMs and all_reduce with warm-up and medians
(``measure_gemm``, ``measure_all_reduce``), compare against per-model floors (the
``perf_floors`` fixture gives the ``FloorTable``) and against the node's other GPUs
(``slow_peers``); ask CUDA itself in a child process (``run_probe``), since the pytest
process never creates a CUDA context. GPUs are named with ``gpu_label`` everywhere.
"""

from ..collection.reasons import gpu_count_shortfall
from ..health import rules as health_rules
from ..health.readings import GpuHealth, HealthUnavailable, read_node
from ..health.readings import missing as missing_gpus
from ..health.watch import run_last
from ..node.identity import bare_uuid
from ..node.labels import cuda_ordinal_label, gpu_label
from ..node.probe import run_probe
from ..perf.floors import FloorTable, ModelFloors
from ..perf.measure import (
    ALL_REDUCE_BYTES,
    GemmResult,
    PerfSetup,
    bus_bandwidth_gbps,
    cuda_devices,
    gemm_tflops,
    measure_all_reduce,
    measure_gemm,
)
from ..perf.peers import SlowPeer, slow_peers

__all__ = [
    "ALL_REDUCE_BYTES",
    "FloorTable",
    "GemmResult",
    "GpuHealth",
    "HealthUnavailable",
    "ModelFloors",
    "PerfSetup",
    "SlowPeer",
    "bare_uuid",
    "bus_bandwidth_gbps",
    "cuda_devices",
    "cuda_ordinal_label",
    "gemm_tflops",
    "gpu_count_shortfall",
    "gpu_label",
    "health_rules",
    "measure_all_reduce",
    "measure_gemm",
    "missing_gpus",
    "read_node",
    "run_last",
    "run_probe",
    "slow_peers",
]
