"""What a run verified, in one line, and the node's verdict.

"115 passed, 274 skipped" on a GPU node whose driver is missing reads exactly like a
healthy CPU node, so every output (terminal, page, JSON, Prometheus, ``gpuconform
verdict``) says what was verified instead: "8 × H100 80GB HBM3 verified: 389 checks", or
"CPU node: GPU checks not run (no NVIDIA driver): passed as a CPU node". A node without
GPUs never gets a bare PASS.

One function of the node's facts (the inventory as flat properties, the same names the
JUnit suite properties carry without their ``gpuconform.`` prefix) and its outcome counts,
so the terminal (from the live inventory) and the page (from the JUnit file) agree.

Kinds:

* ``failed``: a check failed or errored.
* ``passed``: no failure, GPUs present and checked.
* ``cpu``: no failure, no GPU: "passed as a CPU node". *Verified* only when the
  acceptance spec the node ran under declares zero GPUs (a CPU-only CI runner);
  otherwise the fleet counts it as not verified (GPU checks not run).
* ``nothing``: no check ran (all skipped or none collected): not verified.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

SPEC_NAME = "spec"  # suite properties written when --gpuconform-spec is given
SPEC_GPU_COUNT = "spec_gpu_count"
WORDS = {"failed": "FAIL", "passed": "PASS", "cpu": "PASSED AS A CPU NODE", "nothing": "NOT VERIFIED"}


@dataclass(frozen=True)
class Verdict:
    kind: str  # failed | passed | cpu | nothing
    line: str  # what was verified, one line
    verified: bool  # counts as verified in a fleet (see module docstring)

    @property
    def word(self) -> str:
        return WORDS[self.kind]

    def text(self) -> str:
        return f"{self.word}: {self.line}"


def gpu_summary(facts: Mapping[str, str]) -> str:
    """``8 × H100 80GB HBM3`` from ``gpu<i>_name`` facts (``NVIDIA`` dropped), or ""."""
    names = [
        value
        for key, value in sorted(facts.items(), key=lambda item: _natural(item[0]))
        if re.fullmatch(r"gpu\d+_name", key)
    ]
    groups: dict[str, int] = {}
    for name in names:
        short = name.removeprefix("NVIDIA ").strip() or name
        groups[short] = groups.get(short, 0) + 1
    return ", ".join(f"{count} × {name}" for name, count in groups.items())


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _why_no_gpu(facts: Mapping[str, str]) -> str:
    status, message = facts.get("nvml", ""), facts.get("nvml_message", "")
    if status == "error":
        return f"NVML error: {message}" if message else "NVML error"
    if "no NVIDIA driver" in message or status == "absent":
        return "no NVIDIA driver" if "driver" in message or not message else message
    return message or "no GPU visible"


def node_verdict(facts: Mapping[str, str], counts: Mapping[str, int], causes: int | None = None) -> Verdict:
    """The verdict of one node (see module docstring). ``causes``: distinct root causes of
    its failures, when known."""
    passed, skipped = counts.get("passed", 0), counts.get("skipped", 0)
    bad = counts.get("failed", 0) + counts.get("error", 0)
    ran = passed + bad
    gpus = gpu_summary(facts)
    try:
        gpu_count = int(facts.get("gpu_count", "0") or 0)
    except ValueError:
        gpu_count = 0
    spec = facts.get(SPEC_NAME)
    against = f" against spec {spec}" if spec else ""
    skipped_text = f" ({skipped} skipped)" if skipped else ""
    if gpu_count and gpus:
        subject = gpus
    elif gpu_count:
        subject = _plural(gpu_count, "GPU")
    else:
        subject = f"CPU node: GPU checks not run ({_why_no_gpu(facts)})"
    if bad:
        cause_text = f" ({_plural(causes, 'cause')})" if causes else ""
        where = f" on {subject}" if gpu_count else f"; {subject}"
        return Verdict("failed", f"{bad} of {_plural(ran, 'check')} failed{cause_text}{where}{against}", False)
    if not ran:
        where = f" on {subject}" if gpu_count else f"; {subject}"
        return Verdict("nothing", f"no check ran{skipped_text}{where}", False)
    if gpu_count:
        return Verdict("passed", f"{subject} verified{against}: {_plural(ran, 'check')}{skipped_text}", True)
    cpu_spec = spec is not None and facts.get(SPEC_GPU_COUNT) == "0"
    return Verdict("cpu", f"{subject}; {_plural(ran, 'check')} passed{against}{skipped_text}", cpu_spec)
