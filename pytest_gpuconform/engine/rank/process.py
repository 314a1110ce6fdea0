"""The loop one rank process runs.

A rank starts once, redirects its output to a per-rank log (the controller shows each
test's slice of it), arms faulthandler so the controller can ask for its Python stack with
SIGUSR1 even while it is blocked inside a collective, initialises the process group, and
then runs tests as they arrive until told to stop. Between tests it restores the global
torch state it started with, so one test cannot leak a default dtype, autocast or seed
into the next.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass

from .messages import RankReport, Ready, RunTest, StartupFailed


@dataclass(frozen=True)
class RankSpec:
    rank: int
    world_size: int
    backend: str | None  # "gloo" | "nccl" | None (no process group: single-device worker)
    device_kind: str  # "cpu" | "cuda"
    store_path: str
    log_path: str
    stack_path: str
    pg_timeout: float
    sys_path: tuple[str, ...]


def _redirect_output(log_path: str) -> None:
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


class _GlobalState:
    """The torch globals a test may change, captured at start-up and restored per test."""

    def __init__(self, torch) -> None:
        self.torch = torch
        self.default_dtype = torch.get_default_dtype()
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        self.cudnn_tf32 = torch.backends.cudnn.allow_tf32
        self.threads = torch.get_num_threads()

    def restore(self, seed: int, device_kind: str) -> None:
        torch = self.torch
        import random

        random.seed(seed)
        torch.manual_seed(seed)
        torch.set_default_dtype(self.default_dtype)
        torch.set_num_threads(self.threads)
        torch.set_grad_enabled(True)
        torch.use_deterministic_algorithms(self.deterministic)
        torch.backends.cuda.matmul.allow_tf32 = self.matmul_tf32
        torch.backends.cudnn.allow_tf32 = self.cudnn_tf32
        for kind in ("cpu", "cuda"):
            try:
                torch.set_autocast_enabled(kind, False)
            except (TypeError, RuntimeError):
                pass
        if device_kind == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def _device(torch, spec: RankSpec):
    if spec.device_kind == "cuda":
        index = spec.rank % max(1, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _init_process_group(torch, spec: RankSpec) -> None:
    if spec.backend is None:
        return
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.FileStore(spec.store_path, spec.world_size)
    dist.init_process_group(
        spec.backend,
        store=store,
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=timedelta(seconds=spec.pg_timeout),
    )


class UnpicklableInRank(Exception):
    pass


def _unpickle(what: str, data: bytes):
    import pickle

    try:
        return pickle.loads(data)
    except Exception as exc:
        raise UnpicklableInRank(
            f"{what} could not be rebuilt in the rank ({type(exc).__name__}: {exc}); "
            "its class must be importable from a module the rank can import"
        ) from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def run_one(request: RunTest, spec: RankSpec, state: _GlobalState, device) -> RankReport:
    import pytest

    from . import fixtures as rank_fixtures
    from . import module_loader

    Failed, Skipped = pytest.fail.Exception, pytest.skip.Exception

    records: list = []
    started = time.perf_counter()
    for entry in request.sys_path:
        if entry not in sys.path:
            sys.path.append(entry)
    try:
        state.restore(request.seed, spec.device_kind)
        module = module_loader.load(request.module_name, request.module_file)
        kwargs = {name: _unpickle(f"fixture {name!r}", data) for name, data in request.kwargs.items()}
        instance = _unpickle("the test class instance", request.instance) if request.instance else None
        function = module_loader.resolve(module, request.function, instance)
        kwargs.update(rank_fixtures.provide(request.rank_fixtures, spec, device, records, request))
        function(**kwargs)
        if spec.device_kind == "cuda":
            state.torch.cuda.synchronize()  # a faulting kernel fails this test, not the next one
        outcome, message, text = "passed", "", ""
    except Skipped as exc:
        outcome, message, text = "skipped", str(exc.msg), ""
    except Failed as exc:
        outcome, message, text = "failed", f"Failed: {exc.msg}".splitlines()[0], str(exc.msg)
    except BaseException as exc:  # everything a test raises is reported, KeyboardInterrupt included
        outcome, message = "failed", _short(exc)
        frames = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        text = "".join(traceback.format_exception(type(exc), exc, frames))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if spec.device_kind == "cuda":
            try:  # hand cached blocks back: under -n, neighbours lease these GPUs next
                state.torch.cuda.empty_cache()
            except RuntimeError as exc:  # a broken context: the next test's synchronize reports it
                print(f"gpuconform: empty_cache failed after the test: {exc}", file=sys.stderr)
    return RankReport(
        spec.rank,
        outcome,
        message=message,
        traceback=text,
        records=list(records),
        duration=time.perf_counter() - started,
    )


def _die_with_controller() -> None:
    """Linux: SIGKILL this rank when the controller dies (even by SIGKILL), so a rank
    blocked in a collective can never outlive the run and keep its GPU."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        print("gpuconform: prctl(PR_SET_PDEATHSIG) unavailable; ranks may outlive a killed controller", file=sys.stderr)


def main(spec: RankSpec, conn) -> None:
    """Entry point of the spawned rank process."""
    _die_with_controller()
    _redirect_output(spec.log_path)
    stack_file = open(spec.stack_path, "a", buffering=1)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True, chain=False)
    os.environ.update(RANK=str(spec.rank), LOCAL_RANK=str(spec.rank), WORLD_SIZE=str(spec.world_size))
    for entry in spec.sys_path:
        if entry not in sys.path:
            sys.path.append(entry)
    try:
        import torch

        if spec.device_kind == "cpu":
            # N ranks share the node's cores: N x (all cores) intra-op threads would thrash.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
        device = _device(torch, spec)
        _init_process_group(torch, spec)
        state = _GlobalState(torch)
    except BaseException:
        conn.send(StartupFailed(spec.rank, traceback.format_exc()))
        return
    conn.send(Ready(spec.rank, os.getpid()))
    while True:
        try:
            request = conn.recv()
        except EOFError:  # controller went away
            break
        if request is None:
            break
        conn.send(run_one(request, spec, state, device))
    if spec.backend is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
