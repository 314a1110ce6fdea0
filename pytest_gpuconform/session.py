"""Everything the plugin does in an enabled run, as one plugin object per pytest process.

Registered by plugin.py only under ``--gpuconform``. It owns the run's settings (resolved
from CLI and ini once), the node inventory, and the collection-time decisions: which
parameters exist, which are skipped and why, and which JUnit properties each test carries.
"""

from __future__ import annotations

import os

import pytest

from . import gpu_lease, inventory, options, parametrize, tolerances
from .engine import cluster
from .requirements import (
    dtype_shortfall,
    gpu_capability_shortfall,
    gpu_count_shortfall,
    gpu_need,
)
from .suite import suite_dir

STATE_KEY: pytest.StashKey["GpuconformSession"] = pytest.StashKey()

# Properties the plugin itself attaches to every test case; everything else a test
# records is a measurement and shows in the terminal summary.
STANDARD_PROPERTIES = ("feature", "device", "dtype", "world_size", "backend")


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


class GpuconformSession:
    PLUGIN_NAME = "gpuconform-session"

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        config.stash[STATE_KEY] = self
        self.expect_gpus = options.ini_or_option(config, "gpuconform_expect_gpus", options.non_negative_int, 0)
        self.cpu_ranks = options.ini_or_option(
            config, "gpuconform_cpu_ranks", options.positive_int, max(2, os.cpu_count() or 1)
        )
        self.timeout = options.ini_or_option(config, "gpuconform_timeout", options.positive_float, 120.0)
        try:
            self.tolerances = tolerances.build_table(
                list(config.getini("gpuconform_tolerances")) + list(config.getoption("gpuconform_tolerance"))
            )
        except tolerances.BadTolerance as exc:
            raise pytest.UsageError(str(exc)) from None
        self.inventory = inventory.collect()
        self.cluster_world = cluster.detect(mode=config.getoption("gpuconform_cluster"))
        self.cluster = None
        self.merged_junit: str | None = None
        self._template_junit_path(config)
        self._check_xdist(config)
        from .engine.pytest_bridge import RankEngine

        self.engine = RankEngine(self.timeout, bool(config.getoption("gpuconform_fresh_ranks")))
        if self.cluster_world is not None:
            self.engine.enabled = False
            backend = "nccl" if self.node.count else "gloo"
            self.cluster = cluster.ClusterSession(self.cluster_world, backend, self.timeout, self.junit_template)
            config.pluginmanager.register(self.cluster, cluster.ClusterSession.PLUGIN_NAME)
        config.pluginmanager.register(self.engine, RankEngine.PLUGIN_NAME)
        if config.args_source != pytest.Config.ArgsSource.ARGS:
            config.args[:] = [str(suite_dir())]

    @property
    def node(self):
        return self.inventory.node

    def _template_junit_path(self, config: pytest.Config) -> None:
        """Expand {host} and {rank} in --junitxml (the shell cannot, under torchrun)."""
        self.junit_template = getattr(config.option, "xmlpath", None)
        if not self.junit_template:
            return
        world = self.cluster_world
        host = world.host if world else self.inventory.host
        config.option.xmlpath = cluster.template_path(self.junit_template, host, world.rank if world else 0)

    def _check_xdist(self, config: pytest.Config) -> None:
        workers = getattr(config.option, "numprocesses", None)
        if not isinstance(workers, int) or workers <= 0 or _is_xdist_worker(config):
            return
        if self.cluster_world is not None:
            raise pytest.UsageError(
                f"-n {workers} cannot be combined with cluster mode ({self.cluster_world.launcher} started "
                f"{self.cluster_world.world_size} ranks): every rank must run the same tests in the same order; "
                "drop -n (or pass --gpuconform-cluster off for independent per-node runs)"
            )
        gpus = self.node.count
        if gpus and workers > gpus:
            raise pytest.UsageError(
                f"-n {workers} on a node with {gpus} visible GPU(s) would make workers share GPUs; "
                f"use -n auto (one worker per GPU) or -n {gpus} or fewer"
            )

    # -- header -----------------------------------------------------------------------
    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        lines = self.inventory.header_lines()
        if self.expect_gpus:
            lines.append(f"gpuconform: strict acceptance: expecting >= {self.expect_gpus} GPU(s)")
        return lines

    # -- collection ---------------------------------------------------------------------
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        parametrize.generate(metafunc)

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session, config, items) -> None:
        for item in items:
            self._annotate(item)
            self._apply_requirements(item)

    def _annotate(self, item: pytest.Item) -> None:
        params = getattr(getattr(item, "callspec", None), "params", {})
        module = getattr(item, "module", None)
        feature = (module.__name__.rsplit(".", 1)[-1] if module else item.name).removeprefix("test_")
        props = [("feature", feature)]
        if "device" in params:
            props.append(("device", params["device"]))
        if "dtype" in params:
            props.append(("dtype", params["dtype"]))
        if "world_size" in params:
            props.append(("world_size", params["world_size"]))
            props.append(("backend", "nccl" if params.get("device") == "cuda" else "gloo"))
        item.user_properties[:0] = props

    def gpu_reason(self, item: pytest.Item) -> tuple[str | None, bool]:
        """(reason this item cannot run here, whether the reason is missing GPUs)."""
        params = getattr(getattr(item, "callspec", None), "params", {})
        need = gpu_need(item.get_closest_marker("gpu"), item.nodeid)
        device = params.get("device") or ("cuda" if need else None)
        ranks = params.get("world_size") or 1
        in_cluster_world = self.cluster is not None and "world_size" in params
        if in_cluster_world:
            reason = self._cluster_reason(ranks, device)
            if reason:
                return reason, False
        n = max(need.n if need else 0, ranks if device == "cuda" else 0)
        if n and not in_cluster_world:  # a cluster world's GPUs are spread over its nodes
            tokens = gpu_lease.node_gpu_tokens() if "world_size" in params else None
            reason = gpu_count_shortfall(self.node, n, None if tokens is None else len(tokens))
            if reason:
                return reason, True
        if need:
            reason = gpu_capability_shortfall(self.node, need)
            if reason:
                return reason, False
        if "dtype" in params and device:
            reason = dtype_shortfall(self.node, params["dtype"], device, max(n, 1))
            if reason:
                return reason, False
        if device == "cpu" and "world_size" in params and ranks > self.cpu_ranks and not in_cluster_world:
            return (f"needs {ranks} gloo ranks; this CPU node hosts at most {self.cpu_ranks} "
                    f"(--gpuconform-cpu-ranks)"), False
        return None, False

    def _cluster_reason(self, ranks: int, device: str | None) -> str | None:
        world = self.cluster.world
        if ranks != world.world_size:
            return (f"needs world size {ranks}; {world.launcher} launched {world.world_size} ranks "
                    "(cluster mode runs only tests whose size equals the launched world)")
        wanted = "cuda" if self.cluster.backend == "nccl" else "cpu"
        if device != wanted:
            return f"cluster world uses {self.cluster.backend} ({wanted}); the {device} variant runs in per-node mode"
        return None

    def _apply_requirements(self, item: pytest.Item) -> None:
        reason, missing_gpus = self.gpu_reason(item)
        if reason is None:
            return
        if missing_gpus and self.node.count < self.expect_gpus:
            item.stash[STRICT_FAILURE] = (
                f"strict acceptance (--gpuconform-expect-gpus {self.expect_gpus}): {reason}"
            )
        else:
            item.add_marker(pytest.mark.skip(reason=reason))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        # In the call phase, not setup, so JUnit shows a <failure>, not an <error>.
        message = item.stash.get(STRICT_FAILURE, None)
        if message:
            pytest.fail(message, pytrace=False)

    # -- reports ------------------------------------------------------------------------
    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if _is_xdist_worker(self.config):
            return
        from . import junit_suite

        junit_suite.add_suite_properties(self.config, self.inventory.properties())

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        xmlpath = getattr(self.config.option, "xmlpath", None)
        if xmlpath and not _is_xdist_worker(self.config) and os.path.exists(xmlpath):
            from .merge import make_schema_safe

            # The JUnit schema CI tools validate against has no <error> element: errors are
            # written as <failure type="error"> with the same message.
            make_schema_safe(xmlpath)
        if self.cluster is None:
            return
        from .engine import cluster_report

        reports = self.cluster.gather_reports(xmlpath)
        if not any(text for _, _, text in reports):
            return
        merged = cluster_report.merge(reports)
        if cluster_report.failed(merged) and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED  # another rank failed: so does this one
        if self.cluster.world.rank == 0 and self.junit_template:
            target = self.config.getoption("gpuconform_cluster_junit") or cluster.merged_path(self.junit_template)
            cluster_report.write(merged, target)
            self.merged_junit = target

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.cluster is not None:
            self.cluster.close()

    def pytest_terminal_summary(self, terminalreporter) -> None:
        from .summary import summary_lines_from_stats  # issue 6: area x (device, dtype, ws) table

        terminalreporter.section("gpuconform summary")
        junit = getattr(self.config.option, "xmlpath", None)
        for line in summary_lines_from_stats(terminalreporter.stats, junit, self.merged_junit):
            terminalreporter.write_line(line)


STRICT_FAILURE: pytest.StashKey[str] = pytest.StashKey()
