"""Settings that make CUDA results mean what a comparison assumes, applied for one block.

On CPU both are no-ops. On CUDA:

* an "fp32" reference is only fp32 with TF32 off: cuDNN convolutions use TF32 by default
  and matmuls may (10-bit mantissa), which would put the reference's own error near the
  bf16 bounds it is meant to check;
* two runs of the same ops are bitwise equal only with deterministic algorithms (cuDNN
  and cuBLAS may otherwise pick different kernels or split reductions differently), and
  deterministic cuBLAS needs a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``).
"""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def true_fp32(device):
    import torch

    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


@contextlib.contextmanager
def bitwise_reproducible(device):
    import torch

    if device.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was_on = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=warn_only)
