"""Which aten ops a block of code ran, and in which dtypes: evidence of what really ran.

A numerical comparison alone cannot tell some silent substitutions apart: a mixed-precision
policy that is ignored computes in fp32 and lands *closer* to the fp32 reference, and an
attention call that falls back from a fused kernel to the math backend gives the right
numbers from the wrong kernel. Recording the dispatched ops (a ``TorchDispatchMode``, which
sees ops after autograd and composite decomposition, in forward and backward) turns "which
kernel ran, in which dtype" into something a check can assert.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator


@contextlib.contextmanager
def recorded_ops() -> Iterator[dict[str, set]]:
    """``with recorded_ops() as ops: ...`` -> ``ops`` maps each aten op name that ran
    (``"mm"``, ``"_scaled_dot_product_flash_attention_for_cpu_backward"``) to the set of
    dtypes of its floating-point tensor inputs."""
    ops: dict[str, set] = {}
    with _recorder_class()(ops):
        yield ops


@functools.cache
def _recorder_class():
    """Built on first use: the plugin must not import torch before a test asks."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class OpRecorder(TorchDispatchMode):
        def __init__(self, ops: dict) -> None:
            super().__init__()
            self.ops = ops

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            dtypes = self.ops.setdefault(func.overloadpacket.__name__, set())
            dtypes.update(
                t.dtype for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()
            )
            return func(*args, **(kwargs or {}))

    return OpRecorder
