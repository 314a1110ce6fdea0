"""The acceptance spec (``--gpuconform-spec FILE``, TOML): what this node must be.

A run on a node with 7 GPUs instead of 8, an older driver or a PCIe slot at half width
can pass every numerical check; the spec makes the difference a failure. Each declared
field becomes one named check (``gpuconform-spec::gpu_count``) that fails with what was
expected against what was found. Example specs ship in ``acceptance/examples/``.

    name = "8 × H100 SXM"               # how the verdict names the node
    [gpu]
    count = 8                            # a number: exactly; a table: { min = 8 } / { max = 8 }
    model = "H100 80GB HBM3"             # every GPU's NVML name contains it (or one of a list)
    memory_gib = { min = 79 }            # per GPU
    compute_capability = ">=9.0"
    nvlinks = { min = 18 }               # active NVLinks per GPU
    pcie_gen = { min = 5 }               # per GPU: the link generation it can train to
    pcie_width = { min = 16 }            # per GPU: lanes of the link it can train to
    [software]                           # PEP 440 version ranges
    driver = ">=550.54"
    cuda = ">=12.4"                      # torch's CUDA build
    driver_cuda = ">=12.4"               # the newest CUDA the driver supports
    nccl = ">=2.21"
    torch = ">=2.4"
    [host]
    cpu_cores = { min = 96 }             # logical CPUs
    memory_gib = { min = 1800 }

Unknown tables or keys, wrong types and empty ranges are usage errors (exit code 4)
naming the file and the key: a misspelt requirement must never pass silently.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class BadSpec(ValueError):
    """A spec file that cannot be used (the message names the file and the key)."""


@dataclass(frozen=True)
class Range:
    """A number range: exact (``8``) or bounded (``{ min = 79 }``)."""

    low: float | None
    high: float | None

    def allows(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def text(self) -> str:
        if self.low is not None and self.low == self.high:
            return _number(self.low)
        parts = ([f">= {_number(self.low)}"] if self.low is not None else []) + (
            [f"<= {_number(self.high)}"] if self.high is not None else []
        )
        return " and ".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Requirement:
    """One declared field: ``key`` (``gpu.count``), its kind and the expected value."""

    key: str
    kind: str  # "range" | "versions" | "names"
    expected: Any  # Range | SpecifierSet | tuple[str, ...]

    def expected_text(self) -> str:
        if self.kind == "names":
            names = self.expected
            return repr(names[0]) if len(names) == 1 else "one of " + ", ".join(map(repr, names))
        if self.kind == "versions":
            return str(self.expected)
        return self.expected.text()

    def allows(self, found: Any) -> bool:
        if self.kind == "range":
            return self.expected.allows(float(found))
        if self.kind == "versions":
            try:
                return self.expected.contains(Version(str(found)), prereleases=True)
            except InvalidVersion:
                return False
        return any(name.lower() in str(found).lower() for name in self.expected)


@dataclass(frozen=True)
class Spec:
    path: str
    name: str
    requirements: tuple[Requirement, ...] = field(default_factory=tuple)

    def requirement(self, key: str) -> Requirement | None:
        return next((r for r in self.requirements if r.key == key), None)

    @property
    def gpu_count(self) -> Range | None:
        found = self.requirement("gpu.count")
        return found.expected if found else None


def _range(where: str, value: Any) -> Range:
    if isinstance(value, bool):
        raise BadSpec(f"{where}: expected a number or a table {{ min = ..., max = ... }}, got {value!r}")
    if isinstance(value, (int, float)):
        return Range(float(value), float(value))
    if isinstance(value, dict):
        unknown = set(value) - {"min", "max"}
        if unknown:
            raise BadSpec(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (use min and max)")
        bounds = {}
        for name in ("min", "max"):
            if name in value:
                if isinstance(value[name], bool) or not isinstance(value[name], (int, float)):
                    raise BadSpec(f"{where}.{name}: expected a number, got {value[name]!r}")
                bounds[name] = float(value[name])
        if not bounds:
            raise BadSpec(f"{where}: give min, max or both")
        if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
            raise BadSpec(f"{where}: min {bounds['min']:g} is above max {bounds['max']:g}")
        return Range(bounds.get("min"), bounds.get("max"))
    raise BadSpec(f"{where}: expected a number or a table {{ min = ..., max = ... }}, got {value!r}")


def _versions(where: str, value: Any) -> SpecifierSet:
    if not isinstance(value, str) or not value.strip():
        raise BadSpec(f'{where}: expected a version range such as ">=550.54,<560", got {value!r}')
    try:
        return SpecifierSet(value)
    except InvalidSpecifier:
        raise BadSpec(f'{where}: {value!r} is not a version range (PEP 440, e.g. ">=12.4,<13")') from None


def _names(where: str, value: Any) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise BadSpec(f"{where}: expected a name or a list of names, got {value!r}")
    return tuple(names)


FIELDS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "gpu": {
        "count": _range,
        "model": _names,
        "memory_gib": _range,
        "compute_capability": _versions,
        "nvlinks": _range,
        "pcie_gen": _range,
        "pcie_width": _range,
    },
    "software": {
        "driver": _versions,
        "cuda": _versions,
        "driver_cuda": _versions,
        "nccl": _versions,
        "torch": _versions,
    },
    "host": {"cpu_cores": _range, "memory_gib": _range},
}
KINDS: dict[Callable[[str, Any], Any], str] = {_range: "range", _versions: "versions", _names: "names"}
TOP_LEVEL = {"name", "description"}


def parse(text: str, path: str) -> Spec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadSpec(f"{path}: not valid TOML ({exc})") from None
    unknown = set(data) - set(FIELDS) - TOP_LEVEL
    if unknown:
        raise BadSpec(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"expected name, description and the tables {', '.join(FIELDS)}"
        )
    name = data.get("name", "")
    if not isinstance(name, str):
        raise BadSpec(f"{path}: name: expected text, got {name!r}")
    requirements = []
    for table, fields in FIELDS.items():
        values = data.get(table, {})
        if not isinstance(values, dict):
            raise BadSpec(f"{path}: [{table}] must be a table")
        unknown = set(values) - set(fields)
        if unknown:
            raise BadSpec(f"{path}: [{table}] unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(fields)}")
        for key, read in fields.items():
            if key in values:
                where = f"{path}: {table}.{key}"
                requirements.append(Requirement(f"{table}.{key}", KINDS[read], read(where, values[key])))
    if not requirements:
        raise BadSpec(f"{path}: declares nothing (add a [gpu], [software] or [host] table)")
    return Spec(path, name or path, tuple(requirements))


def load(path: str) -> Spec:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise BadSpec(f"cannot read spec file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BadSpec(f"{path}: not UTF-8 text ({exc})") from None
    return parse(text, path)
