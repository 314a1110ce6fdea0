"""How two tensors differ, in one line: exact comparisons and the table's tolerances.

Every check in the distributed suite reports through these, so failure messages have one
shape: what was compared, how many elements are off, where the worst one is, the measured
difference and the bound it broke.
"""

from __future__ import annotations

import torch


def mismatch(got: torch.Tensor, want: torch.Tensor, what: str) -> str | None:
    """Element-wise exact comparison: None when bitwise equal, else a one-line account.

    Counts the wrong elements (nccl-tests' ``#wrong``) and names the first one and the
    largest absolute difference, because "1 wrong element at 1 MiB" and "everything is
    garbage" are different failures for an operator.
    """
    got, want = got.detach().reshape(-1), want.detach().reshape(-1)
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    if torch.equal(got, want):
        return None
    wrong = got != want
    if not bool(wrong.any()):  # equal values but torch.equal disagreed: -0.0 vs 0.0 or NaN
        wrong = _bits(got) != _bits(want)
    count = int(wrong.sum())
    first = int(wrong.nonzero()[0, 0])
    diff = (got.double() - want.double()).abs()
    worst = float(diff[wrong].max())
    return (
        f"{what}: #wrong={count} of {got.numel()} elements, first at [{first}]: "
        f"got {got[first].item()!r} expected {want[first].item()!r}, max |diff|={worst:.6g} (bound: exact)"
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's bit pattern (for -0.0 / NaN payload differences)."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size())
    return t.view(as_int) if t.is_floating_point() and as_int is not None else t


def not_close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, what: str) -> str | None:
    """torch.testing.assert_close's rule, |got - want| <= atol + rtol * |want| element-wise:
    None when it holds, else one line with the count of violations and the worst one."""
    got, want = got.detach().reshape(-1).double(), want.detach().reshape(-1).double()
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    diff = (got - want).abs()
    allowed = atol + rtol * want.abs()
    bad = ~(diff <= allowed)  # NaN counts as bad
    if not bool(bad.any()):
        return None
    excess = torch.where(bad, (diff - allowed).nan_to_num(float("inf")), torch.zeros_like(diff))
    worst = int(excess.argmax())
    return (
        f"{what}: {int(bad.sum())} of {got.numel()} elements outside tolerance, worst at [{worst}]: "
        f"got {got[worst].item():.8g} expected {want[worst].item():.8g}, |diff|={diff[worst].item():.3g} "
        f"> bound {allowed[worst].item():.3g} (atol={atol:g}, rtol={rtol:g})"
    )


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, the table's rel_l2 measure for results that are rounded
    differently on purpose (compression hooks, autocast)."""
    got, want = got.detach().double(), want.detach().double()
    norm = want.norm().item()
    return (got - want).norm().item() / norm if norm else (got - want).norm().item()


def too_far(got: torch.Tensor, want: torch.Tensor, bound: float, what: str) -> str | None:
    """None when relative_l2(got, want) <= bound, else one line with the measured value."""
    measured = relative_l2(got, want)
    if measured <= bound:
        return None
    return f"{what}: rel_l2={measured:.3g} > bound {bound:g}"


class WithinTolerance:
    """``not_close`` as a judge that also remembers how much of the tolerance was used:
    max |got - want| / (atol + rtol * |want|) over everything it compared (<= 1 passes).
    That one number says how close a passing run came to failing."""

    def __init__(self, rtol: float, atol: float) -> None:
        self.rtol, self.atol = rtol, atol
        self.used = 0.0

    def __call__(self, got: torch.Tensor, want: torch.Tensor, what: str) -> str | None:
        diff = (got.detach().double() - want.detach().double()).abs()
        allowed = self.atol + self.rtol * want.detach().double().abs()
        if diff.numel():
            self.used = max(self.used, (diff / allowed).max().item())
        return not_close(got, want, self.rtol, self.atol, what)


def structure_mismatch(got, want, what: str) -> str | None:
    """Exact comparison of nested Python objects (dicts, lists, tuples, sets, dataclasses,
    tensors, scalars): None when equal in type, structure and value, else one line naming
    the path of the first difference (``what['layers'][1].bias``) and how it differs.

    Object collectives (checkpoint metadata, configs) travel pickled; a broken path shows
    as a wrong type (a tuple arriving as a list), a lost key, or a tensor whose dtype or
    values changed, and the path says which."""
    import dataclasses

    if type(got) is not type(want):
        return f"{what}: type {type(got).__name__} != expected {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        if got.dtype != want.dtype or got.shape != want.shape:
            return f"{what}: tensor {got.dtype} {tuple(got.shape)} != expected {want.dtype} {tuple(want.shape)}"
        return mismatch(got.cpu(), want.cpu(), what)
    if isinstance(want, dict):
        if list(got) != list(want):
            return f"{what}: keys {list(got)!r} != expected {list(want)!r}"
        return _first(structure_mismatch(got[k], want[k], f"{what}[{k!r}]") for k in want)
    if isinstance(want, (list, tuple)):
        if len(got) != len(want):
            return f"{what}: length {len(got)} != expected {len(want)}"
        return _first(structure_mismatch(g, w, f"{what}[{i}]") for i, (g, w) in enumerate(zip(got, want, strict=True)))
    if dataclasses.is_dataclass(want):
        return _first(
            structure_mismatch(getattr(got, f.name), getattr(want, f.name), f"{what}.{f.name}")
            for f in dataclasses.fields(want)
        )
    if got != want:
        return f"{what}: got {got!r} expected {want!r}"
    return None


def _first(problems) -> str | None:
    return next((p for p in problems if p), None)
