"""What CUDA itself says, asked in a child process.

The pytest controller must never create a CUDA context, so the environment checks that
need one (is CUDA usable, do counts agree with NVML, is bf16 claimed, does a tensor survive
host -> device -> host) run ``python -m pytest_gpuconform.node.probe`` and read its JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys


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
                    "uuid": "GPU-" + str(getattr(props, "uuid", "")),
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
    print(json.dumps(probe()))
