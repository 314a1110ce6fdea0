"""Which recorded properties are measured numbers worth showing, and what bounds them.

Checks attach numbers with ``record(name, value)``; their names are chosen by each check's
author, so the report, its charts and the terminal summary cannot know them in advance.
They pick the numbers that matter by one naming rule instead:

* ``X`` and ``X_bound`` (also ``X_max``, ``X_tol``, ``X_threshold``): X is measured and must
  stay at or below the bound (an error against its tolerance, a memory ratio against its
  analytic bound).
* ``X`` and ``X_min`` (also ``X_floor``): X must stay at or above the bound (a bandwidth
  against its floor).
* A bound with no exact partner, named ``B_bound`` or ``bound_B`` (upper) or ``B_floor``
  (lower), bounds every measure whose name contains B as whole words: ``rel_l2_bound``
  bounds ``output_rel_l2`` and ``max_grad_rel_l2``; ``bound_rel_l2`` bounds
  ``max_rel_l2_vs_single_process``. (``_max`` / ``_min`` / ``_tol`` / ``_threshold`` pair
  exactly only: ``err_max`` alone may well be a measurement.)
* ``X_ratio`` with no bound: a ratio worth showing on its own (a memory ratio).
* ``X_tflops`` / ``X_gbps`` (any case) with no bound: a throughput, shown as well (the
  terminal summary, the page's distributions) and kept by baselines.

Everything else that is numeric is still a measurement (it stays in the JUnit properties)
but is not a *key* number. The properties the plugin attaches to every test (feature,
device, dtype, world size, backend) are context, never measurements.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..collection.plan import CONTEXT_PROPERTIES

# The properties the plugin attaches to every test case (collection/plan.py): context.
CONTEXT_KEYS = frozenset(CONTEXT_PROPERTIES)

UPPER_BOUND_SUFFIXES = ("_bound", "_max", "_tol", "_threshold")
LOWER_BOUND_SUFFIXES = ("_min", "_floor")
BOUND_PREFIX = "bound_"
# Names that can only be bounds, so they may also bound every measure that contains their base.
LOOSE_SUFFIXES = ("_bound", "_floor")
RATIO_SUFFIX = "_ratio"
THROUGHPUT_SUFFIXES = ("_tflops", "_gbps")


def is_throughput(name: str) -> bool:
    return name.lower().endswith(THROUGHPUT_SUFFIXES)


@dataclass(frozen=True)
class Measure:
    name: str
    value: float
    bound: float | None = None
    kind: str | None = None  # "upper" (value <= bound), "lower" (value >= bound) or None

    @property
    def is_key(self) -> bool:
        return self.bound is not None or self.name.endswith(RATIO_SUFFIX)

    @property
    def within(self) -> bool | None:
        """True/False against the bound (NaN is never within); None when there is no bound."""
        if self.bound is None:
            return None
        return self.value <= self.bound if self.kind == "upper" else self.value >= self.bound

    @property
    def use_of_bound(self) -> float | None:
        """How much of the allowance is used: 1.0 at the bound, above 1 past it."""
        if self.bound is None:
            return None
        if math.isnan(self.value):
            return math.inf
        if self.kind == "upper":
            if self.bound > 0:
                return self.value / self.bound
            return math.inf if self.value > 0 else 0.0
        return self.bound / self.value if self.value > 0 else math.inf

    def describe(self) -> str:
        """``name=value``, or against the bound: ``name=value<=bound`` when within it,
        ``name=value>bound!`` when past it (the ``!`` marks the out-of-bound numbers)."""
        text = f"{self.name}={number(self.value)}"
        if self.bound is None:
            return text
        if math.isnan(self.value):
            relation = " vs bound " + ("<=" if self.kind == "upper" else ">=")
        elif self.kind == "upper":
            relation = "<=" if self.within else ">"
        else:
            relation = ">=" if self.within else "<"
        return text + relation + number(self.bound) + ("" if self.within else "!")


def number(value: float) -> str:
    """Short, exact-enough text of a measured number (4 significant digits)."""
    return f"{value:.4g}"


def as_float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        result = float(value)
    else:
        try:
            result = float(str(value).strip())
        except ValueError:
            return None
    return result  # nan and inf kept: a NaN error is exactly what a report must show


def _bound_target(name: str) -> tuple[str, str, bool] | None:
    """(base name, kind, whether the base must match exactly) if ``name`` reads as a bound."""
    if name.startswith(BOUND_PREFIX):
        return name[len(BOUND_PREFIX) :], "upper", False
    for suffix in UPPER_BOUND_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], "upper", suffix not in LOOSE_SUFFIXES
    for suffix in LOWER_BOUND_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], "lower", suffix not in LOOSE_SUFFIXES
    return None


def _contains_words(name: str, base: str) -> bool:
    words, wanted = name.split("_"), base.split("_")
    return any(words[i : i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1))


def measures(properties: Iterable[tuple[str, object]]) -> list[Measure]:
    """All numeric measurements among ``properties``, each joined with its bound (if any).

    When a name repeats, the last value wins (a check that records a number twice means
    the later one).
    """
    numeric: dict[str, float] = {}
    for name, value in properties:
        if name in CONTEXT_KEYS:
            continue
        parsed = as_float(value)
        if parsed is not None:
            numeric[name] = parsed
    bounds: dict[str, tuple[float, str]] = {}
    bound_names: set[str] = set()
    loose: list[tuple[str, str, str]] = []
    for name in numeric:  # exact pairs first: X with X_bound, X_max, X_min ...
        target = _bound_target(name)
        if target is None or target[0] == "":
            continue
        base, kind, exact_only = target
        if base in numeric:
            bounds[base] = (numeric[name], kind)
            bound_names.add(name)
        elif not exact_only:
            bound_names.add(name)
            loose.append((name, base, kind))
    for name, base, kind in loose:  # then bound_B / B_bound / B_floor for names containing B
        for other in numeric:
            if other not in bound_names and other not in bounds and _contains_words(other, base):
                bounds[other] = (numeric[name], kind)
    result = []
    for name, value in numeric.items():
        if name in bound_names:
            continue
        if name in bounds:
            result.append(Measure(name, value, *bounds[name]))
        else:
            result.append(Measure(name, value))
    return result


def key_measures(properties: Iterable[tuple[str, object]]) -> list[Measure]:
    return [m for m in measures(properties) if m.is_key]


def shown_measures(properties: Iterable[tuple[str, object]]) -> list[Measure]:
    """What the terminal summary and the page's distributions show: key numbers and throughputs."""
    return [m for m in measures(properties) if m.is_key or is_throughput(m.name)]
