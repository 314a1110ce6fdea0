"""The memory meter counts exactly what a model keeps, checked against analytic sizes.

The checkpointing and AMP memory checks assert ratios of these counts, so the counts must
be exact: a model of N ``Linear -> GELU`` layers on a ``batch x width`` input keeps two
activations per layer (the Linear output, saved by GELU, and the GELU output, saved by the
next Linear or returned), and each checkpointing variant keeps a known subset of them.
"""

from __future__ import annotations

import functools
import pickle

import pytest
import torch
from torch import nn
from torch.utils import checkpoint as ckpt

from pytest_gpuconform.checks.memory import MemoryMeter

LAYERS, WIDTH, BATCH = 6, 32, 16
UNIT = BATCH * WIDTH * 4  # bytes of one fp32 activation


@pytest.fixture
def meter():
    return MemoryMeter()


def test_counts_allocations_frees_and_peak(meter):
    with meter.track() as m:
        a = torch.empty(100)
        b = torch.empty(200)
        del a
        c = torch.empty(50)
        assert (m.live_bytes, m.peak_bytes) == (1000, 1200)
        del b
    assert m.live_bytes == 200, "a free after the block must still be counted"
    del c
    assert (m.live_bytes, m.peak_bytes) == (0, 1200)


def test_existing_storage_costs_nothing(meter):
    x = torch.randn(8, 8)
    with meter.track() as m:
        views = (x.t(), x.view(64), x[:2], x.transpose(0, 1).contiguous().T)
        x.add_(1)
        x.mul_(2)
    # Only the .contiguous() copy is new.
    assert m.live_bytes == 8 * 8 * 4, f"views/in-place of existing storage counted: {m.live_bytes} B"
    del views


def test_resized_output_is_counted_at_its_final_size(meter):
    a, b = torch.ones(10), torch.ones(10)
    with meter.track() as m:
        out = torch.empty(0)
        torch.add(a, b, out=out)
    assert m.live_bytes == 40, f"out= resize of a tracked storage: {m.live_bytes} B, expected 40"


def test_meter_is_picklable_for_rank_processes():
    assert isinstance(pickle.loads(pickle.dumps(MemoryMeter())), MemoryMeter)


def _layers():
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU()) for _ in range(LAYERS)))


def _per_layer(**kwargs):
    def run(model, x):
        for layer in model:
            x = ckpt.checkpoint(layer, x, **kwargs)
        return x

    return run


SELECTIVE = (
    functools.partial(ckpt.create_selective_checkpoint_contexts, [torch.ops.aten.addmm.default])
    if hasattr(ckpt, "create_selective_checkpoint_contexts")
    else None
)

# variant -> (run, activations kept after forward, in units), for 6 layers
CASES = {
    "plain": (lambda model, x: model(x), 12),  # 2 per layer
    "per_layer_non_reentrant": (_per_layer(use_reentrant=False), 6),  # each layer's output
    "per_layer_reentrant": (_per_layer(use_reentrant=True), 6),
    # segments=2: chunk of 3 checkpointed (its output) + last 3 layers plain (2 each)
    "sequential_2": (lambda model, x: ckpt.checkpoint_sequential(model, 2, x, use_reentrant=False), 1 + 2 * 3),
    # segments=3: two chunks of 2 checkpointed (2 outputs) + last 2 layers plain
    "sequential_3": (lambda model, x: ckpt.checkpoint_sequential(model, 3, x, use_reentrant=False), 2 + 2 * 2),
    # saving addmm: per layer the Linear output (cached by SAC) and the layer output
    "selective_addmm": (_per_layer(use_reentrant=False, context_fn=SELECTIVE), 12),
}


@pytest.mark.parametrize("variant", list(CASES))
def test_activation_bytes_match_analytic_size(meter, variant):
    if variant.startswith("selective") and SELECTIVE is None:
        pytest.skip(f"torch {torch.__version__} has no selective activation checkpointing")
    run, units = CASES[variant]
    model = _layers()
    x = torch.randn(BATCH, WIDTH, requires_grad=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with meter.track() as m:
        out = run(model, x)
        after_forward = m.live_bytes
        out.sum().backward()
        del out
    assert after_forward == units * UNIT, (
        f"{variant}: {after_forward} B alive after forward, analytic {units} x {UNIT} B = {units * UNIT} B"
    )
    assert m.live_bytes == UNIT, (
        f"{variant}: {m.live_bytes} B alive after backward, expected only x.grad ({UNIT} B; param grads preallocated)"
    )
    assert m.peak_bytes >= after_forward


def test_selective_checkpointing_is_seen_where_saved_tensor_hooks_are_blind(meter):
    """SAC keeps its saved ops outside the autograd graph: a saved_tensors_hooks counter sees
    only the checkpoint inputs, the dispatch-mode meter sees the cached Linear outputs too."""
    if SELECTIVE is None:
        pytest.skip(f"torch {torch.__version__} has no selective activation checkpointing")
    model, x = _layers(), torch.randn(BATCH, WIDTH, requires_grad=True)
    hooked = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: hooked.append(t.untyped_storage().nbytes()) or t, lambda t: t
    ):
        with meter.track() as m:
            out = CASES["selective_addmm"][0](model, x)
    assert m.live_bytes == 12 * UNIT
    assert sum(hooked) < m.live_bytes, (sum(hooked), m.live_bytes)
    del out


def test_cuda_allocator_numbers(meter):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the allocator numbers exist only on CUDA)")
    device = torch.device("cuda", 0)
    with meter.track(device) as m:
        t = torch.empty(1 << 20, device=device)
        assert m.cuda_allocated_bytes == 4 << 20
        del t
    assert m.cuda_peak_bytes >= 4 << 20 and m.peak_bytes == 4 << 20


def test_fixture_reaches_tests_of_an_enabled_run(pytester):
    pytester.makepyfile("""
        import torch

        def test_uses_meter(memory_meter):
            with memory_meter.track("cpu") as m:
                t = torch.empty(256)
            assert m.live_bytes == 1024 and m.peak_bytes == 1024
    """)
    result = pytester.runpytest("--gpuconform", "-p", "no:cacheprovider", ".")
    result.assert_outcomes(passed=1)


def test_storage_resizes_count_as_allocations_and_frees(meter):
    """FSDP2 frees unsharded parameters with ``storage.resize_(0)`` and re-allocates them
    with ``resize_(n)``, outside the dispatcher; the meter must see both."""
    before = torch.empty(100)  # exists before the block: only its growth counts
    with meter.track() as m:
        made = torch.empty(50)
        made.untyped_storage().resize_(0)
        assert m.live_bytes == 0, f"a tracked storage resized to 0 still counts {m.live_bytes} B"
        made.untyped_storage().resize_(400)
        before.untyped_storage().resize_(1000)
        assert (m.live_bytes, m.peak_bytes) == (400 + 600, 1000)
        before.untyped_storage().resize_(400)
        assert m.live_bytes == 400, f"shrinking a pre-existing storage back: {m.live_bytes} B"
    assert "resize_" not in vars(torch.UntypedStorage), "the resize_ wrapper outlived the block"
    del made
    assert m.live_bytes == 0


def test_wrapper_subclass_is_counted_by_its_inner_tensors(meter):
    """A DTensor-like wrapper has no storage of its own: its data are inner tensors made by
    ops the mode does not see; the meter counts those (TwoTensor: two inner tensors)."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    a = two_tensor.TwoTensor(torch.ones(10), torch.ones(10))
    with meter.track() as m:
        b = a * 2
        assert m.live_bytes == 80, f"wrapper of 2 x 40 B counted as {m.live_bytes} B"
        view = b.view(2, 5)
        assert m.live_bytes == 80, f"a view of the wrapper counted again: {m.live_bytes} B"
        del b, view
    assert m.live_bytes == 0


def test_settled_reading_waits_for_a_worker_thread_to_let_go(meter):
    """A buffer a communication thread releases a moment later is not counted as kept."""
    import threading

    with meter.track() as m:
        held = [torch.empty(1000)]
        release = threading.Timer(0.03, held.clear)
        release.start()
        settled = m.settled_live_bytes()
        release.join()
    assert settled == 0, f"settled reading {settled} B includes a buffer released after 30 ms"
    with meter.track() as m:
        kept = torch.empty(10)
        assert m.settled_live_bytes(quiet_s=0.01) == 40
    del kept


# -- CUDA allocator readings, against a stand-in allocator (no GPU here) -----------------------
class FakeAllocator:
    """torch.cuda's allocator statistics for one device, driven by the test: allocated
    bytes now, the peak since the last reset, and a log of the calls the meter made."""

    def __init__(self):
        self.allocated, self.peak, self.calls = 0, 0, []

    def alloc(self, nbytes):
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)

    def free(self, nbytes):
        self.allocated -= nbytes

    def install(self, monkeypatch):
        def device_index(device):
            assert device is not None and device.index == 0, f"meter asked about {device!r}, not cuda:0"

        def synchronize(device=None):
            device_index(device)
            self.calls.append("synchronize")

        def reset(device=None):
            device_index(device)
            self.calls.append("reset")
            self.peak = self.allocated

        def allocated(device=None):
            device_index(device)
            self.calls.append("allocated")
            return self.allocated

        def max_allocated(device=None):
            device_index(device)
            return self.peak

        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
        monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", max_allocated)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        return self


def test_cuda_peak_is_reset_per_measurement_and_read_after_a_synchronize(meter, monkeypatch):
    gpu = FakeAllocator().install(monkeypatch)
    gpu.alloc(1000)  # what earlier tests left allocated, and their peak
    gpu.peak = 9000
    with meter.track("cuda") as m:  # "cuda" means the current device: pinned to cuda:0
        assert gpu.calls[:2] == ["synchronize", "reset"]  # the old peak is not ours
        gpu.alloc(400)
        assert m.cuda_allocated_bytes == 400 and gpu.calls[-2:] == ["synchronize", "allocated"]
        gpu.free(400)
    assert m.cuda_peak_bytes == 400 and m.device == torch.device("cuda", 0)


def test_an_inner_measurement_does_not_cut_the_outer_peak_short(meter, monkeypatch):
    gpu = FakeAllocator().install(monkeypatch)
    with meter.track("cuda:0") as outer:
        gpu.alloc(3000)  # the outer block's peak happens before the inner one starts
        gpu.free(3000)
        with meter.track("cuda:0") as inner:  # resets the device's peak statistic
            gpu.alloc(100)
            gpu.free(100)
        gpu.alloc(50)
        gpu.free(50)
    assert inner.cuda_peak_bytes == 100
    assert outer.cuda_peak_bytes == 3000  # 100 if the inner reset had been taken at its word
    with meter.track("cuda:0") as after:  # closed measurements leave nothing behind
        gpu.alloc(10)
    assert after.cuda_peak_bytes == 10


def test_a_peak_inside_the_inner_block_counts_for_the_outer_one(meter, monkeypatch):
    gpu = FakeAllocator().install(monkeypatch)
    with meter.track("cuda:0") as outer:
        with meter.track("cuda:0"):
            gpu.alloc(700)
            gpu.free(700)
        with meter.track("cuda:0"):  # a second inner block resets again
            gpu.alloc(5)
    assert outer.cuda_peak_bytes == 700
