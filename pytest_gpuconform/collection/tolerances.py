"""The one tolerance table of the suite, and how sites override it.

Every approximate comparison in the shipped suite reads its bound from here; exact checks
(integer-valued collectives, checkpointing on CPU, DDP parameter agreement) use no table.

Sources: ``rtol``/``atol`` are torch.testing.assert_close's own per-dtype defaults.
``rel_l2`` (||x - ref|| / ||ref|| per tensor, vs an fp32 reference) and ``loss_rel``
(relative loss difference of a short training run) come from measuring autocast against
fp32 on CPU, with head room of about 3x-4x: the worst gradient rel-L2 of the suite's
transformer-like block was ~5.7e-3 under bf16 (8 mantissa bits: unit roundoff 2^-8 ~ 3.9e-3)
and ~1.2e-3 under fp16 (11 bits: 2^-11 ~ 4.9e-4), accumulated over a few layers.
``rel_l2`` for fp32 bounds reorderings (DDP vs one process, pipelines vs the whole model).

``sdpa_out_rel_l2`` / ``sdpa_grad_rel_l2`` bound a ``scaled_dot_product_attention`` backend
(output; gradients of q, k, v) against the math backend in fp64 on the same rounded inputs.
For fp16/bf16 they are 2u and 4u, u the unit roundoff (2^-11, 2^-8): measured on CPU
(torch 2.13, B=2 H=4 T=64..256 D=32..64, causal and boolean mask) the math backend in the
low dtype is at ~0.43u (the output's own rounding) and the CPU flash kernel at <= 0.6u
(output) and <= 0.9u (gradients); PyTorch's test_transformers.py allows fused kernels a
few times the low-precision math backend's error as well (its fudge factors, larger for
the gradients). fp32 errors come from accumulation (~3e-7 measured), bounded by the fp32
rel_l2.

Overrides: ini ``gpuconform_tolerances`` (one ``DTYPE:KEY=VALUE[,KEY=VALUE]`` per line),
then ``--gpuconform-tolerance`` (repeatable), which wins.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from . import dtypes


@dataclass(frozen=True)
class Tolerance:
    dtype: str
    rtol: float
    atol: float
    rel_l2: float
    loss_rel: float
    sdpa_out_rel_l2: float  # attention output vs the math backend in fp64 (module docstring)
    sdpa_grad_rel_l2: float  # its gradients, which accumulate over more reductions

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# SDPA: fp32 from accumulation; fp16 and bf16 at 2 and 4 unit roundoffs (2^-11, 2^-8).
DEFAULTS = {
    "fp32": Tolerance(
        "fp32", rtol=1.3e-6, atol=1e-5, rel_l2=1e-5, loss_rel=1e-5, sdpa_out_rel_l2=1e-5, sdpa_grad_rel_l2=1e-5
    ),
    "fp16": Tolerance(
        "fp16",
        rtol=1e-3,
        atol=1e-5,
        rel_l2=5e-3,
        loss_rel=2e-3,
        sdpa_out_rel_l2=2 * 2.0**-11,
        sdpa_grad_rel_l2=4 * 2.0**-11,
    ),
    "bf16": Tolerance(
        "bf16",
        rtol=1.6e-2,
        atol=1e-5,
        rel_l2=2e-2,
        loss_rel=1e-2,
        sdpa_out_rel_l2=2 * 2.0**-8,
        sdpa_grad_rel_l2=4 * 2.0**-8,
    ),
}

_KEYS = tuple(f.name for f in fields(Tolerance) if f.name != "dtype")


class BadTolerance(ValueError):
    pass


def parse_override(text: str) -> tuple[str, dict[str, float]]:
    """'bf16:rtol=2e-2,rel_l2=1e-2' -> ('bf16', {'rtol': 0.02, 'rel_l2': 0.01})."""
    name, sep, body = text.partition(":")
    if not sep or not body.strip():
        raise BadTolerance(f"tolerance override {text!r}: expected DTYPE:KEY=VALUE[,KEY=VALUE]")
    try:
        dtype = dtypes.canonical(name)
    except dtypes.UnknownDtype as exc:
        raise BadTolerance(f"tolerance override {text!r}: {exc}") from None
    values: dict[str, float] = {}
    for pair in body.split(","):
        key, eq, raw = (part.strip() for part in pair.partition("="))
        if key not in _KEYS or not eq:
            raise BadTolerance(f"tolerance override {text!r}: key {key!r} is not one of {', '.join(_KEYS)}")
        try:
            value = float(raw)
        except ValueError:
            raise BadTolerance(f"tolerance override {text!r}: {raw!r} is not a number") from None
        if not value >= 0:
            raise BadTolerance(f"tolerance override {text!r}: {key} must be >= 0")
        values[key] = value
    return dtype, values


def build_table(overrides: list[str]) -> dict[str, Tolerance]:
    table = dict(DEFAULTS)
    for text in overrides:
        dtype, values = parse_override(text)
        table[dtype] = replace(table[dtype], **values)  # type: ignore[arg-type]
    return table
