"""A simulated fleet made from one real run: N node reports with known faults and outliers.

Starts from one real ``pytest --gpuconform --junitxml`` file of a CPU node (the shipped
suite as it ran, its cases, properties and messages), and turns it into the report of an
8-GPU node: GPU checks that skipped only for want of a GPU pass, GEMM TFLOP/s and all_reduce
bus bandwidth are recorded per node against floors, the inventory describes 8 x H100 SXM.
Then per node, deterministically from the node's index:

* failures: a slow GPU (bf16 GEMM below its floor), uncorrectable ECC errors, an
  all_reduce with wrong elements, and nodes whose driver is missing (the real CPU-node
  report unchanged: "passed as a CPU node", not verified);
* inventory outliers: an older driver, another torch, another NCCL, a node with 7 GPUs.

``make_fleet`` writes the files and returns a ``FleetPlan`` saying which host got what,
so tests can hold the page to it. Generation is string assembly of pre-rendered cases
(about 2 ms a node), so a 1,000-node fleet costs seconds, not the run itself.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

GPUS = 8
MODEL = "NVIDIA H100 80GB HBM3"
DRIVER, OLD_DRIVER = "570.86.15", "550.54.15"
TORCH, OTHER_TORCH = "2.13.0+cu128", "2.12.1+cu128"
NCCL, OTHER_NCCL = "2.27.5", "2.26.2"
GEMM = {"fp32": (55.0, 45.0), "tf32": (400.0, 300.0), "fp16": (760.0, 600.0), "bf16": (760.0, 600.0)}  # mean, floor
BUSBW = (360.0, 300.0)
_NO_GPU = re.compile(r"needs \d+ GPU\(s\), node has no GPU|NVML sees no GPU|no GPU visible|NCCL is only required")


def host_name(index: int) -> str:
    return f"gpu-{index:04d}"


@dataclass
class FleetPlan:
    paths: list[Path] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    slow_gpu: dict[str, int] = field(default_factory=dict)  # host -> GPU index below the floor
    ecc: list[str] = field(default_factory=list)
    wrong_elements: list[str] = field(default_factory=list)
    cpu_nodes: list[str] = field(default_factory=list)
    old_driver: list[str] = field(default_factory=list)
    other_torch: list[str] = field(default_factory=list)
    other_nccl: list[str] = field(default_factory=list)
    seven_gpus: list[str] = field(default_factory=list)

    @property
    def failed(self) -> set[str]:
        return set(self.slow_gpu) | set(self.ecc) | set(self.wrong_elements)


def _inject(index: int, plan: FleetPlan, nodes: int) -> dict[str, object]:
    """What node ``index`` gets (the FleetPlan records it)."""
    host = host_name(index)
    faults: dict[str, object] = {}
    if nodes >= 4 and index in {17 % nodes, nodes // 2, nodes - 1}:
        plan.cpu_nodes.append(host)
        return {"cpu": True}
    if index % 97 == 13:
        plan.slow_gpu[host] = faults["slow_gpu"] = index % GPUS
    if index % 211 == 5:
        plan.ecc.append(host)
        faults["ecc"] = (index + 3) % GPUS
    if index % 331 == 7:
        plan.wrong_elements.append(host)
        faults["wrong_elements"] = 1 + index % 7
    if index % 199 == 3:
        plan.old_driver.append(host)
        faults["driver"] = OLD_DRIVER
    if index % 333 == 100:
        plan.other_torch.append(host)
        faults["torch"] = OTHER_TORCH
    if index == 42 % max(nodes, 1) and nodes > 42:
        plan.other_nccl.append(host)
        faults["nccl"] = OTHER_NCCL
    if index == 250 and nodes > 250:
        plan.seven_gpus.append(host)
        faults["gpus"] = GPUS - 1
    return faults


def _uuid(index: int, gpu: int) -> str:
    return f"GPU-{index:04x}{gpu:04x}-aaaa-bbbb-cccc-{index * 8 + gpu:012d}"


def _label(index: int, gpu: int) -> str:
    return f"GPU {gpu} ({_uuid(index, gpu)}, bus 00000000:{0x18 + gpu * 0x10:02X}:00.0)"


class Template:
    """The real report, split into pre-rendered cases, plus what varies per node."""

    def __init__(self, base: Path) -> None:
        root = ElementTree.parse(base).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        assert suite is not None
        self.base_text = base.read_text(encoding="utf-8")
        self.base_host = dict((p.get("name"), p.get("value")) for p in suite.iterfind("properties/property")).get(
            "gpuconform.host", suite.get("hostname", "")
        )
        self.properties = [(p.get("name", ""), p.get("value", "")) for p in suite.iterfind("properties/property")]
        self.cases: list[tuple[str, str, ElementTree.Element]] = []  # (kind, text, element)
        for case in suite.iterfind("testcase"):
            name = case.get("name", "")
            skipped = case.find("skipped")
            if skipped is not None and _NO_GPU.search(skipped.get("message", "")):
                case.remove(skipped)
                kind = "gpu-pass"
            else:
                kind = "plain"
            if name.startswith("test_gemm_throughput["):
                kind = "gemm"
            elif name.startswith("test_all_reduce_bus_bandwidth[") and "cuda" in name:
                kind = "busbw"
            elif name == "test_no_uncorrectable_ecc_errors":
                kind = "ecc"
            elif name.startswith("test_all_reduce[ws8-cuda-fp32-sum"):
                kind = "all_reduce"
            self.cases.append((kind, ElementTree.tostring(case, encoding="unicode"), case))

    def _suite_head(self, index: int, faults: dict, cases: int, failures: int) -> str:
        host = host_name(index)
        gpus = int(faults.get("gpus", GPUS))  # type: ignore[call-overload]
        values = dict(self.properties)
        values.update(
            {
                "gpuconform.host": host,
                "gpuconform.torch": str(faults.get("torch", TORCH)),
                "gpuconform.torch_cuda": "12.8",
                "gpuconform.cudnn": "91000",
                "gpuconform.nccl": str(faults.get("nccl", NCCL)),
                "gpuconform.nvml": "ok",
                "gpuconform.nvml_message": f"driver {faults.get('driver', DRIVER)}, CUDA 12.8",
                "gpuconform.driver": str(faults.get("driver", DRIVER)),
                "gpuconform.driver_cuda": "12.8",
                "gpuconform.gpu_count": str(gpus),
            }
        )
        for gpu in range(gpus):
            values[f"gpuconform.gpu{gpu}_name"] = MODEL
            values[f"gpuconform.gpu{gpu}_uuid"] = _uuid(index, gpu)
            values[f"gpuconform.gpu{gpu}_pci_bus_id"] = f"00000000:{0x18 + gpu * 0x10:02X}:00.0"
            values[f"gpuconform.gpu{gpu}_memory_gib"] = "79.6"
            values[f"gpuconform.gpu{gpu}_compute_capability"] = "9.0"
        props = "".join(f"<property name={quoteattr(k)} value={quoteattr(v)} />" for k, v in values.items())
        return (
            f'<testsuite name="pytest" errors="0" failures="{failures}" skipped="0" tests="{cases}" '
            f'time="100.0" hostname="{host}"><properties>{props}</properties>'
        )

    @staticmethod
    def _case(element: ElementTree.Element, extra: list[tuple[str, object]], failure: str | None) -> str:
        head = f"<testcase classname={quoteattr(element.get('classname', ''))} name={quoteattr(element.get('name', ''))} time={quoteattr(element.get('time', '0'))}>"
        props = [(p.get("name", ""), p.get("value", "")) for p in element.iterfind("properties/property")] + extra
        body = (
            "<properties>"
            + "".join(f"<property name={quoteattr(k)} value={quoteattr(str(v))} />" for k, v in props)
            + "</properties>"
        )
        if failure:
            body += f"<failure message={quoteattr(failure)}>{escape(failure)}</failure>"
        return head + body + "</testcase>"

    def node(self, index: int, faults: dict, rng: random.Random) -> str:
        if faults.get("cpu"):
            text = self.base_text.replace(f'value="{self.base_host}"', f'value="{host_name(index)}"', 1)
            return text.replace(f'hostname="{self.base_host}"', f'hostname="{host_name(index)}"', 1)
        gpus = int(faults.get("gpus", GPUS))  # type: ignore[call-overload]
        parts, failures = [], 0
        for kind, text, element in self.cases:
            failure = None
            extra: list[tuple[str, object]] = []
            if kind == "gemm":
                precision = element.get("name", "")[len("test_gemm_throughput[") : -1]
                mean, floor = GEMM.get(precision, (100.0, 80.0))
                slow = faults.get("slow_gpu") if precision == "bf16" else None
                for gpu in range(gpus):
                    value = round(rng.gauss(mean, mean * 0.012), 2)
                    if gpu == slow:
                        value = round(floor * 0.78, 2)
                        failure = (
                            f"{_label(index, gpu)}: {precision} GEMM 8192^3 = {value:.4g} TFLOP/s, "
                            f"bound >= {floor:.4g} (floor for H100 SXM)"
                        )
                    extra += [(f"gpu{gpu}_{precision}_tflops", value), (f"gpu{gpu}_{precision}_tflops_floor", floor)]
            elif kind == "busbw":
                mean, floor = BUSBW
                extra += [
                    ("all_reduce_busbw_gbps", round(rng.gauss(mean, 4.0), 2)),
                    ("all_reduce_busbw_gbps_floor", floor),
                ]
            elif kind == "ecc" and "ecc" in faults:
                failure = f"{_label(index, int(faults['ecc']))}: volatile uncorrectable ECC errors = 2, bound 0"  # type: ignore[call-overload]
            elif kind == "all_reduce" and "wrong_elements" in faults:
                wrong = int(faults["wrong_elements"])  # type: ignore[call-overload]
                failure = (
                    f"rank {wrong}: all_reduce(sum) on rank {wrong}: {wrong * 64} of 4096 elements wrong, "
                    f"first at index {wrong * 512}: got 3.0, expected {2 * wrong + 6}.0"
                )
                extra = [("wrong_elements", wrong * 64), ("wrong_elements_bound", 0)]
            if extra or failure:
                parts.append(self._case(element, extra, failure))
                failures += failure is not None
            else:
                parts.append(text)
        head = self._suite_head(index, faults, len(parts), failures)
        return (
            '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
            + head
            + "".join(parts)
            + "</testsuite></testsuites>"
        )


def make_fleet(base: Path, directory: Path, nodes: int, seed: int = 0) -> FleetPlan:
    """Write ``nodes`` node reports made from ``base`` into ``directory`` (see module docstring)."""
    template = Template(base)
    directory.mkdir(parents=True, exist_ok=True)
    plan = FleetPlan()
    for index in range(1, nodes + 1):
        host = host_name(index)
        faults = _inject(index, plan, nodes)
        path = directory / f"junit-{host}.xml"
        path.write_text(template.node(index, faults, random.Random(seed * 100_003 + index)), encoding="utf-8")
        plan.paths.append(path)
        plan.hosts.append(host)
    return plan
