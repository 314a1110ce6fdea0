"""Performance floors per GPU model, from data/perf_floors.json (or a site's file).

The file keeps vendor peaks and published *measured* figures, each with its source, and
one documented fraction per metric and basis; floors are computed here, so changing the
policy is one number and every figure stays checkable against where it came from:

* a measured figure exists (``measured_tflops.<precision>``, ``measured_busbw_gbps``):
  floor = measured x ``fraction_of_measured``;
* otherwise: floor = datasheet peak x ``fraction_of_peak``.

Each floor carries its basis in words (``gemm_basis``, ``busbw_basis``), which failure
messages quote. See the file's "doc" for why the fractions are what they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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
    gemm_basis: dict = field(default_factory=dict)  # precision -> how the floor was computed
    busbw_basis: str = ""


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


def _fractions(data: dict, key: str, path: Path, required: bool) -> tuple[float | None, float | None]:
    fractions = data.get(key)
    if fractions is None and not required:
        return None, None
    fractions = fractions or {}
    return (
        _number(fractions.get("gemm_tflops"), f"{path}: {key}.gemm_tflops"),
        _number(fractions.get("all_reduce_busbw_gbps"), f"{path}: {key}.all_reduce_busbw_gbps"),
    )


def _measured(entry: dict, key: str, where: str) -> tuple[float, str]:
    """A published measurement: {"value": number, "source": "..."} (the source is required)."""
    if not isinstance(entry, dict) or not str(entry.get("source", "")).strip():
        raise BadFloors(f'{where} {key} must be {{"value": number, "source": "where it was published"}}')
    return _number(entry.get("value"), f"{where} {key}.value"), str(entry["source"])


def _model(entry: dict, path: Path, peak_fraction: tuple, measured_fraction: tuple) -> ModelFloors:
    where = f"{path}: model {entry.get('model')!r}"
    peaks, measured = entry.get("peak_tflops", {}), entry.get("measured_tflops", {})
    gemm, basis = {}, {}
    for precision in GEMM_PRECISIONS:
        if precision in measured:
            if measured_fraction[0] is None:
                raise BadFloors(f"{where} has measured_tflops but {path} has no fraction_of_measured")
            value, source = _measured(measured[precision], f"measured_tflops.{precision}", where)
            gemm[precision] = value * measured_fraction[0]
            basis[precision] = f"{measured_fraction[0]:g} x {value:g} TFLOP/s measured ({source})"
        elif precision in peaks:
            peak = _number(peaks[precision], f"{where} peak_tflops.{precision}")
            gemm[precision] = peak * peak_fraction[0]
            basis[precision] = f"{peak_fraction[0]:g} x {peak:g} TFLOP/s datasheet peak"
    busbw, busbw_basis = None, ""
    nvlink = entry.get("nvlink_unidirectional_gbps")
    if "measured_busbw_gbps" in entry:
        if measured_fraction[1] is None:
            raise BadFloors(f"{where} has measured_busbw_gbps but {path} has no fraction_of_measured")
        value, source = _measured(entry["measured_busbw_gbps"], "measured_busbw_gbps", where)
        busbw = value * measured_fraction[1]
        busbw_basis = f"{measured_fraction[1]:g} x {value:g} GB/s measured ({source})"
    elif nvlink is not None:
        link = _number(nvlink, f"{where} nvlink_unidirectional_gbps")
        busbw = link * peak_fraction[1]
        busbw_basis = f"{peak_fraction[1]:g} x {link:g} GB/s unidirectional NVLink"
    return ModelFloors(str(entry.get("model")), gemm, busbw, str(entry.get("source", "")), basis, busbw_basis)


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
    peak_fraction = _fractions(data, "fraction_of_peak", path, required=True)
    measured_fraction = _fractions(data, "fraction_of_measured", path, required=False)
    models: dict[str, ModelFloors] = {}
    for entry in data.get("models", []):
        floors = _model(entry, path, peak_fraction, measured_fraction)
        for name in entry.get("names", []):
            models[str(name).strip().lower()] = floors
    return FloorTable(str(path), models)
