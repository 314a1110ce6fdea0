"""Entry point of a spawned rank process: make the process safe to run tests in, join the
process group, then hand over to the rank's own pytest session (session.py).

Before anything else the rank arranges to die with the controller (a rank blocked in a
collective must never outlive the run and keep its GPU), becomes a child subreaper (what a
test starts stays findable), leaves the controller's process group (the terminal's Ctrl-C
reaches the controller, which then stops the ranks itself), sends its stdout and stderr,
file descriptors included, to its log, and arms faulthandler: SIGUSR1 writes every thread's
stack to the stack file even while the rank is blocked inside a collective.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
import traceback

from . import environment, processes
from .messages import StartupFailed
from .spec import RankSpec


def _redirect_output(log_path: str) -> None:
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def _take_controller_context(spec: RankSpec) -> None:
    """A forked rank starts with the fork server's environment and path: use the controller's."""
    if spec.environ:
        os.environ.clear()
        os.environ.update(spec.environ)
    if spec.sys_path:
        sys.path[:] = list(spec.sys_path)


def _save_coverage() -> None:
    """A forked process ends with os._exit, past atexit: coverage measuring this rank
    (coverage's subprocess support under pytest-cov) saves its data here."""
    coverage = sys.modules.get("coverage")
    current = getattr(getattr(coverage, "Coverage", None), "current", None)
    measuring = current() if callable(current) else None
    if measuring is not None:
        measuring.stop()
        measuring.save()


def _isolate_process(spec: RankSpec) -> None:
    _take_controller_context(spec)
    processes.die_with_parent()
    processes.become_subreaper()
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    _redirect_output(spec.log_path)
    stack_file = open(spec.stack_path, "a", buffering=1)  # kept open for the process's life
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True, chain=False)
    os.chdir(spec.invocation_dir)


def _device(torch, spec: RankSpec) -> None:
    if spec.identity.device_kind == "cuda":
        torch.cuda.set_device(spec.rank % max(1, torch.cuda.device_count()))
    else:
        torch.set_num_threads(spec.cpu_threads)


def _group(spec: RankSpec, options: environment.GroupOptions):
    if spec.identity.backend is None:
        return None
    import torch
    import torch.distributed as dist

    from ...node import nccl
    from .groups import DefaultGroup

    if spec.identity.backend == "nccl":
        options.extra.update(nccl.group_options("nccl", torch.device("cuda", torch.cuda.current_device())))

    group = DefaultGroup(
        dist.FileStore(spec.store_path, spec.world_size),
        spec.rank,
        spec.world_size,
        spec.identity.backend,
        spec.pg_timeout,
        options.extra,
    )
    group.join()
    group.guard_reinit()
    return group


def main(spec: RankSpec, conn) -> None:
    _isolate_process(spec)
    seconds: dict[str, float] = {}
    try:
        options = environment.prepare(spec.identity)
        started = time.perf_counter()
        import torch

        seconds["torch"] = time.perf_counter() - started
        _device(torch, spec)
        started = time.perf_counter()
        group = _group(spec, options)
        seconds["process_group"] = time.perf_counter() - started
        import pytest

        from .session import TEARDOWN_FAILED, RankOptions, RankSession

        session = RankSession(spec, conn, torch, group, seconds)
    except BaseException:
        conn.send(StartupFailed(spec.rank, traceback.format_exc()))
        return
    code = pytest.main(list(spec.pytest_args), plugins=[RankOptions(), session])
    if not session.ready_sent:
        conn.send(StartupFailed(spec.rank, f"pytest in rank {spec.rank} exited with code {int(code)} before any test"))
    if group is not None:
        try:
            group.leave()
        except Exception:
            traceback.print_exc()
    _save_coverage()
    if session.teardown_failed:
        sys.exit(TEARDOWN_FAILED)  # the controller reports it (pool.py, _check_exits)
