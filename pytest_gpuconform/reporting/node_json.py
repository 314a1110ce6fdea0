"""``--gpuconform-json FILE``: one JSON document per node, for tools that are not JUnit readers.

Everything a fleet database or a dashboard ingests about one run on one node: the inventory,
the acceptance spec it ran under, the verdict (acceptance/verdict.py), the counts, and every
case with its outcome, message, duration, properties and recorded numbers (each joined
with its bound by measures.py's naming rule). The layout is fixed by
``schemas/node-report.schema.json`` (JSON Schema 2020-12, shipped in the package;
tests/reporting/test_outputs.py validates the plugin's output against it).

Non-finite numbers (a NaN error is exactly what a report must show) are not valid JSON:
such a value is ``null`` with its text in ``value_text``.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources

from ..acceptance.verdict import Verdict
from .measures import as_float, measures
from .outcomes import CaseOutcome

SCHEMA = "gpuconform-node-report/1"
SCHEMA_FILE = "node-report.schema.json"


def schema() -> dict:
    """The JSON Schema every document validates against."""
    return json.loads(
        resources.files(__package__).joinpath("schemas").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    )


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _plain(value: object) -> object:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _number(measure) -> dict:
    data = {"name": measure.name, "value": _finite(measure.value)}
    if data["value"] is None:
        data["value_text"] = str(measure.value)
    if measure.bound is not None:
        data.update(bound=_finite(measure.bound), kind=measure.kind, within=bool(measure.within))
    return data


def case(test: CaseOutcome, test_id: str, area: str) -> dict:
    properties: dict[str, object] = {}
    for name, value in test.properties:
        properties[str(name)] = _plain(value)
    numbers = [_number(m) for m in measures(test.properties) if as_float(m.value) is not None]
    data: dict[str, object] = {
        "id": test.nodeid,
        "test": test_id,
        "area": area,
        "outcome": test.outcome,
        "duration_s": round(test.duration, 6),
        "properties": properties,
        "numbers": numbers,
    }
    if test.message:
        data["message"] = test.message
    return data


def document(
    host: str,
    inventory: Sequence[tuple[str, str]],
    verdict: Verdict,
    cases: list[dict],
    spec: Mapping[str, object] | None,
) -> dict:
    counts = dict.fromkeys(("passed", "failed", "error", "skipped"), 0)
    for item in cases:
        counts[str(item["outcome"])] += 1
    return {
        "schema": SCHEMA,
        "host": host,
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "verdict": {"kind": verdict.kind, "word": verdict.word, "line": verdict.line, "verified": verdict.verified},
        "counts": counts,
        "inventory": dict(inventory),
        "spec": dict(spec) if spec else None,
        "cases": cases,
    }


def dumps(data: dict) -> str:
    return json.dumps(data, indent=1, allow_nan=False) + "\n"
