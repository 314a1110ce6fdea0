"""Health counters watched across the whole run: read at session start, compared at the end.

Volatile ECC counts, remapped rows and XID events can change while the suite runs; a
numerics failure that coincides with such a change is a hardware verdict, so the change
itself must fail a test case. ``HealthWatch`` is that plugin (registered in enabled runs by plugin.py):

* reads the start snapshot of the GPUs the run may use (the visible ones) and registers
  for XID events (NVML reports only XIDs that occur after registration), in every process
  that runs tests;
* moves tests decorated with ``run_last`` to the end of the collection, so
  ``test_health.py::test_counters_unchanged_during_run`` compares start and end after
  everything else ran;
* under pytest-xdist, hands the controller's GPU list and start snapshot to the workers
  (each worker's own view is pinned to one GPU; xdist_glue.py delivers it), and, because the worker that runs the
  last test may finish before its neighbours, compares once more in the controller after
  all workers are done; a change then is reported as the extra test case
  ``gpuconform/health::counters_unchanged_after_all_workers``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from ..node import nvml
from ..reporting.extra_case import report_extra_case
from ..xdist_glue import XdistRole
from . import readings, rules

WATCH_KEY: pytest.StashKey[HealthWatch] = pytest.StashKey()
WORKERINPUT_KEY = "gpuconform_health"
CONTROLLER_NODEID = "gpuconform/health::counters_unchanged_after_all_workers"


def run_last(function):
    """Mark a test to run after every other test of the session (see module docstring)."""
    function.gpuconform_run_last = True
    return function


class HealthWatch:
    PLUGIN_NAME = "gpuconform-health-watch"

    def __init__(self, config: pytest.Config, node: nvml.NodeGpus) -> None:
        self.config = config
        handed = getattr(config, "workerinput", {}).get(WORKERINPUT_KEY)
        # Boards, not MIG slices: counters, links and XIDs belong to the board (readings.py).
        self.uuids: list[str] = handed["uuids"] if handed else list(dict.fromkeys(g.board_uuid for g in node.visible))
        self._handed_start = handed
        self.start: list[readings.GpuHealth] | None = None
        self.start_error = ""
        self._nvml = contextlib.ExitStack()  # the NVML session the XID event sets live in
        self._pynvml: Any = None
        self._event_sets: dict[str, object] = {}
        self.xid_notes: dict[str, str] = {}

    # -- start ----------------------------------------------------------------------------
    def ensure_started(self) -> None:
        if self.start is not None or self.start_error or not self.uuids:
            return
        if self._handed_start:
            self.start = [readings.GpuHealth.from_dict(d) for d in self._handed_start["start"]]
            self.start_error = self._handed_start["start_error"]
        else:
            try:
                self.start = readings.read_node(self.uuids)
            except readings.HealthUnavailable as exc:
                self.start_error = str(exc)
            else:
                gone = readings.missing(self.uuids, self.start)
                if gone:  # visible in the inventory moments ago, not listed now
                    self.start_error = f"NVML does not list GPU(s) {', '.join(gone)} that the inventory saw"
        self._register_xid_events()

    def handoff(self) -> dict:
        """What an xdist worker needs from the controller, as its ``workerinput`` (xdist_glue.py)."""
        self.ensure_started()
        start = [g.as_dict() for g in self.start or []]
        return {WORKERINPUT_KEY: {"uuids": self.uuids, "start": start, "start_error": self.start_error}}

    def _register_xid_events(self) -> None:
        try:
            pynvml = self._nvml.enter_context(nvml.nvml_session())
        except nvml.NvmlUnavailable as exc:  # no NVML: nothing to watch; the health tests say why
            self.xid_notes = {u: f"NVML unavailable ({exc})" for u in self.uuids}
            return
        self._pynvml = pynvml
        for uuid in self.uuids:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
                event_set = pynvml.nvmlEventSetCreate()
                pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
                self._event_sets[uuid] = event_set
            except pynvml.NVMLError as exc:
                self.xid_notes[uuid] = f"XID events not applicable ({type(exc).__name__}: {exc})"

    # -- end ------------------------------------------------------------------------------
    def drain_xids(self) -> dict[str, list[int]]:
        """XIDs seen by each GPU's event set since registration (or since the last drain)."""
        seen: dict[str, list[int]] = {}
        pynvml = self._pynvml
        for uuid, event_set in self._event_sets.items():
            events: list[int] = []
            wait = getattr(pynvml, "nvmlEventSetWait_v2", None) or pynvml.nvmlEventSetWait
            for _ in range(10_000):
                try:
                    events.append(int(wait(event_set, 0).eventData))
                except pynvml.NVMLError as exc:
                    if type(exc).__name__ != "NVMLError_Timeout":
                        self.xid_notes[uuid] = f"reading XID events failed ({type(exc).__name__}: {exc})"
                    break
            seen[uuid] = events
        return seen

    def changes(self) -> list[str]:
        """One line per change since the start snapshot (empty: nothing changed)."""
        self.ensure_started()
        if self.start is None:
            return []
        now = {g.uuid: g for g in readings.read_node(self.uuids)}
        xids = self.drain_xids()
        problems: list[str] = []
        for before in self.start:
            problems += rules.counter_changes(before, now.get(before.uuid), xids.get(before.uuid, []))
        return problems

    def close(self) -> None:
        pynvml, self._pynvml = self._pynvml, None
        if pynvml is not None:
            for event_set in self._event_sets.values():
                try:
                    pynvml.nvmlEventSetFree(event_set)
                except pynvml.NVMLError:
                    pass
        self._event_sets.clear()
        self._nvml.close()

    # -- hooks ----------------------------------------------------------------------------
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.close()

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.ensure_started()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        last = [i for i in items if getattr(getattr(i, "obj", None), "gpuconform_run_last", False)]
        if last:
            items[:] = [i for i in items if i not in last] + last

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session):
        result = yield
        if XdistRole.is_controller(session.config) and self.uuids:
            try:
                problems = self.changes()
            except readings.HealthUnavailable as exc:
                problems = [f"NVML could not be read at the end of the run: {exc}"]
            if problems:
                report_extra_case(session.config, CONTROLLER_NODEID, "\n".join(problems))
        return result
