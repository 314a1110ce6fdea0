"""pytest entry point (``pytest11: gpuconform``).

Loaded in every pytest run of an environment where the package is installed, so this module
stays inert unless the plugin is enabled (``--gpuconform`` or ini ``gpuconform = true``):
it registers options and markers and nothing else. Markers are registered even when
inactive so that ``--strict-markers`` accepts them; other projects' ``gpu`` markers keep
their own meaning because no gpuconform logic runs for them.

When enabled, the work is delegated to ``session.GpuconformSession`` (collection, skips,
reports) and ``fixtures`` (the fixtures tests use), both imported only then.
"""

from __future__ import annotations

import pytest

from . import options

MARKERS = (
    "gpu(n=1, bf16=False, min_compute_capability=None, min_memory_gib=None): needs n visible GPUs "
    "(with the given capabilities); skipped with the reason otherwise (pytest-gpuconform).",
    "world_size(*sizes, timeout=None, fresh=False): run the test body in that many ranks with a "
    "process group, one test id per size, e.g. [ws2] (pytest-gpuconform).",
    "dtype(*names): parametrize over dtypes fp32/fp16/bf16 (or torch dtypes), one test id per "
    "dtype, skipped where the device lacks it (pytest-gpuconform).",
)


def is_enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("gpuconform", False) or config.getini("gpuconform"))


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    if not is_enabled(config):
        return
    from .session import GpuconformSession

    config.pluginmanager.register(GpuconformSession(config), GpuconformSession.PLUGIN_NAME)
    config.pluginmanager.import_plugin("pytest_gpuconform.fixtures")
    config.pluginmanager.import_plugin("pytest_gpuconform.health_watch")  # issue 7
    config.pluginmanager.import_plugin("pytest_gpuconform.baseline")  # issue 7


# xdist decides the worker count in pytest_cmdline_main, before pytest_configure, so these
# two hooks live here (optionalhook: harmless when xdist is absent or disabled) and do
# nothing unless the plugin is enabled.
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config):
    if not is_enabled(config):
        return None
    from .xdist_pinning import auto_num_workers

    return auto_num_workers()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_setupnodes(config: pytest.Config, specs) -> None:
    if not is_enabled(config):
        return
    from .xdist_pinning import pin_workers_to_gpus

    pin_workers_to_gpus(specs)
