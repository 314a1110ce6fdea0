"""Pools of different pytest processes (xdist workers, runs) sharing --gpuconform-rank-logs
DIR never write to the same log files: rank logs and NCCL logs carry a node-unique name."""

import multiprocessing
import os
from types import SimpleNamespace

from pytest_gpuconform.engine.pool import RankPool


def _log_files(log_dir: str) -> tuple[str, list[str]]:
    """The files a ws2 NCCL pool's ranks would write in log_dir (its first pool here)."""
    pool = RankPool((2, "nccl", "cuda"), SimpleNamespace(pg_timeout=70.0), log_dir, None, log_dir)  # type: ignore[arg-type]
    try:
        paths = [pool.log_path(r) for r in range(2)]  # what spawn() hands each rank
        paths += [pool.nccl_environment(r, {})["NCCL_DEBUG_FILE"] for r in range(2)]
        return pool.name, paths
    finally:
        pool.kill()


def _in_another_worker(log_dir, queue):
    queue.put(_log_files(log_dir))


def test_two_workers_pools_write_distinct_log_files(tmp_path):
    context = multiprocessing.get_context("fork")  # same pool counter state, another pid
    queue = context.Queue()
    worker = context.Process(target=_in_another_worker, args=(str(tmp_path), queue))
    worker.start()
    other_name, other_files = queue.get(timeout=30)
    worker.join(30)
    name, files = _log_files(str(tmp_path))
    assert str(os.getpid()) in name and str(worker.pid) in other_name
    assert not set(files) & set(other_files), (files, other_files)
    assert len(set(files)) == 4  # two ranks' logs and two NCCL logs
    assert files[2] == str(tmp_path / f"{name}-nccl-rank0.log")
