"""The rank's default process group: joined once, kept across tests, rebuilt when a test
destroys or replaces it, and shielded from ported bodies that try to initialise it again.

Tests ported from hand-written multi-process code often start with
``dist.init_process_group(...)`` and end with ``dist.destroy_process_group()``. The first
would fail ("default process group twice") and the second would leave the next test with
no group. So, inside a rank, ``init_process_group`` for the world the rank already belongs
to returns at once (a different world size, rank or backend is an error saying why), and a
destroyed or replaced default group is rebuilt after the test: every rank ran the same body,
so every rank rebuilds it together, each generation under its own key prefix in one store.

Groups other than the default that a test leaves alive (``new_group``, a device mesh) are
destroyed after it and reported. Shared with cluster mode, which brings its own store.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

from .messages import Finding


def _world_groups(dist) -> list[Any]:
    """Every process group torch knows of. torch has no public list; ``_world.pg_map`` has
    held it since 1.x. Without it, extra groups are simply not detected."""
    world = getattr(dist.distributed_c10d, "_world", None)
    pg_map = getattr(world, "pg_map", None)
    return list(pg_map) if isinstance(pg_map, dict) else []


class DefaultGroup:
    def __init__(
        self,
        store,
        rank: int,
        world_size: int,
        backend: str,
        timeout_seconds: float,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.store = store  # kept for the process's lifetime: destroying a group must not close it
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_seconds)
        self.options = dict(options or {})
        self.generation = 0
        self.group: Any = None
        self._baseline: set[int] = set()

    # -- joining -----------------------------------------------------------------------------
    def join(self) -> None:
        import torch.distributed as dist

        self.generation += 1
        dist.init_process_group(
            self.backend,
            store=dist.PrefixStore(f"gpuconform/default/{self.generation}", self.store),
            rank=self.rank,
            world_size=self.world_size,
            timeout=self.timeout,
            **self.options,
        )
        self.group = dist.group.WORLD

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.group = None

    def guard_reinit(self) -> None:
        """Make ``init_process_group`` for this same world a no-op (see the module doc)."""
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        original = distributed_c10d.init_process_group
        if getattr(original, "__gpuconform_guard__", False):
            return

        @functools.wraps(original)
        def init_process_group(*args, **kwargs):
            if dist.is_initialized() and dist.group.WORLD is self.group:
                self._check_same_world(args, kwargs)
                return None
            return original(*args, **kwargs)

        init_process_group.__gpuconform_guard__ = True  # type: ignore[attr-defined]
        distributed_c10d.init_process_group = init_process_group
        dist.init_process_group = init_process_group

    def _check_same_world(self, args: tuple, kwargs: dict) -> None:
        names = ("backend", "init_method", "timeout", "world_size", "rank")
        given = dict(zip(names, args, strict=False))
        given.update({k: v for k, v in kwargs.items() if k in names})
        size, rank, backend = given.get("world_size", -1), given.get("rank", -1), given.get("backend")
        problems = []
        if size not in (-1, None, self.world_size):
            problems.append(f"world_size={size}")
        if rank not in (-1, None, self.rank):
            problems.append(f"rank={rank}")
        if backend is not None and str(backend).lower() not in self.backend.lower():
            problems.append(f"backend={backend!r}")
        if problems:
            raise ValueError(
                f"init_process_group({', '.join(problems)}): this process is rank {self.rank} of the "
                f"{self.backend} group of world size {self.world_size} that pytest-gpuconform set up for the "
                "test; inside a multi-rank test the default group is already initialised for that world"
            )

    # -- after a test ------------------------------------------------------------------------
    def setup_done(self) -> None:
        """Groups alive once the test's setup is done belong to fixtures, not to the test."""
        import torch.distributed as dist

        self._baseline = {id(g) for g in _world_groups(dist)}

    def state(self) -> str:
        """'ok', 'destroyed' (no default group) or 'replaced' (another one is the default)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return "destroyed"
        return "ok" if dist.group.WORLD is self.group else "replaced"

    def drop_extra_groups(self) -> list[Finding]:
        import torch.distributed as dist

        if self.state() != "ok":
            return []
        extra = [g for g in _world_groups(dist) if g is not self.group and id(g) not in self._baseline]
        if not extra:
            return []
        failed = []
        for group in extra:
            try:
                dist.destroy_process_group(group)
            except Exception as exc:  # a group torch cannot destroy stays: the rank is replaced
                failed.append(f"{type(exc).__name__}: {exc}")
        text = f"left {len(extra)} process group(s) besides the default alive (new_group, device mesh)"
        if failed:
            return [Finding("process_group", f"{text}; destroying them failed: {'; '.join(failed)}", False)]
        return [Finding("process_group", f"{text}: destroyed", True)]

    def describe_damage(self, state: str) -> Finding:
        what = "destroyed the default process group" if state == "destroyed" else "replaced the default process group"
        return Finding("default_group", f"{what}: rebuilt for the next test", True)

    def rebuild(self) -> None:
        """After the test destroyed or replaced the default group: every rank calls this."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.join()
