"""Performance floors per GPU model, from data/perf_floors.json (or a site's file).

The file keeps vendor peaks with their source and one documented fraction per metric;
floors are computed here (peak x fraction), so changing the policy is one number and the
peaks stay checkable against the datasheets. See the file's "doc" for where each figure
comes from and why the fractions are what they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SHIPPED = Path(__file__).parent / "data" / "perf_floors.json"
FORMAT = "pytest-gpuconform perf floors"
GEMM_PRECISIONS = ("fp32", "tf32", "fp16", "bf16")


class BadFloors(ValueError):
    pass


@dataclass(frozen=True)
class ModelFloors:
    model: str
    gemm_tflops: dict  # precision -> floor
    all_reduce_busbw_gbps: float | None  # None: no floor for this model (PCIe boards)
    source: str


@dataclass(frozen=True)
class FloorTable:
    path: str
    models: dict  # lower-case NVML name -> ModelFloors

    def lookup(self, gpu_name: str) -> ModelFloors | None:
        return self.models.get(gpu_name.strip().lower())

    def missing_reason(self, gpu_name: str) -> str:
        return (
            f"no performance floor for GPU model {gpu_name!r} in {self.path} "
            "(add it there or pass --gpuconform-perf-floors FILE)"
        )


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise BadFloors(f"{where} = {value!r} must be a positive number")
    return float(value)


def load(path: str | Path | None = None) -> FloorTable:
    path = Path(path) if path else SHIPPED
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadFloors(f"cannot read floors file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise BadFloors(f"floors file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BadFloors(f'{path} is not a floors file (expected "format": "{FORMAT}")')
    fractions = data.get("fraction_of_peak", {})
    gemm_fraction = _number(fractions.get("gemm_tflops"), f"{path}: fraction_of_peak.gemm_tflops")
    busbw_fraction = _number(fractions.get("all_reduce_busbw_gbps"), f"{path}: fraction_of_peak.all_reduce_busbw_gbps")
    models: dict[str, ModelFloors] = {}
    for entry in data.get("models", []):
        where = f"{path}: model {entry.get('model')!r}"
        peaks = entry.get("peak_tflops", {})
        gemm = {p: _number(peaks[p], f"{where} peak_tflops.{p}") * gemm_fraction for p in GEMM_PRECISIONS if p in peaks}
        nvlink = entry.get("nvlink_unidirectional_gbps")
        busbw = _number(nvlink, f"{where} nvlink_unidirectional_gbps") * busbw_fraction if nvlink is not None else None
        floors = ModelFloors(str(entry.get("model")), gemm, busbw, str(entry.get("source", "")))
        for name in entry.get("names", []):
            models[str(name).strip().lower()] = floors
    return FloorTable(str(path), models)
