"""Reused ranks start every test clean: what a test changes is put back, what cannot be put
back is found, named on the test that did it, and the ranks are rebuilt or replaced.

Each test of LEAKS changes one thing; the test after it checks it is back. One subprocess
runs them in file order (order is the point), plus a small strict-isolation run.
"""

from __future__ import annotations

import time

import pytest

from support.runs import process_alive, run_pytest, write_files

LEAKS = """
import os, resource, subprocess, sys, threading, time, warnings
import numpy as np
import pytest
import torch
import torch._dynamo
import torch.distributed as dist

def _pids(record):
    t = torch.tensor([os.getpid()], dtype=torch.int64)
    gathered = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    record("pids", ",".join(str(int(g)) for g in gathered))

@pytest.mark.world_size(2)
def test_a1_changes_everything(rank, tmp_path, record):
    _pids(record)
    os.environ["GPUCONFORM_LEAK"] = "1"
    os.chdir(tmp_path)
    sys.path.insert(0, "/leaked/path")
    warnings.simplefilter("error")
    os.umask(0o077)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
    sys.setrecursionlimit(555)
    torch.set_default_dtype(torch.float64)
    torch.set_default_device("meta")
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = True
    torch.autograd.set_detect_anomaly(True)
    torch.set_float32_matmul_precision("high")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    torch._dynamo.config.cache_size_limit = 1
    np.random.seed(123)
    torch.manual_seed(123)

@pytest.mark.world_size(2)
def test_a2_sees_it_all_put_back(rank, record):
    _pids(record)
    assert "GPUCONFORM_LEAK" not in os.environ
    assert os.getcwd() == os.environ["LEAKS_DIR"]
    assert "/leaked/path" not in sys.path
    warnings.warn("only a warning")  # raised if the filter leaked
    mask = os.umask(0)
    os.umask(mask)
    assert mask != 0o077
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] != 512
    assert sys.getrecursionlimit() != 555
    assert torch.get_default_dtype() == torch.float32
    assert torch.get_default_device() == torch.device("cpu")
    assert not torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert not torch.is_anomaly_enabled()
    assert torch.get_float32_matmul_precision() == "highest"
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.is_grad_enabled()
    assert torch._dynamo.config.cache_size_limit != 1
    # every RNG starts from the same seed on every rank, not from the previous test's state
    draws = torch.tensor([np.random.rand(), float(torch.rand(1))], dtype=torch.float64)
    gathered = [torch.zeros_like(draws) for _ in range(2)]
    dist.all_gather(gathered, draws)
    assert torch.equal(gathered[0], gathered[1]), gathered
    np.random.seed(123)
    assert draws[0].item() != np.random.rand(), "numpy kept the previous test's seed"

@pytest.mark.world_size(2)
def test_b1_leaves_a_grandchild(rank, record):
    _pids(record)
    child = subprocess.Popen(["sleep", "1000"])
    with open(os.path.join(os.environ["LEAKS_DIR"], f"sleep{rank}"), "w") as out:
        out.write(str(child.pid))

@pytest.mark.world_size(2)
def test_b2_after_grandchild(rank, record):
    _pids(record)

@pytest.mark.world_size(2)
def test_c1_leaves_a_thread(rank, record):
    _pids(record)
    threading.Thread(target=time.sleep, args=(60,), name="forgotten-sleeper", daemon=True).start()

@pytest.mark.world_size(2)
def test_c2_after_thread(rank, record):
    _pids(record)

@pytest.mark.world_size(2)
def test_d1_leaves_a_subgroup(rank):
    dist.new_group([0, 1])

@pytest.mark.world_size(2)
def test_e1_ported_body(rank, record):
    _pids(record)
    dist.init_process_group("gloo", rank=rank, world_size=2)  # the same world: a no-op
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2
    dist.destroy_process_group()

@pytest.mark.world_size(2)
def test_e2_after_destroy(rank, record):
    _pids(record)
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2

@pytest.mark.world_size(2)
def test_e3_init_for_another_world(rank):
    dist.init_process_group("gloo", rank=rank, world_size=3)
"""


@pytest.fixture(scope="module")
def leaks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("leaks")
    write_files(directory, {"test_leaks.py": LEAKS})
    return run_pytest(directory, "-p", "no:randomly", "-k", "cpu", env={"LEAKS_DIR": str(directory)})


def _pids(run, name) -> set[str]:
    return set(run.properties(name)["pids"].split(","))


def test_process_and_torch_state_is_put_back(leaks):
    assert leaks.outcome("test_a1_changes_everything[ws2-cpu]")[0] == "passed", leaks.output[-3000:]
    kind, message, text = leaks.outcome("test_a2_sees_it_all_put_back[ws2-cpu]")
    assert kind == "passed", f"{message}\n{text[:3000]}"
    assert _pids(leaks, "test_a1_changes_everything[ws2-cpu]") == _pids(leaks, "test_a2_sees_it_all_put_back[ws2-cpu]")
    assert "gpuconform_isolation" not in leaks.properties("test_a1_changes_everything[ws2-cpu]")


def test_a_left_child_process_is_killed_and_named(leaks):
    note = leaks.properties("test_b1_leaves_a_grandchild[ws2-cpu]")["gpuconform_isolation"]
    for rank in (0, 1):
        pid = int((leaks.directory / f"sleep{rank}").read_text())
        assert f"rank {rank}: left child process sleep 1000 (pid {pid}) running: killed" in note, note
        assert not process_alive(pid)
    assert leaks.outcome("test_b1_leaves_a_grandchild[ws2-cpu]")[0] == "passed"
    assert "RankIsolationWarning: left state behind in its ranks: rank 0: left child process sleep 1000" in leaks.output
    # killing them put things right: the same ranks go on
    assert _pids(leaks, "test_b1_leaves_a_grandchild[ws2-cpu]") == _pids(leaks, "test_b2_after_grandchild[ws2-cpu]")


def test_a_left_thread_is_reported_and_the_ranks_replaced(leaks):
    note = leaks.properties("test_c1_leaves_a_thread[ws2-cpu]")["gpuconform_isolation"]
    assert "ranks 0, 1: left 1 thread(s) running: 'forgotten-sleeper' (daemon)" in note, note
    assert _pids(leaks, "test_c1_leaves_a_thread[ws2-cpu]").isdisjoint(_pids(leaks, "test_c2_after_thread[ws2-cpu]"))


def test_a_left_process_group_is_destroyed_and_reported(leaks):
    note = leaks.properties("test_d1_leaves_a_subgroup[ws2-cpu]")["gpuconform_isolation"]
    assert note == "ranks 0, 1: left 1 process group(s) besides the default alive (new_group, device mesh): destroyed"


def test_ported_init_and_destroy_work_and_the_group_is_rebuilt(leaks):
    assert leaks.outcome("test_e1_ported_body[ws2-cpu]")[0] == "passed", leaks.output[-3000:]
    note = leaks.properties("test_e1_ported_body[ws2-cpu]")["gpuconform_isolation"]
    assert note == "ranks 0, 1: destroyed the default process group: rebuilt for the next test"
    assert leaks.outcome("test_e2_after_destroy[ws2-cpu]")[0] == "passed"
    assert _pids(leaks, "test_e1_ported_body[ws2-cpu]") == _pids(leaks, "test_e2_after_destroy[ws2-cpu]")


def test_init_for_another_world_says_why(leaks):
    kind, message, _ = leaks.outcome("test_e3_init_for_another_world[ws2-cpu]")
    assert kind == "failure"
    assert "init_process_group(world_size=3): this process is rank" in message
    assert "of the gloo group of world size 2" in message


STRICT = """
import subprocess
import pytest

@pytest.mark.world_size(2)
def test_leaves_a_child(rank):
    subprocess.Popen(["sleep", "1000"])
"""


def test_strict_isolation_makes_a_leak_a_failure(pytester):
    write_files(pytester.path, {"test_strict.py": STRICT})
    started = time.perf_counter()
    run = run_pytest(pytester.path, "-p", "no:randomly", "-k", "cpu", "--gpuconform-strict-isolation")
    kind, message, text = run.outcome("test_leaves_a_child[ws2-cpu]")
    assert kind == "error", run.output[-3000:]  # pytest calls a teardown failure an error
    assert message.startswith("failed on teardown with")
    assert "left state behind in its ranks (--gpuconform-strict-isolation): rank 0: left child process sleep 1000" in (
        message + text
    )
    assert run.done.returncode == 1
    assert time.perf_counter() - started < 120
