"""Integer-valued data whose collective results are exact in every dtype.

A collective check is only as strong as its data: sums of random floats round differently
in every reduction order, so their result has no exact expected value, and a few wrong
elements hide inside any tolerance. Integers inside the range a dtype represents exactly
(2**24 in fp32, 2**11 in fp16, 2**8 in bf16, the whole range of integer dtypes) have one
right answer in every order (nccl-tests' ``#wrong == 0``).

The values come from a closed form of (source, salt, index) rather than an RNG, so every
rank can rebuild every other rank's input, and so the expected result, on any device and
without communicating. They differ between sources and salts (a rank that received another
rank's block, or last call's data, is caught) and along the index (a permutation or a
shifted block is caught).
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed64(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


# Odd multipliers of a 64-bit mixing function (any odd constants with well-spread bits
# would do); the shifts and products wrap in int64, as they would in uint64.
_SPREAD = (_signed64(0x9E3779B97F4A7C15), _signed64(0xC2B2AE3D27D4EB4F), _signed64(0x165667B19E3779F9))
_MIX = (_signed64(0xBF58476D1CE4E5B9), _signed64(0x94D049BB133111EB))


def exact_integer_bound(dtype: torch.dtype) -> int:
    """The largest n such that every integer in [-n, n] ([0, n] for unsigned dtypes) is
    exactly representable: 2**(mantissa bits + 1) for floating types, the maximum otherwise."""
    if dtype.is_floating_point:
        mantissa_bits = round(-torch.log2(torch.tensor(torch.finfo(dtype).eps, dtype=torch.float64)).item())
        return 2 ** (mantissa_bits + 1)
    return int(torch.iinfo(dtype).max)


def is_unsigned(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and dtype != torch.bool and torch.iinfo(dtype).min == 0


def value_range(dtype: torch.dtype, divisor: int = 1) -> tuple[int, int]:
    """[low, high] of integers exact in ``dtype`` after ``divisor`` of them are summed:
    each value within the bound divided by ``divisor`` (the world size, for a sum)."""
    high = exact_integer_bound(dtype) // divisor
    return (0 if is_unsigned(dtype) else -high), high


def _hashed(count: int, source: int, salt: int, device) -> torch.Tensor:
    """A well-mixed int64 per index, different for every (source, salt)."""
    index = torch.arange(count, dtype=torch.int64, device=device)
    h = index * _SPREAD[0] + _signed64(source * _SPREAD[1] + salt * _SPREAD[2] + 1)
    for multiplier, shift in zip(_MIX, (30, 27), strict=True):
        h = (h ^ _logical_right_shift(h, shift)) * multiplier
    return h ^ _logical_right_shift(h, 31)


def _logical_right_shift(h: torch.Tensor, shift: int) -> torch.Tensor:
    """Unsigned >> on int64: torch's >> is arithmetic, so mask off the copied sign bits."""
    return (h >> shift) & ((1 << (64 - shift)) - 1)


def integer_values(count: int, low: int, high: int, *, source: int, salt: int = 0, device="cpu") -> torch.Tensor:
    """``count`` int64 values in [low, high], a fixed function of (source, salt, index).

    Cast to the dtype under test only after the expected result is computed in int64."""
    if high < low:
        raise ValueError(f"empty range [{low}, {high}]")
    span = min(high - low + 1, (1 << 63) - 1)
    return low + torch.remainder(_hashed(count, source, salt, device), span)


def bit_patterns(count: int, dtype: torch.dtype, *, source: int, salt: int = 0, device="cpu") -> torch.Tensor:
    """``count`` values of an integer dtype with well-mixed bits over its whole width, for
    bitwise reductions (a reduction that dropped the top bits, or worked in a narrower
    type, changes the result)."""
    if dtype.is_floating_point:
        raise TypeError(f"bit patterns are integer data; got {dtype}")
    h = _hashed(count, source, salt, device)
    bits = torch.iinfo(dtype).bits
    if bits == 64:
        return h.to(dtype)
    low = torch.iinfo(dtype).min
    return (low + torch.remainder(h, 1 << bits)).to(dtype)
