"""Ranks never outlive a controller that was killed (they would keep their GPUs)."""

import os
import signal
import subprocess
import sys
import time


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            state = status.read().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only reaping is left


def test_ranks_die_with_a_killed_controller(tmp_path):
    (tmp_path / "test_sleep.py").write_text(
        "import os, time, pytest\n\n"
        "@pytest.mark.world_size(2)\n"
        "def test_sleep(rank):\n"
        "    open(f'pid{rank}', 'w').write(str(os.getpid()))\n"
        "    time.sleep(600)\n"
    )
    controller = subprocess.Popen(
        [sys.executable, "-m", "pytest", "--gpuconform", "-p", "no:cacheprovider", "test_sleep.py", "-k", "cpu"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("pid*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in tmp_path.glob("pid*")]
    assert len(pids) == 2, "ranks never started"
    os.kill(controller.pid, signal.SIGKILL)
    controller.wait()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if _running(pid)], "ranks outlived the controller"
