"""What ``record(name, value)`` stores: plain values only.

Recorded numbers travel in xdist reports (execnet serialises only builtin types) and
across the rank pipe, and end up as JUnit property strings, so everything is turned into
int, float, bool or str here, once. Floats keep 6 significant digits: enough for a
tolerance comparison, short enough to read in a report.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable


def plain_value(value):
    if type(value) in (bool, int, str):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(f"{float(value):.6g}")
    item = getattr(value, "item", None)  # a 0-d tensor
    if callable(item) and getattr(value, "numel", lambda: 0)() == 1:
        return plain_value(item())
    return str(value)


def recorder(append: Callable[[tuple[str, object]], None]) -> Callable[[str, object], None]:
    def record(name: str, value: object) -> None:
        append((str(name), plain_value(value)))

    return record
