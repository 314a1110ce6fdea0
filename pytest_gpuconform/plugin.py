"""pytest entry point (``pytest11: gpuconform``): options, markers, and the wiring of a run.

Loaded in every pytest run of an environment where the package is installed, so this module
stays inert unless the plugin is enabled (``--gpuconform`` or ini ``gpuconform = true``):
it registers options and markers and nothing else. Markers are registered even when
inactive so that ``--strict-markers`` accepts them; other projects' ``gpu`` markers keep
their own meaning because no gpuconform logic runs for them.

When enabled, ``pytest_configure`` does the start-up work, once, in this order: resolve the
settings, take the node inventory, detect a cluster world, then register the feature
plugins, whose constructors only store what they are given:

* acceptance/plugin.py (with --gpuconform-spec): one named check per field of the spec;
* collection/policy.py: parameters, plans, skips, JUnit context properties;
* engine/plugin.py: runs multi-rank and GPU tests in rank processes (per-node mode), or
  cluster/plugin.py: joins the launcher's world (cluster mode);
* reporting/plugin.py: header, suite properties, stable JUnit ids, verdict and summary, JSON and
  Prometheus outputs;
* health/watch.py, perf/baseline.py, xdist_glue.py (when xdist is active), fixtures.py.

Inside a rank process of the engine (its pytest session runs the controller's items) the
plugin starts in rank mode instead: the controller's settings and inventory arrive as data,
and only the parametrization, the plans and the fixtures are registered.
"""

from __future__ import annotations

import dataclasses

import pytest

from . import options

MARKERS = (
    "gpu(n=1, bf16=False, min_compute_capability=None, min_memory_gib=None): needs n visible GPUs "
    "(with the given capabilities); skipped with the reason otherwise; the test runs on cuda only, "
    "ids [cuda] (pytest-gpuconform).",
    "world_size(*sizes, timeout=None, fresh=False): run the test body in that many ranks with a "
    "process group, one test id per size and device, e.g. [ws2-cpu] (gloo) and [ws2-cuda] (NCCL); "
    "add the gpu marker to run only the cuda variant, or -k cpu to select (pytest-gpuconform).",
    "dtype(*names): parametrize over dtypes fp32/fp16/bf16 (or torch dtypes), one test id per "
    "dtype, skipped where the device lacks it (pytest-gpuconform).",
)


# The plugin's own fixtures (fixtures.py) and the markers no other project is likely to use
# for something else (``gpu`` is: other suites have their own): a test that uses them in a
# run without --gpuconform is told how to enable the plugin. tests/plugin/test_inert.py
# holds FIXTURES to fixtures.py.
FIXTURES = frozenset(
    {
        "device",
        "dtype",
        "world_size",
        "rank",
        "process_group",
        "gpu",
        "tolerance",
        "tolerance_table",
        "record",
        "gpuconform_settings",
        "node_inventory",
        "expect_gpus",
        "perf_floors",
        "health_watch",
        "memory_meter",
        "shared_tmp_path",
    }
)
OWN_MARKERS = ("world_size", "dtype")
ENABLE_HINT = "pytest-gpuconform is installed but not enabled: add --gpuconform (or ini gpuconform = true)"
_USERS_KEY: pytest.StashKey[list[str]] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    if options.is_enabled(config):
        _start(config)


def _rank_spec(config: pytest.Config):
    """The rank's spec when this pytest session runs inside a rank of the engine."""
    for plugin in config.pluginmanager.get_plugins():
        if getattr(plugin, "PLUGIN_NAME", None) == "gpuconform-rank":
            return plugin.spec
    return None


def _start_rank(config: pytest.Config, spec) -> None:
    from .collection.policy import CollectionPolicy
    from .collection.suite import suite_dir
    from .engine.rank.spec import RANK_SPEC_KEY
    from .node.inventory import INVENTORY_KEY
    from .settings import SETTINGS_KEY

    config.stash[SETTINGS_KEY] = spec.settings
    config.stash[INVENTORY_KEY] = spec.inventory
    config.stash[RANK_SPEC_KEY] = spec
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args[:] = [str(suite_dir())]
    policy = CollectionPolicy(spec.settings, spec.inventory, None, rank_mode=True)
    config.pluginmanager.register(policy, CollectionPolicy.PLUGIN_NAME)
    config.pluginmanager.import_plugin("pytest_gpuconform.fixtures")


def _start(config: pytest.Config) -> None:
    spec = _rank_spec(config)
    if spec is not None:
        _start_rank(config, spec)
        return
    from .cluster import world as cluster_world
    from .cluster.plugin import ClusterMode, check_rendezvous_environment
    from .cluster.world import CLUSTER_KEY
    from .collection.policy import CollectionPolicy
    from .collection.suite import suite_dir
    from .engine.plugin import RankEngine
    from .health.watch import WATCH_KEY, HealthWatch
    from .node.inventory import INVENTORY_KEY, collect
    from .perf.baseline import BaselineState
    from .reporting.plugin import ReportingPlugin
    from .settings import SETTINGS_KEY, Settings
    from .xdist_glue import XdistGlue

    settings = Settings.resolve(config)
    config.stash[SETTINGS_KEY] = settings
    world = cluster_world.detect(mode=settings.cluster)
    if world is None:
        RankEngine.prepare(config)  # rank processes' imports now overlap this process's own
    inventory = collect()
    config.stash[INVENTORY_KEY] = inventory
    if world is not None:
        world = dataclasses.replace(world, backend="nccl" if inventory.node.count else "gloo")
    register = config.pluginmanager.register
    watch = HealthWatch(config, inventory.node)
    config.stash[WATCH_KEY] = watch
    if config.pluginmanager.hasplugin("xdist"):
        glue = XdistGlue(config, watch.handoff)
        glue.check_usage(world, inventory.node)
        register(glue, XdistGlue.PLUGIN_NAME)
    if world is not None:
        check_rendezvous_environment(world)
        config.stash[CLUSTER_KEY] = world

    # {host} and {rank} in --junitxml: the shell cannot fill them in under torchrun. Done
    # here, before junitxml's own pytest_configure opens the file (this hook is tryfirst).
    junit_template = getattr(config.option, "xmlpath", None)
    if junit_template:
        host = world.host if world else inventory.host
        config.option.xmlpath = cluster_world.template_path(junit_template, host, world.rank if world else 0)
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args[:] = [str(suite_dir())]

    if settings.spec is not None:  # before the policy: see acceptance/plugin.py
        from .acceptance.plugin import SpecChecks

        register(SpecChecks(config, settings.spec), SpecChecks.PLUGIN_NAME)
    register(CollectionPolicy(settings, inventory, world), CollectionPolicy.PLUGIN_NAME)
    if world is None:
        register(RankEngine(config, settings, inventory), RankEngine.PLUGIN_NAME)
    else:
        register(
            ClusterMode(config, world, settings.timeout, junit_template, settings.cluster_junit),
            ClusterMode.PLUGIN_NAME,
        )
    register(ReportingPlugin(config, settings, inventory), ReportingPlugin.PLUGIN_NAME)
    register(watch, HealthWatch.PLUGIN_NAME)
    register(BaselineState(settings, inventory), "gpuconform-baseline")
    config.pluginmanager.import_plugin("pytest_gpuconform.fixtures")


# -- not enabled: a hint for tests that need the plugin ---------------------------------------
def _needs_plugin(item: pytest.Item) -> bool:
    from . import compat

    return any(item.get_closest_marker(name) for name in OWN_MARKERS) or bool(
        compat.unresolved_fixtures(item) & FIXTURES
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not options.is_enabled(config):
        config.stash[_USERS_KEY] = [item.nodeid for item in items if _needs_plugin(item)]


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    users = config.stash.get(_USERS_KEY, [])
    if not users:
        return []
    return [
        f"gpuconform: {len(users)} test(s) use the markers or fixtures of pytest-gpuconform "
        f"(first: {users[0]}); {ENABLE_HINT}"
    ]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    if report.when == "setup" and report.failed and item.nodeid in item.config.stash.get(_USERS_KEY, ()):
        from . import compat

        missing = sorted(compat.unresolved_fixtures(item) & FIXTURES)
        if missing:
            report.sections.append(("pytest-gpuconform", f"fixture(s) {', '.join(missing)}: {ENABLE_HINT}"))
    return report


# xdist resolves "-n auto" in its pytest_cmdline_main, before pytest_configure registers
# XdistGlue, so this one xdist hook lives here (optionalhook: harmless without xdist) and
# answers only when the plugin is enabled.
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    if not options.is_enabled(config):
        return None
    from .xdist_glue import XdistGlue

    return XdistGlue.auto_num_workers()
