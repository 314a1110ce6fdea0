"""Measure how many bytes a piece of PyTorch code keeps alive, on any device.

Activation-memory savings (checkpointing, autocast) are asserted as ratios of two runs in
one process, so the meter must count exactly what a variant keeps, on CPU too, where the
allocator keeps no statistics. A ``TorchDispatchMode`` sees every tensor an op creates;
weak references to the storages tell it when they die. This counts what selective
checkpointing caches outside the autograd graph, which ``saved_tensors_hooks`` counters
miss. On CUDA the caching allocator's own counters are read as well, as a second opinion
that also sees allocations made outside the dispatcher (cuBLAS workspaces, NCCL buffers).

Only storages created while the meter is active are counted, so the baseline at start is
zero by construction: parameters and inputs that already exist cost nothing, and a view or
an in-place op on them costs nothing either.

Storage resizes from Python (``UntypedStorage.resize_``) bypass the dispatcher, and FSDP2
frees and re-allocates its unsharded parameters exactly that way after every forward and
backward. While a meter is active, ``resize_`` is wrapped so that a resize counts as the
allocation or free it is: a tracked storage changes size, and a storage from before the
block counts by how far it grows (or shrinks back) from its size when first resized.

CUDA allocator numbers are taken the way they stay meaningful: the device is synchronised
before each reading (so "after forward" means after forward's kernels, and a faulting
kernel shows up here, not in the next test); the peak statistic is reset at the start of
each measurement and read at its end; only *allocated* bytes are used, never *reserved*
ones, which include the caching allocator's free blocks and depend on what ran before.
``reset_peak_memory_stats`` is global per device, so a measurement inside another one
would cut the outer peak short: open measurements on a device fold the peak seen so far
into their own before an inner one resets it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Tracked:
    nbytes: int  # bytes counted for this storage: its size minus its baseline
    baseline: int = 0  # size when first seen, for storages that existed before the block


@dataclass
class MemoryReading:
    """What one ``MemoryMeter.track`` block measured, in bytes above the start.

    ``live_bytes`` and ``cuda_allocated_bytes`` are read at access time, so reading them in
    the middle of the block (e.g. right after forward) gives the state at that moment.
    """

    device: object
    _tracker: Any = field(repr=False)
    cuda_start_bytes: int | None = None
    cuda_peak_bytes: int | None = None  # set when the block ends
    _cuda_peak_so_far: int = field(default=0, repr=False)  # absolute peak before an inner reset

    @property
    def live_bytes(self) -> int:
        """Bytes of storages created since the start that are still alive."""
        return self._tracker.current

    def settled_live_bytes(self, quiet_s: float = 0.05, timeout_s: float = 2.0) -> int:
        """``live_bytes`` once it has stopped changing for ``quiet_s`` (at most ``timeout_s``).

        A collective's worker thread (gloo's, NCCL's watchdog) holds its buffers a moment
        after the op has completed for the caller, so a reading taken right after a
        distributed step sometimes includes a buffer that is about to be released (FSDP2's
        all-gather output: one block's unsharded parameters, seen in ~5% of readings on a
        loaded 2-core machine). Memory that is really kept stays and is counted."""
        deadline = time.monotonic() + timeout_s
        value, since = self.live_bytes, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.005)
            now = self.live_bytes
            if now != value:
                value, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                break
        return value

    @property
    def peak_bytes(self) -> int:
        """Most bytes that were alive at once since the start (dispatch-mode count)."""
        return self._tracker.peak

    @property
    def cuda_allocated_bytes(self) -> int | None:
        """CUDA caching allocator: allocated bytes now minus at the start (None off CUDA)."""
        if self.cuda_start_bytes is None:
            return None
        import torch

        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device) - self.cuda_start_bytes


@functools.cache
def _counter_class():
    """The dispatch-mode counter, built on first use: it derives from TorchDispatchMode, and
    the plugin must not import torch before a test asks for a meter."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
    from torch.utils._pytree import tree_leaves
    from torch.utils.weak import WeakIdKeyDictionary

    def _storages(t) -> list:
        """The storages holding a tensor's data. A wrapper subclass (DTensor) has none of
        its own: its data are its inner tensors, created by ops the mode does not see."""
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.is_sparse:
            return []
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            return [st for name in names for st in _storages(getattr(t, name))]
        try:
            return [t.untyped_storage()]
        except (RuntimeError, NotImplementedError):  # tensors without storage (nested, functional)
            return []

    class LiveStorageCounter(TorchDispatchMode):
        """Counts bytes of storages created under the mode; frees arrive through weakrefs."""

        def __init__(self) -> None:
            super().__init__()
            self._restore_resize: Callable[[], None] = lambda: None
            self.current = 0
            self.peak = 0
            self._tracked = WeakIdKeyDictionary()
            # Autograd may run backward on device threads; reentrant because a free (weakref
            # finalizer) can fire inside _account when an allocation triggers garbage collection.
            self._lock = threading.RLock()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {id(st) for leaf in tree_leaves((args, kwargs)) for st in _storages(leaf)}
            for leaf in tree_leaves(out):
                for st in _storages(leaf):
                    self._account(st, inputs)
            return out

        def _account(self, st, input_ids) -> None:
            nbytes = st.nbytes()
            with self._lock:
                entry = self._tracked.get(st)
                if entry is not None:  # ours already: an in-place op may have resized it
                    self._count(entry, nbytes)
                    return
                if id(st) in input_ids:  # a view or in-place result of storage made before us
                    return
                self._track(st, _Tracked(nbytes))
                self._add(nbytes)

        def __enter__(self):
            own = vars(torch.UntypedStorage).get("resize_")  # None: inherited from the C base
            resize = torch.UntypedStorage.resize_

            def counted_resize(storage, nbytes):
                before = storage.nbytes()
                result = resize(storage, nbytes)
                self._resized(storage, before)
                return result

            self._restore_resize = (
                (lambda: setattr(torch.UntypedStorage, "resize_", own))
                if own
                else (lambda: delattr(torch.UntypedStorage, "resize_"))
            )
            torch.UntypedStorage.resize_ = counted_resize
            return super().__enter__()

        def __exit__(self, *exc):
            self._restore_resize()
            return super().__exit__(*exc)

        def _resized(self, st, before: int) -> None:
            with self._lock:
                entry = self._tracked.get(st)
                if entry is None:  # storage from before the block: count only its growth
                    entry = self._track(st, _Tracked(0, baseline=before))
                self._count(entry, st.nbytes())

        def _track(self, st, entry: _Tracked) -> _Tracked:
            self._tracked[st] = entry
            # The callback must not hold the storage; it holds the entry, whose size may
            # change later.
            weakref.finalize(st, self._release, entry).atexit = False
            return entry

        def _count(self, entry: _Tracked, size: int) -> None:
            counted = size - entry.baseline
            self._add(counted - entry.nbytes)
            entry.nbytes = counted

        def _release(self, entry: _Tracked) -> None:
            with self._lock:
                self._add(-entry.nbytes)

        def _add(self, delta: int) -> None:
            self.current += delta
            if self.current > self.peak:
                self.peak = self.current

    return LiveStorageCounter


# Open CUDA measurements per device index, innermost last (see the module docstring).
_OPEN: dict[int, list[MemoryReading]] = {}


def _cuda_device(torch, device):
    """``cuda`` without an index means the current device: pin it, so every reading of one
    measurement asks the same GPU."""
    return torch.device("cuda", torch.cuda.current_device()) if device.index is None else device


class MemoryMeter:
    """``with meter.track(device) as m: ...`` then read ``m.live_bytes``, ``m.peak_bytes``.

    Stateless and picklable, so a fixture can hand it to rank processes.
    """

    @contextlib.contextmanager
    def track(self, device=None) -> Iterator[MemoryReading]:
        import torch

        device = torch.device(device) if device is not None else torch.device("cpu")
        on_cuda = device.type == "cuda"
        if on_cuda:
            device = _cuda_device(torch, device)
        counter = _counter_class()()
        reading = MemoryReading(device=device, _tracker=counter)
        open_here = _OPEN.setdefault(device.index if on_cuda else -1, [])
        if on_cuda:
            torch.cuda.synchronize(device)
            peak_so_far = torch.cuda.max_memory_allocated(device)
            for outer in open_here:
                outer._cuda_peak_so_far = max(outer._cuda_peak_so_far, peak_so_far)
            torch.cuda.reset_peak_memory_stats(device)
            reading.cuda_start_bytes = torch.cuda.memory_allocated(device)
            open_here.append(reading)
        try:
            with counter:
                yield reading
        finally:
            if on_cuda:
                open_here.remove(reading)
                torch.cuda.synchronize(device)
                peak = max(reading._cuda_peak_so_far, torch.cuda.max_memory_allocated(device))
                reading.cuda_peak_bytes = peak - (reading.cuda_start_bytes or 0)
                for outer in open_here:  # the inner block's peak belongs to the outer ones too
                    outer._cuda_peak_so_far = max(outer._cuda_peak_so_far, peak)
