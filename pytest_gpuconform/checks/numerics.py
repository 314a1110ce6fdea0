"""Settings that make CUDA results mean what a comparison assumes, applied for one block.

**TF32.** An "fp32" reference is only fp32 with TF32 off. PyTorch's defaults differ per
library: cuBLAS matmuls do *not* use TF32 (off since torch 1.12), cuDNN convolutions (and
RNNs) *do*. A reference computed with a 10-bit mantissa has an error near the bf16 bounds
it is meant to check, so ``true_fp32`` turns TF32 off for matmuls and cuDNN alike.
torch 2.9 added a per-backend API (``torch.backends.cudnn.conv.fp32_precision = "ieee"``)
and refuses to *read* the legacy flag once the two APIs disagree, so these helpers use the
new API where torch has it and the legacy ``allow_tf32`` flags otherwise, and restore
every switch they touched. On CPU the same block pins oneDNN to IEEE fp32 (a site may
have let it use bf16 or TF32 for fp32 matmuls).

**Bitwise.** Two runs of the same ops on one CUDA stream are bitwise equal when every op
picks the same kernel and no kernel accumulates with atomics in a varying order.
``bitwise_reproducible`` therefore turns on ``torch.use_deterministic_algorithms`` (ops
whose backward uses atomics, such as ``index_add_`` or ``scatter_add_``, then use a
deterministic kernel or raise, naming the op), turns cuDNN benchmarking off (it could
time two different algorithms for the same shape) and sets ``CUBLAS_WORKSPACE_CONFIG``,
which torch demands for deterministic cuBLAS. cuBLAS is bitwise reproducible on one stream
for a given GPU architecture and SM count (cuBLAS documentation, "Results
reproducibility"); the workspace setting matters when streams share a handle, and cuBLAS
reads it when torch creates the handle, so it is best set in the rank's environment
before any CUDA call (``CUBLAS_WORKSPACE_CONFIG`` below; ci/gpu-smoke.sh exports it, the
engine should too). Split-K GEMMs are covered by the same guarantee: for the same shapes
on the same GPU, cuBLAS's heuristics choose the same algorithm and split, and its result
on one stream is bitwise the same (to be confirmed on a GPU run: see README).

Each helper can record what it set (``record``), so a JUnit case says under which
settings its bitwise or fp32 claim was checked. On CPU there is nothing to record.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

CUBLAS_WORKSPACE_CONFIG = ":4096:8"
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")  # the values torch accepts as deterministic

# Per-backend precision switches of torch >= 2.9 ("ieee" = true fp32, "tf32"); the legacy
# flags of older torch are the fallback.
_NEW_API = {
    "cuda": (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn")),
    "cpu": (("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn")),
}


def _switch(torch, backend: str, op: str):
    return getattr(getattr(torch.backends, backend, None), op, None)


def has_precision_api(torch) -> bool:
    conv = _switch(torch, "cudnn", "conv")
    return conv is not None and hasattr(conv, "fp32_precision")


class Tf32State:
    """Every TF32 switch of one device kind, captured so it can be put back exactly.

    Capture and restore never read the legacy flags under the new API (that read raises
    once the APIs are mixed), so a test that set either API cannot break the next one.
    """

    def __init__(self, torch, kind: str = "cuda") -> None:
        self.torch, self.kind = torch, kind
        self.new_api = has_precision_api(torch)
        if self.new_api:
            self.values = {
                (b, o): _switch(torch, b, o).fp32_precision for b, o in _NEW_API[kind] if _switch(torch, b, o)
            }
        elif kind == "cuda":
            self.values = {
                ("cuda", "matmul"): torch.backends.cuda.matmul.allow_tf32,
                ("cudnn", "all"): torch.backends.cudnn.allow_tf32,
            }
        else:
            self.values = {}

    def restore(self) -> None:
        torch = self.torch
        for (backend, op), value in self.values.items():
            if self.new_api:
                _switch(torch, backend, op).fp32_precision = value
            elif backend == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = value
            else:
                torch.backends.cudnn.allow_tf32 = value


def set_tf32(torch, kind: str, allowed: bool) -> None:
    """TF32 on or off for every matmul/convolution/RNN backend of ``kind`` ("cuda", "cpu")."""
    if has_precision_api(torch):
        for backend, op in _NEW_API[kind]:
            switch = _switch(torch, backend, op)
            if switch is not None:
                switch.fp32_precision = "tf32" if allowed else "ieee"
    elif kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allowed
        torch.backends.cudnn.allow_tf32 = allowed


def tf32_description(torch) -> str:
    """The CUDA TF32 switches as one string, for records and messages."""
    state = Tf32State(torch, "cuda")
    if state.new_api:
        return ", ".join(f"{b}.{o}.fp32_precision={v}" for (b, o), v in state.values.items())
    return ", ".join(f"{b}.allow_tf32={v}" for (b, _), v in state.values.items())


@contextlib.contextmanager
def tf32_allowed(device, allowed: bool):
    """TF32 on or off for the block, on ``device``'s kind; the previous switches restored."""
    import torch

    kind = "cuda" if device.type == "cuda" else "cpu"
    state = Tf32State(torch, kind)
    set_tf32(torch, kind, allowed)
    try:
        yield
    finally:
        state.restore()


@contextlib.contextmanager
def true_fp32(device, record: Callable[[str, object], None] | None = None):
    """The block computes fp32 in fp32: TF32 off for cuBLAS, cuDNN convolutions and RNNs on
    CUDA (oneDNN on CPU). ``record``: on CUDA, record ``tf32`` = what was set."""
    import torch

    with tf32_allowed(device, False):
        if record is not None and device.type == "cuda":
            record("tf32", f"off for the fp32 reference ({tf32_description(torch)})")
        yield


def determinism_description(torch) -> str:
    return (
        f"use_deterministic_algorithms(True), cudnn.benchmark=False, "
        f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')}"
    )


@contextlib.contextmanager
def bitwise_reproducible(device, record: Callable[[str, object], None] | None = None):
    """Deterministic kernels for the block (see the module docstring); a no-op on CPU.
    ``record``: on CUDA, record ``cuda_determinism`` = what was set."""
    import torch

    if device.type != "cuda":
        yield
        return
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace not in DETERMINISTIC_CUBLAS:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    was_on = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    if record is not None:
        record("cuda_determinism", determinism_description(torch))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace
