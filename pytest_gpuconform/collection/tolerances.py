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

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


DEFAULTS = {
    "fp32": Tolerance("fp32", rtol=1.3e-6, atol=1e-5, rel_l2=1e-5, loss_rel=1e-5),
    "fp16": Tolerance("fp16", rtol=1e-3, atol=1e-5, rel_l2=5e-3, loss_rel=2e-3),
    "bf16": Tolerance("bf16", rtol=1.6e-2, atol=1e-5, rel_l2=2e-2, loss_rel=1e-2),
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
