"""GPU leases: exclusive, ordered, bounded in time; used by multi-rank CUDA tests under -n."""

import multiprocessing
import time

import pytest

from pytest_gpuconform.engine.gpu_lease import LeaseTimeout, lease


def _hold(tokens, seconds, ready, lock_dir):
    import os

    os.environ["GPUCONFORM_LOCK_DIR"] = lock_dir
    with lease(tokens, timeout=5):
        ready.set()
        time.sleep(seconds)


@pytest.fixture
def holder(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCONFORM_LOCK_DIR", str(tmp_path))
    context = multiprocessing.get_context("spawn")
    started = []

    def start(tokens, seconds):
        ready = context.Event()
        process = context.Process(target=_hold, args=(tokens, seconds, ready, str(tmp_path)))
        process.start()
        assert ready.wait(30), "holder never got its lease"
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.join()


def test_a_leased_gpu_is_not_handed_out_twice(holder):
    holder(["0"], seconds=3)
    started = time.monotonic()
    with pytest.raises(LeaseTimeout, match="GPU 0 stayed leased by another pytest worker"):
        with lease(["0"], timeout=0.3):
            pass
    assert time.monotonic() - started < 2


def test_lease_waits_for_release(holder):
    holder(["1"], seconds=1)
    started = time.monotonic()
    with lease(["1"], timeout=20):
        waited = time.monotonic() - started
    assert 0.2 < waited < 15


def test_other_gpus_stay_free(holder):
    holder(["0"], seconds=3)
    with lease(["1", "2"], timeout=0.5):
        pass


def test_one_board_is_one_lock_however_its_uuid_is_spelled(holder):
    """Pinning hands out UUIDs; two runs that spell one board differently still exclude each other."""
    holder(["GPU-ABCDEF01-0000-0000-0000-000000000000"], seconds=3)
    with pytest.raises(LeaseTimeout):
        with lease(["gpu-abcdef01-0000-0000-0000-000000000000"], timeout=0.3):
            pass


def test_lock_directory_and_files_are_shared_between_users(tmp_path, monkeypatch):
    import os
    import stat

    from pytest_gpuconform.engine import gpu_lease

    monkeypatch.setenv("GPUCONFORM_LOCK_DIR", str(tmp_path / "leases"))
    with lease(["GPU-1"], timeout=1):
        pass
    mode = stat.S_IMODE(os.stat(tmp_path / "leases").st_mode)
    assert mode == 0o1777  # sticky and world-writable, like /tmp
    lock = tmp_path / "leases" / "gpu-gpu-1.lock"
    os.chmod(lock, 0o444)  # another user's file: not writable for us
    monkeypatch.setattr(gpu_lease.os, "open", _refuse_write(os.open))
    with lease(["GPU-1"], timeout=1):  # opened read-only, flock still works
        pass


def _refuse_write(real_open):
    """os.open as for a file owned by another user: read-only opens only (root ignores modes)."""
    import os

    def fake(path, flags, *args):
        if flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    return fake


def test_multi_rank_cuda_test_under_xdist_leases_gpus_instead_of_skipping(
    run_gpuconform, pytester, fake_nvml, tmp_path, monkeypatch
):
    from support import h100

    fake_nvml({"gpus": [h100(0), h100(1)]})
    locks = tmp_path / "locks"
    monkeypatch.setenv("GPUCONFORM_LOCK_DIR", str(locks))
    pytester.makepyfile(
        test_two="""
        import pytest

        @pytest.mark.world_size(2)
        def test_two(rank):
            pass
    """
    )
    result = run_gpuconform("-n", "2", "-k", "cuda", "-rs")
    # The CPU build of torch cannot start CUDA ranks: the point is that the test was
    # scheduled onto two leased GPUs instead of being skipped for the worker's one GPU.
    result.stdout.no_fnmatch_line("*SKIPPED*needs 2 GPU*")
    result.stdout.fnmatch_lines(["*could not start 2 rank(s) (nccl, cuda)*"])
    # leased by UUID (node/pinning.py pins workers by UUID)
    assert sorted(p.name for p in locks.iterdir()) == sorted(f"gpu-{h100(i)['uuid'].lower()}.lock" for i in (0, 1))


def test_a_failed_cuda_pool_is_stopped_before_its_gpus_are_released(monkeypatch):
    """The ranks' CUDA contexts must be gone before the lease lets another worker's test
    onto the same GPUs: the pool is closed or killed inside the lease, not after it."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from pytest_gpuconform.engine import plugin
    from pytest_gpuconform.engine.verdict import Verdict

    events = []

    @contextmanager
    def recording_lease(tokens, timeout):
        events.append(("leased", tuple(tokens)))
        yield
        events.append(("released", tuple(tokens)))

    class Pool:
        device_kind = "cuda"
        name = "ws2-nccl-cuda-test"
        leave_problems: list = []

        def close(self, timeout):
            events.append(("closed",))

        def kill(self):
            events.append(("killed",))

    key = (2, "nccl", "cuda")
    monkeypatch.setattr(plugin, "lease", recording_lease)
    monkeypatch.setattr(plugin, "gpus_to_lease", lambda k: (["GPU-a", "GPU-b"], "GPU-a,GPU-b"))
    monkeypatch.setattr(
        plugin, "plan_of", lambda item: SimpleNamespace(pool_key=key, deadline=10.0, fresh=False, seed=0)
    )
    engine = plugin.RankEngine(None, None, None)
    monkeypatch.setattr(engine, "_request", lambda item, nextitem, seed: None)
    for verdict, stopped in (
        (Verdict({}, reusable=False), "killed"),  # a failure: ranks may be stuck
        (Verdict({}, reusable=False, can_retire=True), "closed"),  # idle: a graceful close
    ):
        events.clear()
        pool = Pool()
        engine.pools[key] = pool
        monkeypatch.setattr(engine, "_pool", lambda k, d, g, pool=pool: (pool, None))
        monkeypatch.setattr(engine, "_attempt", lambda *args, verdict=verdict: verdict)
        engine._run_in_ranks(object(), plugin._Routed(None))
        assert events == [("leased", ("GPU-a", "GPU-b")), (stopped,), ("released", ("GPU-a", "GPU-b"))]
        assert key not in engine.pools
