"""What CUDA itself says, asked in a child process.

The pytest controller must never create a CUDA context, so the environment checks that
need one (is CUDA usable, do counts agree with NVML, is bf16 claimed, does a tensor survive
host -> device -> host) run ``python -m pytest_gpuconform.node.probe`` and read its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping


def _round_trip(torch, index: int) -> dict:
    """Copy a known pattern to the GPU and back; count elements that came back wrong."""
    host = torch.arange(1 << 20, dtype=torch.int64).mul_(2654435761).remainder_(1 << 31).to(torch.int32)
    back = host.to(f"cuda:{index}").cpu()
    wrong = int((back != host).sum())
    return {"elements": host.numel(), "wrong": wrong}


def probe() -> dict:
    import torch

    result: dict = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        result["cuda_available"] = bool(torch.cuda.is_available())
        result["device_count"] = int(torch.cuda.device_count()) if result["cuda_available"] else 0
        devices = []
        for index in range(result["device_count"]):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                {
                    "index": index,
                    "name": props.name,
                    # bare hex, as CUDA prints it; NVML adds "GPU-" (boards) or "MIG-" (MIG devices)
                    "uuid": str(getattr(props, "uuid", "")),
                    "compute_capability": f"{props.major}.{props.minor}",
                    "bf16_supported": bool(torch.cuda.is_bf16_supported()) if index == 0 else None,
                    "round_trip": _round_trip(torch, index),
                }
            )
            if index:
                with torch.cuda.device(index):
                    devices[-1]["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
        result["devices"] = devices
    except Exception as exc:  # reported to the parent, which fails the check with it
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def visible_uuids() -> list[str] | None:
    """CUDA's device list, bare UUIDs in ordinal order; None when CUDA is not usable."""
    import torch

    if not torch.cuda.is_available():
        return None
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def cuda_uuids(environ: Mapping[str, str] | None = None, timeout: float = 120.0) -> list[str] | None:
    """visible_uuids() asked in a child process with ``environ``; None when that fails.

    Used only when NVML cannot tell what CUDA will see (identity.py): the pytest process
    itself never creates a CUDA context.
    """
    env = dict(os.environ if environ is None else environ)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest_gpuconform.node.probe", "--uuids"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        answer = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (subprocess.TimeoutExpired, OSError, ValueError, IndexError):
        return None
    return [str(u) for u in answer] if isinstance(answer, list) else None


def run_probe(timeout: float = 180.0) -> dict:
    """Run probe() in a fresh interpreter; errors come back as {"error": ...}."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest_gpuconform.node.probe"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"CUDA probe did not finish within {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"error": f"CUDA probe exited with {done.returncode}: " + " | ".join(tail)}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"CUDA probe printed no JSON: {done.stdout[-300:]!r}"}


if __name__ == "__main__":
    print(json.dumps(visible_uuids() if sys.argv[1:] == ["--uuids"] else probe()))
