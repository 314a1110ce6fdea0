"""What a multi-rank test costs in this engine, against PyTorch's own harnesses.

One trivial world-size-2 gloo test (one all_reduce and an assert) is generated N times and
run, in one invocation of this script, through:

* ``pytest --gpuconform`` (this engine: reused ranks, each a pytest worker running the
  full pytest protocol per test, with isolation between tests);
* ``MultiProcessTestCase`` (torch.testing._internal.common_distributed: new processes
  spawned for every test);
* ``MultiProcContinuousTest`` (torch >= 2.6: processes kept for the whole class);
* ``MultiThreadedTestCase`` (threads with a threaded process group, one process).

Every run is a fresh ``python -m pytest`` subprocess timed end to end; medians of
``--repeats``. The marginal cost per test is the slope between the two counts, the fixed
cost (interpreter, imports, starting ranks) the intercept. MultiProcessTestCase spawns
every test anew, so its slope is flat and it is measured at smaller counts by default
(``--mptc-counts``); give ``--mptc-counts 20 200`` for the same counts as the others.

    pip install expecttest          # torch's testing internals import it
    python benchmarks/engine_overhead.py [--counts 20 200] [--repeats 3]

Not a timed test: machines are noisy, so it reports medians and ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BODY = """
    t = torch.full((4,), float({rank} + 1))
    dist.all_reduce(t)
    assert torch.equal(t, torch.full((4,), 3.0))
"""

OURS = """
import pytest
import torch
import torch.distributed as dist


@pytest.mark.world_size(2)
@pytest.mark.parametrize("i", range({n}))
def test_all_reduce(rank, i):""" + BODY.format(rank="rank")

MULTI_PROCESS = (
    """
import torch
import torch.distributed as dist
from torch.testing._internal.common_distributed import MultiProcessTestCase


class AllReduceTest(MultiProcessTestCase):
    @property
    def world_size(self):
        return 2

    def setUp(self):
        super().setUp()
        self._spawn_processes()

    def _body(self):
        store = dist.FileStore(self.file_name, self.world_size)
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world_size)"""
    + BODY.format(rank="self.rank").replace("\n    ", "\n        ")
    + """        dist.destroy_process_group()


for _i in range({n}):
    setattr(AllReduceTest, f"test_all_reduce_{{_i:03d}}", AllReduceTest._body)
"""
)

CONTINUOUS = (
    """
import torch
import torch.distributed as dist
from torch.testing._internal.common_distributed import MultiProcContinuousTest


class AllReduceTest(MultiProcContinuousTest):
    world_size = 2

    @classmethod
    def backend_str(cls):
        return "gloo"

    @classmethod
    def device_type(cls):
        return "cpu"

    def _body(self):"""
    + BODY.format(rank="self.rank").replace("\n    ", "\n        ")
    + """

for _i in range({n}):
    setattr(AllReduceTest, f"test_all_reduce_{{_i:03d}}", AllReduceTest._body)
"""
)

THREADED = (
    """
import torch
import torch.distributed as dist
from torch.testing._internal.common_distributed import MultiThreadedTestCase


class AllReduceTest(MultiThreadedTestCase):
    @property
    def world_size(self):
        return 2

    def setUp(self):
        super().setUp()
        self._spawn_threads()

    def _body(self):"""
    + BODY.format(rank="self.rank").replace("\n    ", "\n        ")
    + """

for _i in range({n}):
    setattr(AllReduceTest, f"test_all_reduce_{{_i:03d}}", AllReduceTest._body)
"""
)


@dataclass
class Harness:
    name: str
    source: str
    args: tuple[str, ...] = ()
    counts: tuple[int, int] = (20, 200)
    seconds: dict[int, list[float]] = field(default_factory=dict)

    def median(self, n: int) -> float:
        return statistics.median(self.seconds[n])

    @property
    def marginal(self) -> float:
        low, high = self.counts
        return (self.median(high) - self.median(low)) / (high - low)

    @property
    def fixed(self) -> float:
        low = self.counts[0]
        return self.median(low) - low * self.marginal

    def end_to_end(self, n: int) -> float:
        """Measured at n, else from the fit (MultiProcessTestCase at other counts)."""
        return self.median(n) if n in self.seconds else self.fixed + n * self.marginal


def run_once(harness: Harness, n: int) -> float:
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "test_bench.py"
        path.write_text(harness.source.format(n=n))
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "-q"]
        command += [*harness.args, str(path)]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    expected = f"{n} passed"
    if done.returncode != 0 or expected not in done.stdout:
        raise SystemExit(
            f"{harness.name} x{n} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
        )
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs=2, default=[20, 200])
    parser.add_argument("--mptc-counts", type=int, nargs=2, default=[10, 20])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="harness names to run (default: all)")
    args = parser.parse_args()
    counts = tuple(args.counts)
    harnesses = [
        Harness("pytest-gpuconform", OURS, ("--gpuconform", "-k", "cpu"), counts),
        Harness("MultiProcContinuousTest", CONTINUOUS, (), counts),
        Harness("MultiThreadedTestCase", THREADED, (), counts),
        Harness("MultiProcessTestCase", MULTI_PROCESS, (), tuple(args.mptc_counts)),
    ]
    if args.only:
        harnesses = [h for h in harnesses if h.name in args.only]
    for repeat in range(args.repeats):
        for harness in harnesses:  # interleaved: load changes hit every harness alike
            for n in harness.counts:
                seconds = run_once(harness, n)
                harness.seconds.setdefault(n, []).append(seconds)
                print(f"  repeat {repeat + 1}: {harness.name} x{n}: {seconds:.2f} s", file=sys.stderr)
    report(harnesses, counts, args.repeats)


def report(harnesses: list[Harness], counts: tuple[int, int], repeats: int) -> None:
    import torch

    low, high = counts
    print(f"trivial world-size-2 gloo test, torch {torch.__version__}, medians of {repeats} run(s)\n")
    print(f"| harness | end to end x{low} | end to end x{high} | marginal per test | fixed cost |")
    print("|---|---|---|---|---|")
    for h in harnesses:
        fitted = "" if h.counts == counts else f" (fit of x{h.counts[0]}, x{h.counts[1]})"
        print(
            f"| {h.name}{fitted} | {h.end_to_end(low):.2f} s | {h.end_to_end(high):.2f} s | "
            f"{h.marginal * 1000:.1f} ms | {h.fixed:.2f} s |"
        )
    ours = next((h for h in harnesses if h.name == "pytest-gpuconform"), None)
    if ours is None:
        return
    print()
    for h in harnesses:
        if h is ours:
            continue
        print(
            f"- vs {h.name}: end to end x{low} {ours.end_to_end(low) / h.end_to_end(low):.3g}, "
            f"x{high} {ours.end_to_end(high) / h.end_to_end(high):.3g}; "
            f"marginal {ours.marginal / h.marginal if h.marginal > 0 else float('inf'):.3g} (ours / theirs)"
        )
    print()
    print(f"- target marginal <= 3 ms per test: {ours.marginal * 1000:.1f} ms")
    for name, bound in (("MultiProcContinuousTest", 1.0), ("MultiThreadedTestCase", 1.5)):
        other = next((h for h in harnesses if h.name == name), None)
        if other is not None:
            print(
                f"- target end to end <= {bound:g}x {name}: "
                f"x{low} {ours.end_to_end(low) / other.end_to_end(low):.2f}x, "
                f"x{high} {ours.end_to_end(high) / other.end_to_end(high):.2f}x"
            )


if __name__ == "__main__":
    main()
