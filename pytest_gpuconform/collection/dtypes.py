"""The dtype names the `dtype` marker accepts, and what each needs from a device.

Names are resolved to torch dtypes only inside fixtures, so collection stays torch-free.
"""

from __future__ import annotations

CANONICAL = ("fp32", "fp16", "bf16")

_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
}

_TORCH_NAME = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class UnknownDtype(ValueError):
    pass


def canonical(value) -> str:
    """'bf16', 'bfloat16' or torch.bfloat16 -> 'bf16'; anything else raises UnknownDtype."""
    key = str(value).strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    raise UnknownDtype(f"unknown dtype {value!r}; accepted: {', '.join(CANONICAL)} (or torch.float32/float16/bfloat16)")


def to_torch(name: str):
    import torch

    return getattr(torch, _TORCH_NAME[canonical(name)])


def unsupported_reason(name: str, device_kind: str, gpu_bf16: bool) -> str | None:
    """Why this device cannot run this dtype, or None. CPU runs all three in torch >= 2.0."""
    if device_kind == "cuda" and canonical(name) == "bf16" and not gpu_bf16:
        return "bf16 needs compute capability >= 8.0 (Ampere or newer)"
    return None
