"""Node health from NVML, per GPU: the hardware facts a training run silently depends on.

Read in the pytest process through NVML (no CUDA context), so these tests request no
``device`` and carry no ``gpu`` marker (the engine would send a gpu-marked body to a CUDA
rank); ``node_health`` skips them on CPU nodes, or fails them under
``--gpuconform-expect-gpus`` like a gpu-marked test. A counter the card does not offer
(NotSupported, NoPermission, a driver without the call) is "not applicable": the GPU is
skipped for that check with the reason recorded, and the test skips when no GPU had the
counter.

PCIe links drop generation (on some platforms width) while a GPU idles, to save power, so
``test_pcie_link_at_max`` notes an idle GPU below its maximum instead of failing it and
test_performance.py::test_pcie_link_under_load judges the same link while a GEMM runs.
Every failure line names the GPU by index, UUID and PCI bus id, and the counter with its
value and bound. Counters belong to boards: on a MIG node the boards the visible MIG
devices live on are read.
"""

import pytest

from pytest_gpuconform.checks.hardware import (
    HealthUnavailable,
    gpu_count_shortfall,
    health_rules,
    missing_gpus,
    read_node,
    run_last,
)


def _require_gpus(health_watch, node_inventory, expect_gpus):
    """Skip on CPU nodes (fail under strict acceptance), as the gpu marker does."""
    if health_watch.uuids:
        return
    reason = gpu_count_shortfall(node_inventory.node, 1)
    if expect_gpus:
        pytest.fail(f"strict acceptance (--gpuconform-expect-gpus {expect_gpus}): {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node_health(health_watch, node_inventory, expect_gpus):
    """A fresh reading of every GPU the run uses."""
    _require_gpus(health_watch, node_inventory, expect_gpus)
    try:
        gpus = read_node(health_watch.uuids)
    except HealthUnavailable as exc:
        pytest.fail(f"NVML sees GPUs but health counters cannot be read: {exc}", pytrace=False)
    gone = missing_gpus(health_watch.uuids, gpus)
    if gone:
        pytest.fail(f"GPU(s) {', '.join(gone)} visible at start-up are no longer listed by NVML", pytrace=False)
    return gpus


def _judge(gpus, rule, record, name):
    """Apply ``rule`` to every GPU; fail with all problem lines, skip when nothing applied."""
    problems, notes, applied = [], [], 0
    for gpu in gpus:
        finding = rule(gpu)
        problems += finding.problems
        notes += finding.notes
        applied += finding.applicable
        record(f"gpu{gpu.index}_{name}", "fail" if finding.problems else ("ok" if finding.applicable else "n/a"))
    for note in notes:
        record(f"{name}_note", note)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    if not applied:
        pytest.skip(f"{name}: not applicable on any GPU: " + "; ".join(notes))


def _record_counters(node_health, record, counters) -> None:
    """Record each GPU's reading of these counters (those its card has)."""
    for gpu in node_health:
        for counter in counters:
            if counter in gpu.values:
                record(f"gpu{gpu.index}_{counter}", gpu.values[counter])


def test_no_uncorrectable_ecc_errors(node_health, record):
    _record_counters(
        node_health,
        record,
        ("ecc_mode", "ecc_uncorrected_volatile", "ecc_corrected_volatile", "ecc_uncorrected_aggregate"),
    )
    _judge(node_health, health_rules.ecc, record, "ecc")


def test_no_pending_memory_repairs(node_health, record):
    _record_counters(node_health, record, ("remapped_rows_correctable", "remapped_rows_uncorrectable"))
    _judge(node_health, health_rules.memory_repair, record, "memory_repair")


def test_no_hardware_throttling(node_health, record):
    for gpu in node_health:
        if "clocks_event_reasons" in gpu.values:
            record(
                f"gpu{gpu.index}_clocks_event_reasons", health_rules.reason_names(gpu.values["clocks_event_reasons"])
            )
    _judge(node_health, health_rules.throttling, record, "throttling")


def test_pcie_link_at_max(node_health, record):
    _record_counters(
        node_health, record, ("pcie_gen", "pcie_max_gen", "pcie_width", "pcie_max_width", "pcie_replay_counter")
    )
    _judge(node_health, health_rules.pcie_link, record, "pcie_link")


def test_nvlinks_up(node_health, record):
    for gpu in node_health:
        if "nvlink_up" in gpu.values:
            record(f"gpu{gpu.index}_nvlinks_up", sum(gpu.values["nvlink_up"]))
            record(f"gpu{gpu.index}_nvlinks", len(gpu.values["nvlink_up"]))
    _judge(node_health, health_rules.nvlink, record, "nvlink")


def test_nvswitch_fabric_registered(node_health, record):
    """HGX/NVL systems: the fabric manager registered every GPU with the NVSwitch fabric
    (not applicable, and skipped with the reason, elsewhere)."""
    _record_counters(node_health, record, ("fabric_state", "fabric_status"))
    _judge(node_health, health_rules.fabric, record, "fabric")


def test_persistence_mode_recorded(node_health, record):
    """Recorded, not judged: persistence mode is site policy (it avoids slow driver
    re-initialisation between jobs; many schedulers enable it, some sites do not)."""
    read = 0
    for gpu in node_health:
        if "persistence_mode" in gpu.values:
            record(f"gpu{gpu.index}_persistence_mode", "on" if gpu.values["persistence_mode"] else "off")
            read += 1
        elif "persistence_mode" in gpu.errors:
            pytest.fail(f"{gpu.label()}: persistence_mode: NVML error {gpu.errors['persistence_mode']}", pytrace=False)
    if not read:
        pytest.skip(
            "persistence_mode: not applicable on any GPU: "
            + "; ".join(f"{g.label()}: {g.not_applicable.get('persistence_mode')}" for g in node_health)
        )


@run_last
def test_counters_unchanged_during_run(health_watch, node_inventory, expect_gpus, record):
    """Runs after every other test: ECC counts, remapped rows and XIDs must not have moved."""
    _require_gpus(health_watch, node_inventory, expect_gpus)
    if health_watch.start_error:
        pytest.fail(f"health counters could not be read at session start: {health_watch.start_error}", pytrace=False)
    for uuid, note in health_watch.xid_notes.items():
        record(f"xid_note_{uuid}", note)
    try:
        problems = health_watch.changes()
    except HealthUnavailable as exc:
        pytest.fail(f"health counters could not be read at the end of the run: {exc}", pytrace=False)
    record("gpus_watched", len(health_watch.uuids))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
