"""NCCL rank set-up and failure reading (node/nccl.py), without a GPU: environments are
plain dictionaries, NCCL logs are files written here the way NCCL writes them."""

from __future__ import annotations

import pytest

from pytest_gpuconform.node import nccl

WARN_LOG = """\
node-a:2187:2301 [1] NCCL INFO cudaDriverVersion 12040
node-a:2187:2301 [1] NCCL INFO Bootstrap : Using eth0:10.0.0.5<0>
node-a:2187:2305 [1] transport/p2p.cc:275 NCCL WARN Cuda failure 'peer access is not supported between these two devices'
node-a:2187:2305 [1] NCCL INFO transport/p2p.cc:327 -> 1
node-a:2187:2305 [1] misc/socket.cc:540 NCCL WARN Net : Connection closed by remote peer 10.0.0.6<45632>
"""


def test_rank_environment_makes_hangs_fail_and_keeps_nccl_log(tmp_path):
    env = nccl.rank_environment(1, tmp_path, environ={})
    assert env == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "NCCL_DEBUG": "WARN",
        "NCCL_DEBUG_FILE": str(tmp_path / "nccl-rank1.log"),
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }


@pytest.mark.parametrize(
    "user, kept",
    [
        ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, True),  # tear down and exit: fails too
        ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}, True),
        ({"NCCL_ASYNC_ERROR_HANDLING": "3"}, True),  # the deprecated name
        ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}, False),  # would let a hung collective hang
        ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "off"}, False),
    ],
)
def test_user_error_handling_is_kept_unless_it_lets_hangs_hang(tmp_path, user, kept):
    env = nccl.rank_environment(0, tmp_path, environ=user)
    assert ("TORCH_NCCL_ASYNC_ERROR_HANDLING" not in env) is kept
    if not kept:
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_user_debug_settings_are_kept(tmp_path):
    user = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_FILE": "/var/log/nccl.%h.%p", "CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    assert nccl.rank_environment(0, tmp_path, environ=user) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    assert nccl.debug_file(user, pid=4242, host="node-b") == "/var/log/nccl.node-b.4242"
    assert nccl.debug_file({}, pid=1) is None
    # a non-deterministic workspace setting is replaced
    assert (
        nccl.rank_environment(0, tmp_path, {"CUBLAS_WORKSPACE_CONFIG": ":0:0"})["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    )


def test_group_options_bind_nccl_to_the_rank_gpu():
    import torch

    device = torch.device("cuda", 3)
    assert nccl.group_options("nccl", device) == {"device_id": device}  # torch >= 2.3 has device_id
    assert nccl.group_options("gloo", torch.device("cpu")) == {}
    assert nccl.group_options("nccl", None) == {}


def test_cluster_rank_setup_names_the_log_by_host_and_keeps_what_the_job_set(tmp_path):
    import torch

    device = torch.device("cuda", 1)
    env, options = nccl.cluster_rank_setup(5, "gpu-07", device, tmp_path, environ={})
    assert env["NCCL_DEBUG_FILE"] == str(tmp_path / "cluster-gpu-07-%p-nccl-rank5.log")
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and env["NCCL_DEBUG"] == "WARN"
    assert options == {"device_id": device}
    job = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_FILE": "/shared/nccl.%h.%p", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    env, _ = nccl.cluster_rank_setup(5, "gpu-07", device, tmp_path, environ=job)
    assert set(env) == {"CUBLAS_WORKSPACE_CONFIG"}


def test_log_tail_and_warnings(tmp_path):
    path = tmp_path / "nccl-rank1.log"
    path.write_text(WARN_LOG)
    assert nccl.log_tail(path, lines=2).splitlines() == WARN_LOG.splitlines()[-2:]
    assert nccl.warn_lines(WARN_LOG) == [
        "Cuda failure 'peer access is not supported between these two devices'",
        "Net : Connection closed by remote peer 10.0.0.6<45632>",
    ]
    assert nccl.log_tail(tmp_path / "missing.log") == ""
    big = tmp_path / "big.log"
    big.write_text("x" * 200_000 + "\nlast line\n")
    assert nccl.log_tail(big, lines=1, max_bytes=1024) == "last line"  # only the end is read


def test_log_sections_and_warning_hint_name_the_rank():
    texts = {2: "", 1: WARN_LOG, 0: "node-a:1:1 [0] NCCL INFO Init COMPLETE"}
    sections = nccl.log_sections(texts)
    assert [title for title, _ in sections] == ["NCCL log [rank 0]", "NCCL log [rank 1]"]  # no section when empty
    assert sections[1][1] == WARN_LOG
    assert nccl.warning_hint(texts) == (
        "rank 1: NCCL WARN Cuda failure 'peer access is not supported between these two devices'"
    )
    assert nccl.warning_hint({0: texts[0]}) is None


def test_only_what_this_test_added_is_read(tmp_path):
    """A reused rank keeps one NCCL log: the previous test's warnings are not this one's."""
    path = tmp_path / "nccl-rank0.log"
    path.write_text("node-a:1:1 [0] misc.cc:1 NCCL WARN an old warning\n")
    start = nccl.log_size(path)
    assert nccl.warning_hint({0: nccl.log_tail(path, since=start)}) is None
    with open(path, "a") as handle:
        handle.write("node-a:1:1 [0] net.cc:9 NCCL WARN NET/IB : Got completion with error 12\n")
    text = nccl.log_tail(path, since=start)
    assert nccl.warning_hint({0: text}) == "rank 0: NCCL WARN NET/IB : Got completion with error 12"
    assert "old warning" not in text and "error 12" in text
    assert nccl.log_size(tmp_path / "missing") == 0
