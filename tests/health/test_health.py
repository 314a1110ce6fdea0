"""Health checks against the fake NVML: every branch, and the messages name GPU and counter.

Readers and rules are tested in this process (``fake_pynvml``, tests/conftest.py, swaps the
fake module in for pynvml); the shipped conformance tests run in subprocesses with the fake
NVML on PYTHONPATH. Those runs select test_health.py only, so no CUDA test is attempted on
this CPU machine.
"""

from __future__ import annotations

import pytest

from pytest_gpuconform.health import readings as health
from pytest_gpuconform.health import rules as health_rules
from support import h100

RESHIPPED = "from pytest_gpuconform.conformance.test_health import *  # noqa: F401,F403\n"


def label(index: int) -> str:
    gpu = h100(index)
    return f"GPU {index} ({gpu['uuid']}, bus {gpu['bus_id']})"


NOT_SUPPORTED = {"error": "NotSupported"}
ALL_NOT_SUPPORTED = dict(
    ecc_mode=NOT_SUPPORTED,
    ecc_uncorrected_volatile=NOT_SUPPORTED,
    ecc_corrected_volatile=NOT_SUPPORTED,
    ecc_uncorrected_aggregate=NOT_SUPPORTED,
    remapped_rows=NOT_SUPPORTED,
    retired_pages_pending=NOT_SUPPORTED,
    clocks_event_reasons=NOT_SUPPORTED,
    pcie_gen=NOT_SUPPORTED,
    pcie_max_gen=NOT_SUPPORTED,
    pcie_width=NOT_SUPPORTED,
    pcie_max_width=NOT_SUPPORTED,
    pcie_replay_counter=NOT_SUPPORTED,
    nvlink=NOT_SUPPORTED,
    persistence_mode=NOT_SUPPORTED,
    fabric=NOT_SUPPORTED,
)


# -- reading ------------------------------------------------------------------------------
def test_reader_sorts_values_not_applicable_and_errors(fake_pynvml):
    fake_pynvml(
        {
            "gpus": [
                h100(0, retired_pages_pending=0),
                dict(h100(1), **ALL_NOT_SUPPORTED),
                h100(2, ecc_uncorrected_volatile={"error": "GpuIsLost"}, remapped_rows={"error": "NoPermission"}),
            ]
        }
    )
    healthy, unsupported, lost = health.read_node()
    assert healthy.values["ecc_uncorrected_volatile"] == 0 and healthy.values["nvlink_up"] == [True] * 18
    assert healthy.values["row_remap_pending"] is False and healthy.values["retired_pages_pending"] is False
    # a healthy H100 outside an NVSwitch system: only the fabric is not applicable
    assert healthy.not_applicable == {"fabric": "NotSupported"} and not healthy.errors
    assert unsupported.values == {}
    assert set(unsupported.not_applicable) >= {
        "ecc_uncorrected_volatile",
        "row_remap",
        "clocks_event_reasons",
        "pcie_gen",
        "nvlink",
        "persistence_mode",
        "fabric",
    }
    assert lost.errors == {"ecc_uncorrected_volatile": "NVMLError_GpuIsLost: GpuIsLost"}
    assert lost.not_applicable["row_remap"] == "NoPermission"
    problems = health_rules.ecc(lost).problems
    assert problems == [f"{label(2)}: ecc_uncorrected_volatile: NVML error NVMLError_GpuIsLost: GpuIsLost"]


def test_hopper_answers_retired_pages_not_supported_and_row_remap_carries_the_verdict(fake_pynvml):
    """An H100/H200 as NVML reports it: page retirement NotSupported (Ampere and later repair
    HBM by row remapping), remap counters read, each counter on its own."""
    fake_pynvml({"gpus": [h100(0, remapped_rows=[3, 0, 1, 0])]})  # retired pages: NotSupported by default
    (gpu,) = health.read_node()
    assert gpu.not_applicable["retired_pages_pending"] == "NotSupported"
    assert gpu.values["remapped_rows_correctable"] == 3 and gpu.values["row_remap_pending"] is True
    assert "ecc_uncorrected_volatile" in gpu.values and "nvlink_up" in gpu.values  # the rest still read
    (line,) = health_rules.memory_repair(gpu).problems
    assert line == f"{label(0)}: row_remap_pending = true, bound false (a row remap waits for a GPU reset)"


def test_ecc_mode_off_is_noted_not_failed(fake_pynvml):
    fake_pynvml(
        {"gpus": [h100(0, ecc_mode=0, ecc_uncorrected_volatile=NOT_SUPPORTED, ecc_corrected_volatile=NOT_SUPPORTED)]}
    )
    (gpu,) = health.read_node()
    finding = health_rules.ecc(gpu)
    assert not finding.problems and not finding.applicable
    assert finding.notes == [f"{label(0)}: not applicable (ECC mode is off on this board: no counts kept)"]


@pytest.mark.parametrize(
    "fabric, missing_functions, expected",
    [
        ({"state": 3, "status": 0}, [], None),
        ({"state": 1, "status": 0}, [], "fabric_state = 1 (not started), bound 3 (completed)"),
        ({"state": 2, "status": 0}, ["nvmlDeviceGetGpuFabricInfoV"], "fabric_state = 2 (in progress)"),
        ({"state": 3, "status": 999}, [], "fabric_status = 999, bound 0 (NVML_SUCCESS)"),
    ],
)
def test_nvswitch_fabric_state(fake_pynvml, fabric, missing_functions, expected):
    """Hopper+ on NVSwitch: the fabric manager must have registered the GPU; the deprecated
    call is used on drivers without the versioned one."""
    fake_pynvml({"missing_functions": missing_functions, "gpus": [h100(0), h100(1), h100(2, fabric=fabric)]})
    gpu = health.read_node()[2]
    assert gpu.values["fabric_state"] == fabric["state"]
    finding = health_rules.fabric(gpu)
    if expected is None:
        assert finding.problems == [] and finding.applicable
    else:
        (line,) = finding.problems
        assert line.startswith(f"{label(2)}: ") and expected in line


def test_fabric_not_applicable_without_nvswitch_or_call(fake_pynvml):
    fake_pynvml({"gpus": [h100(0), h100(1, fabric={"state": 0})]})
    no_call, not_supported_state = health.read_node()
    assert no_call.not_applicable["fabric"] == "NotSupported"
    assert not_supported_state.not_applicable["fabric"].startswith("NotSupported (no NVSwitch fabric")
    fake_pynvml(
        {
            "missing_functions": ["nvmlDeviceGetGpuFabricInfoV", "nvmlDeviceGetGpuFabricInfo"],
            "gpus": [h100(0, fabric={"state": 3})],
        }
    )
    (old_driver,) = health.read_node()
    assert old_driver.not_applicable["fabric"].startswith("FunctionNotFound")
    assert health_rules.fabric(old_driver).applicable is False


def test_reader_uses_deprecated_call_when_driver_lacks_the_new_one(fake_pynvml):
    fake_pynvml(
        {"missing_functions": ["nvmlDeviceGetCurrentClocksEventReasons"], "gpus": [h100(0, clocks_event_reasons=0x40)]}
    )
    (gpu,) = health.read_node()
    assert gpu.values["clocks_event_reasons"] == 0x40
    fake_pynvml(
        {
            "missing_functions": [
                "nvmlDeviceGetCurrentClocksEventReasons",
                "nvmlDeviceGetCurrentClocksThrottleReasons",
            ],
            "gpus": [h100(0)],
        }
    )
    (gpu,) = health.read_node()
    assert gpu.not_applicable["clocks_event_reasons"].startswith("FunctionNotFound")
    assert health_rules.throttling(gpu).applicable is False


def test_reader_selects_gpus_by_uuid_and_reports_a_broken_driver(fake_pynvml):
    fake_pynvml({"gpus": [h100(0), h100(1)]})
    assert [g.index for g in health.read_node([h100(1)["uuid"]])] == [1]
    gone = h100(9)["uuid"]
    assert health.missing([h100(1)["uuid"], gone], health.read_node([h100(1)["uuid"], gone])) == [gone]
    fake_pynvml({"init_error": "LibRmVersionMismatch", "gpus": []})
    with pytest.raises(health.HealthUnavailable, match="LibRmVersionMismatch"):
        health.read_node()


def test_watch_reads_the_boards_of_visible_mig_devices(fake_pynvml, monkeypatch):
    """A MIG device's counters are its board's: the watch asks NVML for the parent board."""
    from types import SimpleNamespace

    from pytest_gpuconform.health.watch import HealthWatch
    from pytest_gpuconform.node import nvml

    migs = [
        {"uuid": f"MIG-{i}aaaaaaa-0000-0000-0000-000000000000", "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb"}
        for i in (1, 2)
    ]
    fake_pynvml({"gpus": [h100(0), h100(1, mig={"enabled": 1, "devices": migs})]})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", migs[1]["uuid"])
    node = nvml.query(ask_cuda=lambda: [migs[1]["uuid"][4:]])
    assert [g.uuid for g in node.visible] == [migs[1]["uuid"]]
    watch = HealthWatch(SimpleNamespace(), node)
    assert watch.uuids == [h100(1)["uuid"]]
    (board,) = health.read_node(watch.uuids)
    assert board.index == 1 and "ecc_uncorrected_volatile" in board.values
    watch.close()


def test_a_board_missing_at_start_is_a_start_error(fake_pynvml):
    from types import SimpleNamespace

    from pytest_gpuconform.health.watch import HealthWatch
    from pytest_gpuconform.node.nvml import NodeGpus

    fake_pynvml({"gpus": [h100(0)]})
    watch = HealthWatch(SimpleNamespace(), NodeGpus("absent"))
    watch.uuids = [h100(0)["uuid"], h100(5)["uuid"]]
    watch.ensure_started()
    assert watch.start_error == f"NVML does not list GPU(s) {h100(5)['uuid']} that the inventory saw"
    watch.close()


# -- rules -------------------------------------------------------------------------------
def reading(index=0, **values) -> health.GpuHealth:
    base = dict(
        ecc_uncorrected_volatile=0,
        row_remap_pending=False,
        row_remap_failure=False,
        clocks_event_reasons=0,
        pcie_gen=5,
        pcie_max_gen=5,
        pcie_width=16,
        pcie_max_width=16,
        nvlink_up=[True] * 4,
    )
    base.update(values)
    gpu = h100(index)
    return health.GpuHealth(index, gpu["uuid"], gpu["bus_id"], gpu["name"], base)


def test_rules_pass_a_healthy_gpu():
    gpu = reading()
    for rule in (
        health_rules.ecc,
        health_rules.memory_repair,
        health_rules.throttling,
        health_rules.pcie_link,
        health_rules.nvlink,
    ):
        finding = rule(gpu)
        assert finding.problems == [] and finding.applicable, rule.__name__


@pytest.mark.parametrize(
    "rule, values, expected",
    [
        (health_rules.ecc, {"ecc_uncorrected_volatile": 2}, "ecc_uncorrected_volatile = 2, bound 0"),
        (health_rules.memory_repair, {"row_remap_pending": True}, "row_remap_pending = true, bound false"),
        (health_rules.memory_repair, {"row_remap_failure": True}, "row_remap_failure = true, bound false"),
        (health_rules.memory_repair, {"retired_pages_pending": True}, "retired_pages_pending = true, bound false"),
        (
            health_rules.throttling,
            {"clocks_event_reasons": 0x80 | 0x1},
            "clocks_event_reasons = 0x81 (HwPowerBrakeSlowdown active)",
        ),
        (health_rules.throttling, {"clocks_event_reasons": 0x20}, "(SwThermalSlowdown active)"),
        (health_rules.pcie_link, {"pcie_width": 8}, "pcie_width = 8, bound pcie_max_width = 16 (degraded PCIe link)"),
        (health_rules.pcie_link, {"pcie_gen": 3}, "pcie_gen = 3, bound pcie_max_gen = 5 (degraded PCIe link)"),
        (
            health_rules.nvlink,
            {"nvlink_up": [True, False, True, False]},
            "nvlink links down = [1, 3] (2 of 4), bound all up",
        ),
    ],
)
def test_rules_fail_with_gpu_counter_value_and_bound(rule, values, expected):
    (line,) = rule(reading(3, **values)).problems
    assert line.startswith(label(3) + ": ") and expected in line and "\n" not in line


def test_normal_clock_reasons_are_not_throttling():
    # idle, application clocks, software power cap, sync boost: normal operation
    assert health_rules.throttling(reading(clocks_event_reasons=0x1 | 0x2 | 0x4 | 0x10)).problems == []


def test_idle_pcie_downclock_is_noted_not_failed_but_fails_under_load():
    idle = reading(pcie_gen=1, clocks_event_reasons=0x1)
    finding = health_rules.pcie_link(idle)
    assert finding.problems == [] and not finding.applicable
    assert "not judged while the GPU idles" in finding.notes[0] and "pcie_gen = 1" in finding.notes[0]
    (line,) = health_rules.pcie_link(idle, under_load=True).problems
    assert "pcie_gen = 1, bound pcie_max_gen = 5 under load" in line


def test_pcie_card_without_bridge_is_not_applicable_for_nvlink():
    gpu = reading(nvlink_up=[False] * 12)
    gpu.name = "NVIDIA H100 PCIe"
    assert health_rules.nvlink(gpu).applicable is False


def test_counter_changes():
    before = reading(1)
    after = reading(1, ecc_uncorrected_volatile=4, row_remap_pending=True)
    after.errors["pcie_gen"] = "NVMLError_GpuIsLost: GpuIsLost"
    lines = health_rules.counter_changes(before, after, [79, 48, 1000])
    assert f"{label(1)}: ecc_uncorrected_volatile rose from 0 to 4 during the run, bound no change" in lines
    assert f"{label(1)}: row_remap_pending became true during the run, bound no change" in lines
    assert (
        f"{label(1)}: xid_events = [79 (GPU has fallen off the bus), 48 (double-bit ECC error), 1000] "
        "during the run, bound none"
    ) in lines
    assert any("GpuIsLost" in line for line in lines)
    assert health_rules.counter_changes(before, reading(1), []) == []
    assert "no longer answers NVML" in health_rules.counter_changes(before, None, [])[0]
    registered = reading(1, fabric_state=3, fabric_status=0)
    lost_fabric = reading(1, fabric_state=1, fabric_status=0)
    assert health_rules.counter_changes(registered, lost_fabric, []) == [
        f"{label(1)}: fabric_state left 3 (completed) during the run: now 1"
    ]


def test_xid_events_only_after_registration(fake_pynvml):
    from types import SimpleNamespace

    from pytest_gpuconform.health.watch import HealthWatch
    from pytest_gpuconform.node.nvml import NodeGpus

    nvml = fake_pynvml({"gpus": [h100(0, xid_events=[31])]})
    watch = HealthWatch(SimpleNamespace(), NodeGpus("absent"))  # no pytest config: the event plumbing only
    watch.uuids = [h100(0)["uuid"]]
    watch._register_xid_events()
    fake_pynvml({"gpus": [h100(0, xid_events=[31, 79, 48])]})
    assert watch.drain_xids() == {h100(0)["uuid"]: [79, 48]}
    assert watch.drain_xids() == {h100(0)["uuid"]: []}
    watch.close()
    assert nvml._state["refs"] == 0


# -- the shipped tests, end to end (subprocesses) -------------------------------------------
CHANGE_MID_RUN = """
import json, os

def test_aaa_counters_change_while_the_suite_runs():
    path = os.environ["FAKE_NVML"]
    config = json.load(open(path))
    config["gpus"][0]["ecc_uncorrected_volatile"] = 4
    config["gpus"][0]["xid_events"] = [79]
    with open(path + ".new", "w") as handle:
        json.dump(config, handle)
    os.replace(path + ".new", path)
"""


def test_shipped_health_checks_catch_every_fault(pytester, fake_nvml, run_gpuconform):
    fake_nvml(
        {
            "missing_functions": ["nvmlDeviceGetCurrentClocksEventReasons"],
            "gpus": [
                h100(0, pcie_gen=1, clocks_event_reasons=0x1),  # healthy, idle link downclocked
                h100(1, ecc_uncorrected_volatile=2),
                h100(2, remapped_rows=[0, 1, 1, 0]),
                h100(3, clocks_event_reasons=0x48),
                h100(4, pcie_gen=3, pcie_width=8, clocks_event_reasons=0),
                h100(5, nvlink=[1, 1, 0, 1]),
                dict(h100(6), **ALL_NOT_SUPPORTED),
                h100(7, fabric={"state": 1, "status": 0}),  # fabric manager not running
            ],
        }
    )
    # test_zz_change runs after the health checks and before the run-last check
    pytester.makepyfile(test_reshipped=RESHIPPED, test_zz_change=CHANGE_MID_RUN)
    result = run_gpuconform("-v", "-rA", "--junitxml", "out.xml")
    out = result.stdout.str()
    xml = (pytester.path / "out.xml").read_text()
    result.assert_outcomes(failed=7, passed=2)
    expected = [
        f"{label(1)}: ecc_uncorrected_volatile = 2, bound 0",
        f"{label(2)}: row_remap_pending = true, bound false",
        f"{label(3)}: clocks_event_reasons = 0x48 (HwSlowdown|HwThermalSlowdown active)",
        f"{label(4)}: pcie_gen = 3, bound pcie_max_gen = 5 (degraded PCIe link)",
        f"{label(4)}: pcie_width = 8, bound pcie_max_width = 16 (degraded PCIe link)",
        f"{label(5)}: nvlink links down = [2] (1 of 4), bound all up",
        f"{label(7)}: fabric_state = 1 (not started), bound 3 (completed)",
        f"{label(0)}: ecc_uncorrected_volatile rose from 0 to 4 during the run, bound no change",
        f"{label(0)}: xid_events = [79 (GPU has fallen off the bus)] during the run, bound none",
    ]
    for line in expected:
        assert line in out, line
    # notes and measurements are JUnit properties of the test case
    assert f"{label(0)}: pcie_gen = 1, bound pcie_max_gen = 5: not judged while the GPU idles" in xml
    assert '<property name="gpu1_persistence_mode" value="on" />' in xml and "gpu6_persistence_mode" not in xml
    assert '<property name="gpu6_ecc" value="n/a" />' in xml
    failures = out[out.index("= FAILURES =") : out.index("= PASSES =")]
    assert label(6) not in failures and f"{label(0)}: pcie" not in failures
    ran = [line.split()[0] for line in out.splitlines() if " PASSED " in line or " FAILED " in line]
    assert ran[-1].endswith("::test_counters_unchanged_during_run") and ran[-2].endswith(
        "::test_aaa_counters_change_while_the_suite_runs"
    )


def test_not_applicable_counters_skip_with_reasons(pytester, fake_nvml, run_gpuconform):
    fake_nvml({"gpus": [dict(h100(0), **ALL_NOT_SUPPORTED)]})
    pytester.makepyfile(test_reshipped=RESHIPPED)
    result = run_gpuconform("-rs")
    result.assert_outcomes(skipped=7, passed=1)
    result.stdout.fnmatch_lines(
        [
            f"*ecc: not applicable on any GPU: {label(0)}: not applicable (ecc_uncorrected_volatile: NotSupported)*",
            "*nvlink: not applicable on any GPU*",
            "*fabric: not applicable on any GPU*",
            "*persistence_mode: not applicable on any GPU*",
        ]
    )


def test_cpu_node_skips_and_strict_acceptance_fails(pytester, fake_nvml, run_gpuconform):
    """Health and performance checks together: skipped with the reason on a CPU node, failed
    when the node is expected to have GPUs."""
    fake_nvml({"init_error": "LibraryNotFound", "gpus": []})
    pytester.makepyfile(
        test_reshipped=RESHIPPED,
        test_reshipped_perf="from pytest_gpuconform.conformance.test_performance import *  # noqa\n",
    )
    result = run_gpuconform("-rs")
    result.assert_outcomes(skipped=8 + 8)
    result.stdout.fnmatch_lines(["*needs 1 GPU(s), node has no GPU*"])
    result.stdout.fnmatch_lines(["*needs 2 GPU(s), node has no GPU*"])
    strict = run_gpuconform("--gpuconform-expect-gpus", "1", "-rfE")
    strict.stdout.fnmatch_lines(["*strict acceptance (--gpuconform-expect-gpus 1): needs 1 GPU(s)*"])
    # health: 7 errors in the shared fixture + the run-last test; performance: 8 strict failures
    strict.assert_outcomes(failed=1 + 8, errors=7)
    assert strict.ret == 1


def test_change_after_a_workers_last_test_is_caught_under_xdist(pytester, fake_nvml, run_gpuconform):
    """Under -n the worker running the last test may finish first; the controller compares
    again after all workers and reports an extra failed test case."""
    fake_nvml({"gpus": [h100(0), h100(1)]})
    pytester.makepyfile(test_reshipped=RESHIPPED, test_zz_change=CHANGE_MID_RUN.replace('["gpus"][0]', '["gpus"][1]'))
    result = run_gpuconform("-n", "2", "--junitxml", "out.xml")
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            "*_ counters_unchanged_after_all_workers _*",
            f"{label(1)}: ecc_uncorrected_volatile rose from 0 to 4 during the run, bound no change",
        ]
    )
    xml = (pytester.path / "out.xml").read_text()
    assert 'name="counters_unchanged_after_all_workers"' in xml and "rose from 0 to 4" in xml
