"""Results are bound to their test: a message of another test is never attributed to this
one and gets the ranks replaced; an exception that reaches the controller while it waits
kills the pool. In-process, against a stand-in pool: the messages are the engine's own."""

from __future__ import annotations

import pytest

from pytest_gpuconform.engine.attempt import Attempt
from pytest_gpuconform.engine.rank.messages import Finished, Reports, RunTest


class _Report:
    """Just enough of a deserialised TestReport for the attempt."""

    def __init__(self, when: str, outcome: str = "passed") -> None:
        self.when, self.outcome = when, outcome
        self.passed, self.failed = outcome == "passed", outcome == "failed"
        self.duration = 0.0


class FakePool:
    key = (2, "gloo", "cpu")
    name = "ws2-gloo-cpu-fake"
    device_kind = "cpu"
    world_size = 2
    leave_problems: list = []

    def __init__(self, script, nccl_logs=None) -> None:
        self.script = list(script)
        self.killed = False
        self.ranks: list = []
        self.nccl = dict(nccl_logs or {})

    def nccl_logs(self):
        return self.nccl

    def send(self, request):
        return {0: 0, 1: 0}

    def poll(self, ranks, timeout):
        if not self.script:
            return []
        step = self.script.pop(0)
        if callable(step):
            step = step()
        if isinstance(step, BaseException):
            raise step
        return step

    def exitcode(self, rank):
        return None

    def phase(self, rank):
        return ""

    def dump_stacks(self, ranks):
        return {rank: "" for rank in ranks}

    def output(self, rank, start, end=None):
        return ""

    def kill(self):
        self.killed = True

    @property
    def exited(self):
        return True


REQUEST = RunTest(seq=7, nodeid="t.py::t", path="/t.py", names=("t",), seed=1, next_path=None)


def _finished(seq: int, rank: int) -> Finished:
    return Finished(seq, rank, reports=[{"when": w} for w in ("setup", "call", "teardown")])


def test_a_message_of_another_test_is_dropped_and_counted():
    pool = FakePool(
        [
            [(1, Reports(6, 1, [{"when": "call", "outcome": "failed"}]))],  # the previous test's
            [(0, _finished(7, 0)), (1, _finished(7, 1))],
        ]
    )

    def deserialize(data):
        return _Report(data["when"], data.get("outcome", "passed"))

    record = Attempt(pool, REQUEST, deadline=5, deserialize=deserialize).run()  # type: ignore[arg-type]
    assert record.foreign == 1
    assert not record.events, "the other test's failure must not count for this one"
    assert all(set(run.reports) == {"setup", "call", "teardown"} for run in record.ranks)


def test_an_exception_while_waiting_kills_the_pool():
    from types import SimpleNamespace

    from pytest_gpuconform.engine.plugin import RankEngine

    engine = RankEngine.__new__(RankEngine)
    engine.pools, engine.retiring, engine.leave_problems = {}, [], []
    pool = FakePool([RuntimeError("another plugin's timeout")])
    engine.pools[pool.key] = pool  # type: ignore[assignment]
    item = SimpleNamespace(nodeid="t.py::t")
    with pytest.raises(RuntimeError, match="another plugin's timeout"):
        engine._attempt(item, REQUEST, pool, deadline=5.0, started=None)  # type: ignore[arg-type]
    assert pool.killed and pool.key not in engine.pools


def test_a_failure_carries_what_nccl_wrote_during_that_test_only(tmp_path):
    """NCCL's reason for a failed collective is in its own log: the failure names its first
    warning and keeps the rank's log from this test, not what earlier tests wrote."""
    from pytest_gpuconform.node import nccl

    logs = {0: tmp_path / "nccl-rank0.log", 1: tmp_path / "nccl-rank1.log"}
    logs[1].write_text("h:1:1 [0] NCCL WARN left over from an earlier test\n")
    logs[0].write_text("")

    def rank_1_fails():
        with logs[1].open("a") as log:
            log.write("h:1:2 [0] NCCL WARN NET/IB : Got completion with error 12, opcode 0\n")
        return [(1, Reports(7, 1, [{"when": "call", "outcome": "failed"}])), (0, _finished(7, 0))]

    pool = FakePool([rank_1_fails, [(1, _finished(7, 1))]], nccl_logs={r: str(p) for r, p in logs.items()})

    def deserialize(data):
        return _Report(data["when"], data.get("outcome", "passed"))

    record = Attempt(pool, REQUEST, deadline=5, deserialize=deserialize).run()  # type: ignore[arg-type]
    assert record.ranks[1].nccl_log == "h:1:2 [0] NCCL WARN NET/IB : Got completion with error 12, opcode 0"
    assert record.ranks[0].nccl_log == ""
    assert (
        nccl.warning_hint({r.rank: r.nccl_log for r in record.ranks})
        == "rank 1: NCCL WARN NET/IB : Got completion with error 12, opcode 0"
    )
