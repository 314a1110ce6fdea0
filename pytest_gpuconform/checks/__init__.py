"""The public API for check authors: what the shipped suite uses, and what your own checks use.

The shipped conformance suite imports its helpers from here and nowhere else in the plugin,
so a team writing its own multi-rank checks has exactly the same tools (README: "Writing
your own checks"). Everything listed in ``__all__`` is kept stable; the modules behind it
are not.

* Comparisons (``compare``): exact (``mismatch``), torch.testing's rule (``not_close``,
  ``WithinTolerance``), relative L2 (``relative_l2``, ``too_far``), nested objects
  (``structure_mismatch``). Each returns ``None`` or a one-line account of where and how
  large the difference is.
* Exact multi-rank checks (``exact_tally``): ``ExactTally`` counts wrong elements over many
  comparisons and turns them into one verdict, recording ``wrong_elements`` and the worst rank.
* Integer-valued data (``integer_data``): values exact in every dtype (``value_range``,
  ``exact_integer_bound``), rebuilt from (source, salt) on any rank (``integer_values``,
  ``bit_patterns``).
* Bandwidth (``bandwidth``): nccl-tests' algbw / busbw (``measure_bandwidth``, ``bus_factor``).
* Rank verdicts (``rank_verdicts``): every rank states what it found, all ranks fail
  together (``raise_if_any``; ``summarize_problems`` puts many problems in one line);
  bitwise agreement with rank 0 (``same_on_all_ranks``); gathering one number or string
  from every rank (``gather_float``, ``gather_text``).
* CUDA numerics (``numerics``): true fp32 references (``true_fp32``: TF32 off for cuBLAS
  and cuDNN on CUDA, oneDNN held to IEEE fp32 on CPU) and bitwise-reproducible blocks
  (``bitwise_reproducible``: deterministic kernels on CUDA, nothing to do on CPU); pass
  ``record`` to either and the JUnit case says what was set.
* Memory (``memory``): ``MemoryMeter``, bytes a block keeps alive on any device.
* Dispatched ops (``dispatch``): ``recorded_ops``, which aten ops a block ran and in which
  dtypes (the kernel that really ran, the precision it really ran in).
* ``Tolerance``: the row type of the tolerance table the ``tolerance`` fixture returns.
* ``hardware`` (import it as a module): NVML health, throughput timing, performance floors
  and peer comparison, as the shipped hardware checks use them.
"""

from ..collection.tolerances import Tolerance
from .bandwidth import Bandwidth, bus_factor, measure_bandwidth
from .compare import WithinTolerance, mismatch, not_close, relative_l2, structure_mismatch, too_far
from .dispatch import recorded_ops
from .exact_tally import ExactTally
from .integer_data import bit_patterns, exact_integer_bound, integer_values, is_unsigned, value_range
from .memory import MemoryMeter, MemoryReading
from .numerics import bitwise_reproducible, true_fp32
from .rank_verdicts import (
    collective_device,
    gather_float,
    gather_text,
    raise_if_any,
    same_on_all_ranks,
    summarize_problems,
)

__all__ = [
    "Bandwidth",
    "ExactTally",
    "MemoryMeter",
    "MemoryReading",
    "Tolerance",
    "WithinTolerance",
    "bit_patterns",
    "bitwise_reproducible",
    "bus_factor",
    "collective_device",
    "exact_integer_bound",
    "gather_float",
    "gather_text",
    "integer_values",
    "is_unsigned",
    "measure_bandwidth",
    "mismatch",
    "not_close",
    "raise_if_any",
    "recorded_ops",
    "relative_l2",
    "same_on_all_ranks",
    "summarize_problems",
    "structure_mismatch",
    "too_far",
    "true_fp32",
    "value_range",
]
