"""Per-test overhead of the multi-rank engine against PyTorch's MultiProcessTestCase.

The same trivial world-size-2 gloo body (one all_reduce and an assert) runs N times
(default 20) through ``pytest --gpuconform`` and through
``torch.testing._internal.common_distributed.MultiProcessTestCase`` (run by pytest too),
in one invocation of this script, each in a fresh subprocess. Per-test times come from the
JUnit files both runs write; "after warm-up" means tests 2..N (our first test pays for
spawning the ranks once).

    python benchmarks/engine_overhead.py [--tests 20] [--repeats 1]

Not a timed test: machines are noisy, so it reports medians and ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

OURS = """
import pytest
import torch
import torch.distributed as dist


@pytest.mark.world_size(2)
@pytest.mark.parametrize("i", range({n}))
def test_all_reduce(rank, world_size, i):
    t = torch.full((4,), float(rank + 1))
    dist.all_reduce(t)
    assert torch.equal(t, torch.full((4,), 3.0))
"""

THEIRS = """
import torch
import torch.distributed as dist
from torch.testing._internal.common_distributed import MultiProcessTestCase
from torch.testing._internal.common_utils import run_tests


class AllReduceTest(MultiProcessTestCase):
    @property
    def world_size(self):
        return 2

    def setUp(self):
        super().setUp()
        self._spawn_processes()

    def _body(self):
        store = dist.FileStore(self.file_name, self.world_size)
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world_size)
        t = torch.full((4,), float(self.rank + 1))
        dist.all_reduce(t)
        assert torch.equal(t, torch.full((4,), 3.0))
        dist.destroy_process_group()


for _i in range({n}):
    setattr(AllReduceTest, f"test_all_reduce_{{_i:02d}}", AllReduceTest._body)
"""


def _run(workdir: Path, args: list[str]) -> tuple[float, list[float]]:
    junit = workdir / "junit.xml"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={junit}", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    total = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    return total, [float(c.get("time")) for c in cases]


def measure(n: int) -> dict:
    with tempfile.TemporaryDirectory() as ours_dir, tempfile.TemporaryDirectory() as theirs_dir:
        ours, theirs = Path(ours_dir), Path(theirs_dir)
        (ours / "test_ours.py").write_text(OURS.format(n=n))
        (theirs / "test_theirs.py").write_text(THEIRS.format(n=n))
        ours_total, ours_times = _run(ours, ["--gpuconform", "test_ours.py", "-k", "cpu"])
        theirs_total, theirs_times = _run(theirs, ["test_theirs.py"])
    return {
        "ours_total": ours_total,
        "ours_first": ours_times[0],
        "ours_after": statistics.median(ours_times[1:]),
        "theirs_total": theirs_total,
        "theirs_median": statistics.median(theirs_times),
        "ours_n": len(ours_times),
        "theirs_n": len(theirs_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    runs = [measure(args.tests) for _ in range(args.repeats)]
    med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    print(f"{args.tests} trivial world-size-2 gloo tests, {args.repeats} repeat(s), medians:")
    print(
        f"  pytest-gpuconform      total {med['ours_total']:7.2f} s   first test {med['ours_first']:6.3f} s   "
        f"per test after warm-up {med['ours_after'] * 1000:7.1f} ms"
    )
    print(f"  MultiProcessTestCase   total {med['theirs_total']:7.2f} s   per test {med['theirs_median']:6.3f} s")
    print(f"  ratio per test (theirs / ours after warm-up): {med['theirs_median'] / med['ours_after']:.0f}x")
    print(f"  ratio end to end (theirs / ours):             {med['theirs_total'] / med['ours_total']:.1f}x")


if __name__ == "__main__":
    main()
