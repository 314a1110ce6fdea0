"""torch.compile conformance: inductor's generated code computes what eager computes.

``torch.compile`` with the inductor backend turns a model into generated kernels: C++
(OpenMP, vectorised for this CPU's ISA) compiled by the node's C++ compiler on CPU, Triton
on GPU. A wrong compiler, a wrong ISA detection or a miscompiled kernel gives a model that
runs and trains wrong, so the generated code is checked against eager on this node:

* a transformer block (attention, norms, GELU MLP), forward and backward, within the fp32
  row of the tolerance table (inductor reorders and fuses: observed ~2e-7);
* the same under autocast, within the rel_l2 of the low-precision rows, and really in low
  precision: the compiled result must stay away from the fp32 one by at least u/8 (u the
  unit roundoff), or a compile that dropped autocast would pass as more accurate;
* a compiled model under DDP (dynamo's DDPOptimizer splits the graph at bucket boundaries)
  and per-layer compiled blocks under FSDP2 (torchtitan's order): the step equals the
  single process in eager (fp32 row).

Compilation must really happen: dynamo must capture a graph and inductor compile forward
and backward (its FX-graph cache counters), without graph breaks where ``fullgraph=True``.
Every run compiles from scratch into a cache directory of its own (one per process: each
rank runs the session fixture itself, under its own base temporary directory), because a
warm cache from an earlier run would skip the compiler this check is about. Compilation is the
cost of this module (seconds per graph on two CPU cores); each test records its
``compile_seconds``.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch

from pytest_gpuconform.checks import (
    WithinTolerance,
    gather_float,
    raise_if_any,
    relative_l2,
    same_on_all_ranks,
    summarize_problems,
    too_far,
    true_fp32,
)

from ._dist_models import rank_slice
from ._sharded import compare_sharded, full_tensors
from ._transformer import SEQ, WIDTH, Block, FeedForwardStack, lm_batches, lm_loss, seeded

BATCH = 2
LEARNING_RATE = 0.1
STEPS = 2


@pytest.fixture(scope="session")
def inductor_cache_dir(tmp_path_factory) -> str:
    """A fresh inductor cache for this run, one per process (every rank makes its own)."""
    return str(tmp_path_factory.mktemp("inductor_cache"))


@contextlib.contextmanager
def fresh_inductor(cache_dir: str):
    """Compile into ``cache_dir`` with dynamo's caches and counters reset before and after
    (compiled code left behind would count against dynamo's recompile limit in the next
    test, and a test over that limit silently runs eager). Inductor compiles in this
    thread (``compile_threads = 1``): its worker pool would outlive the test, and the
    suite's small graphs gain nothing from it. Yields dynamo's counters."""
    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    threads = torch._inductor.config.compile_threads
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    torch._inductor.config.compile_threads = 1
    torch._dynamo.reset()
    counters.clear()
    try:
        yield counters
    finally:
        torch._dynamo.reset()
        torch._inductor.config.compile_threads = threads
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def compile_problem(counters, fullgraph: bool) -> str | None:
    """None when dynamo captured a graph and inductor compiled a forward and a backward
    graph (cache miss or hit: either way inductor's code, not eager, runs)."""
    graphs = counters["stats"]["unique_graphs"]
    inductor = counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"]
    breaks = sum(counters["graph_break"].values())
    if graphs < 1 or inductor < 2:
        return (
            f"not compiled: dynamo captured {graphs} graphs, inductor compiled {inductor} "
            f"(expected >= 1 and >= 2: forward and backward)"
        )
    if fullgraph and breaks:
        return f"{breaks} graph breaks under fullgraph=True: {dict(counters['graph_break'])}"
    return None


def _forward_backward(model, params, x, grad_out, autocast_dtype=None) -> dict:
    """Output, input gradient and parameter gradients of one forward + backward; ``params``
    names the parameters (a compiled module prefixes its names)."""
    for p in params.values():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(x)
    out.float().backward(grad_out)
    result = {"output": out.detach().float(), "input grad": x.grad}
    result.update({f"grad {n}": p.grad.clone() for n, p in params.items()})
    return result


def _block_and_data(device):
    generator = torch.Generator().manual_seed(23)
    x = torch.randn(BATCH, SEQ, WIDTH, generator=generator).to(device)
    grad_out = torch.randn(BATCH, SEQ, WIDTH, generator=generator).to(device)
    block = seeded(Block, device)
    return block, dict(block.named_parameters()), x, grad_out


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


pytestmark = [
    pytest.mark.usefixtures("one_intra_op_thread"),
    # torch's own modules that inductor imports use the deprecated jit decorators (2.13).
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


def test_compiled_block_matches_eager(device, tolerance, record, inductor_cache_dir):
    """Inductor-compiled transformer block (fullgraph): output, input and parameter
    gradients within the fp32 row of eager's."""
    block, params, x, grad_out = _block_and_data(device)
    judge = WithinTolerance(tolerance.rtol, tolerance.atol)
    with true_fp32(device), fresh_inductor(inductor_cache_dir) as counters:
        eager = _forward_backward(block, params, x, grad_out)
        compiled = torch.compile(block, backend="inductor", fullgraph=True)
        got, seconds = _timed(lambda: _forward_backward(compiled, params, x, grad_out))
        problems = [found] if (found := compile_problem(counters, fullgraph=True)) else []
    problems += [found for name, want in eager.items() if (found := judge(got[name], want, f"compiled {name}"))]
    record("compile_seconds", seconds)
    record("tolerance_used", judge.used)
    record("tolerance_used_bound", 1.0)
    assert not problems, f"inductor block vs eager ({device}): " + "; ".join(problems[:4])


@pytest.mark.dtype("bf16", "fp16")
def test_compiled_block_under_autocast(device, dtype, tolerance, tolerance_table, record, inductor_cache_dir):
    """Compiled block under autocast: every tensor within the low-precision row's rel_l2 of
    eager under the same autocast, and at least u/8 away from eager fp32 somewhere (the
    compiled code really computed in low precision)."""
    block, params, x, grad_out = _block_and_data(device)
    floor = torch.finfo(dtype).eps / 2 / 8
    with true_fp32(device), fresh_inductor(inductor_cache_dir) as counters:
        fp32 = _forward_backward(block, params, x, grad_out)
        eager = _forward_backward(block, params, x, grad_out, dtype)
        compiled = torch.compile(block, backend="inductor", fullgraph=True)
        got, seconds = _timed(lambda: _forward_backward(compiled, params, x, grad_out, dtype))
        problems = [found] if (found := compile_problem(counters, fullgraph=True)) else []
    worst = max(relative_l2(got[name], want) for name, want in eager.items())
    problems += [
        found
        for name, want in eager.items()
        if (found := too_far(got[name], want, tolerance.rel_l2, f"compiled {name} vs eager autocast"))
    ]
    from_fp32 = max(relative_l2(got[name], want) for name, want in fp32.items())
    if from_fp32 < floor:
        problems.append(
            f"compiled results are within rel_l2 {from_fp32:.3g} of fp32 everywhere (floor {floor:.3g}): "
            f"autocast({dtype}) was not applied in the compiled code"
        )
    record("compile_seconds", seconds)
    record("max_rel_l2_vs_eager", worst)
    record("bound_rel_l2", tolerance.rel_l2)
    record("max_rel_l2_from_fp32", from_fp32)
    record("max_rel_l2_from_fp32_min", floor)
    assert not problems, f"inductor block under autocast({dtype}) ({device}): " + "; ".join(problems[:4])


# -- compiled models under data parallelism ---------------------------------------------------


def _train_against_eager(model, reference, rank, world_size, device, judge, compare):
    """SGD steps of ``model`` (this rank's batch share) and the eager reference (the whole
    batch); ``compare(step, kind)`` judges gradients and parameters. Returns (problems,
    seconds of the first step: compilation)."""
    batches = lm_batches(STEPS, BATCH * world_size, device, seed=31)
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LEARNING_RATE)
    problems, first = [], 0.0
    for step, (x, y) in enumerate(batches, start=1):
        start = time.perf_counter()
        lm_loss(model(rank_slice(x, rank, world_size)), rank_slice(y, rank, world_size)).backward()
        first = first or time.perf_counter() - start
        lm_loss(reference(x), y).backward()
        problems += compare(step, "grad")
        for optimizer in (opt, ref_opt):
            optimizer.step()
            optimizer.zero_grad()
        problems += compare(step, "param")
    return problems, first


@pytest.mark.world_size(2)
def test_compiled_model_under_ddp(rank, world_size, device, tolerance, record, inductor_cache_dir):
    """torch.compile(DDP(model)): gradients and parameters after each step equal eager
    single-process training on the full batch (fp32 row), parameters bitwise equal on all
    ranks."""
    from torch.nn.parallel import DistributedDataParallel

    judge = WithinTolerance(tolerance.rtol, tolerance.atol)
    module = seeded(FeedForwardStack, device)
    reference = seeded(FeedForwardStack, device)
    ref_params = dict(reference.named_parameters())

    def compare(step, kind):
        found = []
        for name, p in module.named_parameters():
            got, want = (p, ref_params[name]) if kind == "param" else (p.grad, ref_params[name].grad)
            found += [
                f
                for f in (
                    judge(got, want, f"step {step} {kind} {name!r} vs eager single process"),
                    same_on_all_ranks(got, f"step {step} {kind} {name!r}", rank, world_size),
                )
                if f
            ]
        return found

    with true_fp32(device), fresh_inductor(inductor_cache_dir) as counters:
        ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        problems, seconds = _train_against_eager(
            torch.compile(ddp, backend="inductor"), reference, rank, world_size, device, judge, compare
        )
        problems += [found] if (found := compile_problem(counters, fullgraph=False)) else []
    record("compile_seconds", max(gather_float(seconds, world_size)))
    record("tolerance_used", max(gather_float(judge.used, world_size)))
    record("tolerance_used_bound", 1.0)
    raise_if_any(summarize_problems(problems), rank, world_size, "compiled DDP vs eager single process")


@pytest.mark.world_size(2)
def test_compiled_model_under_fsdp2(rank, world_size, device, tolerance, record, inductor_cache_dir):
    """Each layer torch.compile'd (fullgraph), then fully_shard per layer and on the root:
    gradient and parameter shards after each step equal eager single-process training on
    the full batch (fp32 row)."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no public FSDP2 (torch.distributed.fsdp.fully_shard, 2.6+)")
    judge = WithinTolerance(tolerance.rtol, tolerance.atol)
    mesh = init_device_mesh(device.type, (world_size,))
    reference = seeded(FeedForwardStack, device)
    with true_fp32(device), fresh_inductor(inductor_cache_dir) as counters:
        model = seeded(FeedForwardStack, device)
        for layer in model.layers:
            layer.compile(backend="inductor", fullgraph=True)
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

        def compare(step, kind):
            return compare_sharded(model, full_tensors(reference, kind), kind, judge, f"step {step}")

        problems, seconds = _train_against_eager(model, reference, rank, world_size, device, judge, compare)
        problems += [found] if (found := compile_problem(counters, fullgraph=True)) else []
    record("compile_seconds", max(gather_float(seconds, world_size)))
    record("tolerance_used", max(gather_float(judge.used, world_size)))
    record("tolerance_used_bound", 1.0)
    raise_if_any(summarize_problems(problems), rank, world_size, "compiled layers under FSDP2 vs eager single process")
