"""torch's process-global switches, captured before a test and put back after it.

A rank runs many tests; without this, one that sets a default dtype, turns on anomaly
mode or changes the matmul precision would change what every later test in that rank
measures. Matmul/conv precision is read and written only through the current API
(``torch.get/set_float32_matmul_precision`` and the ``fp32_precision`` attributes), never
the legacy ``allow_tf32`` flags: mixing the two makes torch refuse to answer either.

dynamo and inductor settings are kept only when those modules are already imported (a
test that never compiles must not pay for importing them); their caches are reset after
every test once they are.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

# Where torch keeps an ``fp32_precision`` switch (torch >= 2.9); missing ones are skipped.
FP32_PRECISION_PATHS = (
    "",
    "cuda.matmul",
    "cudnn",
    "cudnn.conv",
    "cudnn.rnn",
    "mkldnn",
    "mkldnn.matmul",
    "mkldnn.conv",
    "mkldnn.rnn",
)
AUTOCAST_DEVICES = ("cpu", "cuda")
COMPILER_CONFIGS = ("torch._dynamo.config", "torch._inductor.config")


def _backend_object(torch, path: str):
    node = torch.backends
    for part in filter(None, path.split(".")):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _fp32_precisions(torch) -> dict[str, str]:
    found = {}
    for path in FP32_PRECISION_PATHS:
        node = _backend_object(torch, path)
        value = getattr(node, "fp32_precision", None) if node is not None else None
        if isinstance(value, str):
            found[path] = value
    return found


def _matmul_precision(torch) -> str | None:
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:  # legacy and new switches disagree: not a single answer
        return None


def _autocast(torch) -> dict[str, bool]:
    found = {}
    for kind in AUTOCAST_DEVICES:
        try:
            found[kind] = bool(torch.is_autocast_enabled(kind))
        except (TypeError, RuntimeError):
            continue
    return found


def _compiler_configs() -> dict[str, dict[str, Any]]:
    found = {}
    for name in COMPILER_CONFIGS:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "get_config_copy"):
            found[name] = module.get_config_copy()
    return found


@dataclass
class TorchState:
    default_dtype: Any
    default_device: Any
    grad: bool
    anomaly: tuple[bool, bool]
    threads: int
    matmul_precision: str | None
    fp32_precision: dict[str, str]
    cudnn: tuple[bool, bool, bool]
    deterministic: tuple[bool, bool]
    fill_uninitialized: bool | None
    autocast: dict[str, bool]
    compiler: dict[str, dict[str, Any]]

    @classmethod
    def capture(cls, torch) -> TorchState:
        cudnn = torch.backends.cudnn
        fill = getattr(getattr(torch.utils, "deterministic", None), "fill_uninitialized_memory", None)
        return cls(
            default_dtype=torch.get_default_dtype(),
            default_device=torch.get_default_device() if hasattr(torch, "get_default_device") else None,
            grad=torch.is_grad_enabled(),
            anomaly=(torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
            threads=torch.get_num_threads(),
            matmul_precision=_matmul_precision(torch),
            fp32_precision=_fp32_precisions(torch),
            cudnn=(cudnn.enabled, cudnn.benchmark, cudnn.deterministic),
            deterministic=(
                torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
            ),
            fill_uninitialized=fill if isinstance(fill, bool) else None,
            autocast=_autocast(torch),
            compiler=_compiler_configs(),
        )

    def restore(self, torch) -> None:
        """Put back every switch that differs from the capture (setting only what changed
        keeps this cheap and leaves torch's own lazy state alone)."""
        if torch.get_default_dtype() != self.default_dtype:
            torch.set_default_dtype(self.default_dtype)
        if self.default_device is not None and torch.get_default_device() != self.default_device:
            # A cpu default is torch's own default: clear the device context rather than install one.
            torch.set_default_device(None if self.default_device.type == "cpu" else self.default_device)
        if torch.is_grad_enabled() != self.grad:
            torch.set_grad_enabled(self.grad)
        if (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()) != self.anomaly:
            torch.autograd.set_detect_anomaly(*self.anomaly)  # the constructor applies the mode
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        self._restore_precision(torch)
        cudnn = torch.backends.cudnn
        if (cudnn.enabled, cudnn.benchmark, cudnn.deterministic) != self.cudnn:
            cudnn.enabled, cudnn.benchmark, cudnn.deterministic = self.cudnn
        deterministic = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        if deterministic != self.deterministic:
            torch.use_deterministic_algorithms(self.deterministic[0], warn_only=self.deterministic[1])
        if self.fill_uninitialized is not None:
            module = torch.utils.deterministic
            if module.fill_uninitialized_memory != self.fill_uninitialized:
                module.fill_uninitialized_memory = self.fill_uninitialized
        for kind, enabled in _autocast(torch).items():
            if enabled != self.autocast.get(kind, False):
                torch.set_autocast_enabled(kind, self.autocast.get(kind, False))
        self._restore_compilers()

    def _restore_precision(self, torch) -> None:
        if _matmul_precision(torch) == self.matmul_precision and _fp32_precisions(torch) == self.fp32_precision:
            return
        if self.matmul_precision is not None:
            torch.set_float32_matmul_precision(self.matmul_precision)
        for path, value in self.fp32_precision.items():
            node = _backend_object(torch, path)
            if node is not None and node.fp32_precision != value:
                node.fp32_precision = value

    def _restore_compilers(self) -> None:
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is not None and hasattr(dynamo, "reset"):
            dynamo.reset()  # compiled code and guards of this test must not serve the next
        for name, saved in self.compiler.items():
            module = sys.modules.get(name)
            if module is not None and module.get_config_copy() != saved:
                module.load_config(saved)


def after_test_on_cuda(torch) -> None:
    """Hand cached blocks back and start the next test's peak from zero (under -n,
    neighbours lease these GPUs next); a faulting kernel fails here, in this test."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def seed_all(torch, seed: int, device_kind: str) -> None:
    """Python's, numpy's (when imported) and torch's generators (CPU, and every CUDA device
    on a GPU rank) from one seed: identical on every rank, so ranks draw the same numbers.

    ``torch.manual_seed`` would also queue lazy seeding of every accelerator module, with a
    Python stack captured for each: a millisecond per test on a CPU rank for nothing."""
    import random

    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    if device_kind == "cuda":
        torch.cuda.manual_seed_all(seed)
