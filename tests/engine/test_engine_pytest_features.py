"""What works in a plain pytest test works in a multi-rank one: every rank runs the real
item through pytest's protocol, fixtures resolved in the rank at every scope.

One subprocess runs them all (ranks are started once, and again after each failure); each
behaviour is checked on its own JUnit case. The tests were written against the failures a
user met with the first engine (pickled functions and controller-side fixtures).
"""

from __future__ import annotations

import re

import pytest

from support.runs import run_pytest, write_files

CONFTEST = """
import os
import pytest

@pytest.fixture(scope="session")
def session_marker():
    # one line per set-up and tear-down, per rank process
    path = os.path.join(os.environ["FEATURES_OUT"], f"session-{os.getpid()}.txt")
    with open(path, "a") as out:
        out.write("setup\\n")
    yield path
    with open(path, "a") as out:
        out.write("teardown\\n")
"""

FEATURES = """
import json, logging, os, unittest, warnings
import pytest
import torch
import torch.distributed as dist

MODULE_SETUPS = []

@pytest.fixture(scope="module")
def module_resource():
    MODULE_SETUPS.append(1)
    return len(MODULE_SETUPS)

@pytest.mark.world_size(2)
def test_a_monkeypatch(rank, monkeypatch, session_marker, module_resource):
    monkeypatch.setattr(json, "dumps", lambda *a, **k: "patched")
    monkeypatch.setenv("GPUCONFORM_PATCHED", "1")
    assert json.dumps(1) == "patched"

@pytest.mark.world_size(2)
def test_b_monkeypatch_undone(rank, session_marker, module_resource, record):
    assert json.dumps(1) == "1", "monkeypatch of the previous test leaked"
    assert "GPUCONFORM_PATCHED" not in os.environ
    record("module_setups", module_resource)

@pytest.mark.world_size(2)
def test_c_capsys_caplog_request(rank, capsys, caplog, request):
    print(f"printed by rank {rank}")
    logging.getLogger("mine").warning("logged by rank %d", rank)
    assert capsys.readouterr().out == f"printed by rank {rank}\\n"
    assert f"logged by rank {rank}" in caplog.text
    assert request.node.name == "test_c_capsys_caplog_request[ws2-cpu]"

@pytest.mark.world_size(2)
def test_d_imperative_xfail(rank):
    pytest.xfail("not there yet")

@pytest.mark.world_size(2)
@pytest.mark.xfail(raises=AssertionError, strict=True, reason="known bug")
def test_e_strict_xfail(rank):
    assert rank == 99

@pytest.mark.world_size(2)
@pytest.mark.filterwarnings("error")
def test_f_warning_is_error(rank):
    warnings.warn("careful", UserWarning)

@pytest.mark.world_size(2)
class TestUnittest(unittest.TestCase):
    def test_g_has_process_group(self):
        self.assertTrue(dist.is_initialized())
        t = torch.ones(1)
        dist.all_reduce(t)
        self.assertEqual(t.item(), dist.get_world_size())

@pytest.mark.world_size(2)
def test_h_dict_diff(rank):
    assert {"lr": 0.1, "rank": rank} == {"lr": 0.1, "rank": 0}

class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")

    def __reduce__(self):
        raise TypeError("no pickle either")

@pytest.mark.world_size(2)
def test_i_unprintable_exception(rank):
    raise Unprintable()

@pytest.mark.world_size(2)
@pytest.mark.xfail(reason="only on some ranks")
def test_j_xfail_on_one_rank(rank):
    assert rank == 0

@pytest.mark.world_size(2)
def test_k_tmp_paths(rank, tmp_path, shared_tmp_path):
    (shared_tmp_path / f"from{rank}").write_text(str(tmp_path))
    dist.barrier()
    seen = sorted(p.name for p in shared_tmp_path.iterdir())
    assert seen == ["from0", "from1"], seen
    assert (shared_tmp_path / "from0").read_text() != (shared_tmp_path / "from1").read_text()

@pytest.mark.world_size(2)
def test_l_loud_then_crash(rank):
    if rank == 1:
        os.write(1, b"x" * 300_000 + b"\\n")
        print("the last words of rank 1", flush=True)
        os._exit(7)
    dist.barrier()

@pytest.mark.world_size(2)
def test_m_silent_crash(rank):
    if rank == 1:
        os._exit(3)
    dist.barrier()

@pytest.mark.world_size(2)
def test_n_last(rank, session_marker):
    pass
"""


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    directory = tmp_path_factory.mktemp("features")
    write_files(directory, {"conftest.py": CONFTEST, "test_features.py": FEATURES})
    logs = directory / "rank-logs"
    run = run_pytest(
        directory,
        "-p",
        "no:randomly",
        "-k",
        "cpu or Unittest",
        "-rA",
        f"--gpuconform-rank-logs={logs}",
        env={"FEATURES_OUT": str(directory)},
    )
    return run


def test_monkeypatch_is_undone_and_fixtures_are_cached_per_rank(features):
    assert features.outcome("test_a_monkeypatch[ws2-cpu]")[0] == "passed"
    assert features.outcome("test_b_monkeypatch_undone[ws2-cpu]")[0] == "passed", features.output[-3000:]
    assert features.properties("test_b_monkeypatch_undone[ws2-cpu]")["module_setups"] == "1"


def test_session_fixtures_live_per_rank_and_are_torn_down_with_the_pool(features):
    markers = sorted(features.directory.glob("session-*.txt"))
    # ranks of the first pool, then of the pool that replaced it after the failing tests
    assert len(markers) >= 4 and len(markers) % 2 == 0, markers
    for marker in markers:
        assert marker.read_text() == "setup\nteardown\n", (marker, marker.read_text())


def test_capsys_caplog_and_request_work_in_ranks(features):
    assert features.outcome("test_c_capsys_caplog_request[ws2-cpu]")[0] == "passed", features.output[-3000:]
    assert re.search(r"Captured log call \[rank 1\].*\n.*logged by rank 1", features.output)


def test_xfail_imperative_and_strict_raises(features):
    assert features.outcome("test_d_imperative_xfail[ws2-cpu]")[:2] == ("skipped", "not there yet")
    assert features.outcome("test_e_strict_xfail[ws2-cpu]")[:2] == ("skipped", "known bug")


def test_filterwarnings_error_applies_in_ranks(features):
    kind, message, _ = features.outcome("test_f_warning_is_error[ws2-cpu]")
    assert kind == "failure" and re.fullmatch(r"rank [01] failed: UserWarning: careful", message), message


def test_unittest_test_case_runs_in_ranks_with_a_process_group(features):
    assert features.outcome("test_g_has_process_group")[0] == "passed", features.output[-3000:]
    assert features.properties("test_g_has_process_group")["world_size"] == "2"


def test_assertion_diff_and_the_tests_own_line(features):
    kind, message, text = features.outcome("test_h_dict_diff[ws2-cpu]")
    assert kind == "failure"
    assert message.startswith("rank 1 failed: AssertionError: assert {'lr': 0.1, 'rank': 1} == {'lr': 0.1, 'rank': 0}")
    assert "Differing items:" in text and "{'rank': 1} != {'rank': 0}" in text
    line = next(i for i, s in enumerate(FEATURES.splitlines(), 1) if 'assert {"lr": 0.1' in s)
    assert f"test_features.py:{line}: AssertionError" in text, text  # where annotators put it
    assert "rank 0: passed (setup " in text and ", call " in text


def test_an_exception_that_cannot_be_printed_or_pickled_is_reported_by_type(features):
    kind, message, text = features.outcome("test_i_unprintable_exception[ws2-cpu]")
    assert kind == "failure" and re.match(r"rank [01] failed: test_features.Unprintable", message), message
    assert "raise Unprintable()" in text and "exited" not in message


def test_xfail_must_agree_across_ranks(features):
    kind, message, _ = features.outcome("test_j_xfail_on_one_rank[ws2-cpu]")
    assert kind == "failure"
    assert message == (
        "ranks disagree about xfail: rank 0: xpassed: only on some ranks; rank 1: xfailed: only on some ranks"
    )


def test_tmp_path_is_per_rank_and_shared_tmp_path_is_shared(features):
    assert features.outcome("test_k_tmp_paths[ws2-cpu]")[0] == "passed", features.output[-3000:]


def test_a_loud_rank_keeps_its_last_lines(features):
    kind, message, text = features.outcome("test_l_loud_then_crash[ws2-cpu]")
    assert (kind, message) == ("failure", "rank 1 exited with code 7")
    assert "the last words of rank 1" in text
    assert re.search(r"\[\.\.\. \d+ bytes elided \.\.\.\]", features.output)
    assert "the last words of rank 1" in features.output.split("bytes elided")[-1]
    logs = [p.read_text() for p in features.directory.joinpath("rank-logs").glob("*-rank1.log")]
    assert any("x" * 300_000 in log for log in logs), "--gpuconform-rank-logs keeps the whole log"


def test_a_silent_crash_says_no_output(features):
    kind, message, text = features.outcome("test_m_silent_crash[ws2-cpu]")
    assert (kind, message) == ("failure", "rank 1 exited with code 3")
    assert "--- rank 1 output (last lines) ---\n(no output)" in text
    assert "rank 1: crashed: exited with code 3 during call" in text


def test_start_up_is_reported_apart_from_the_test(features):
    """The test after a failure starts new ranks: their start-up is a line of its own, and each
    rank's line gives the phases' own times (a trivial body is not 'passed (2.45 s)' for the ranks' start-up)."""
    _, _, text = features.outcome("test_i_unprintable_exception[ws2-cpu]")
    assert re.search(r"start-up \(before the test, not in its phases\): ranks ready in \d+\.\d\d s", text), text
    assert re.search(r"rank 1: failed: test_features.Unprintable: .* \(setup 0\.\d\d s, call 0\.\d\d s", text), text
