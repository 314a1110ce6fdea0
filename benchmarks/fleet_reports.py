"""How ``gpuconform merge`` and ``gpuconform report`` scale to a fleet.

One real run of the shipped suite on this node (``pytest --gpuconform --junitxml`` with
``-o junit_logging=system-out`` as the CI templates run it, or
``--base FILE`` to reuse one) becomes a 1,000-node fleet (tests/support/fleet.py: GPU checks
pass as on 8 x H100, GEMM and all_reduce numbers recorded per node, hosts gpu-0001...;
injected: slow GPUs, ECC errors, wrong all_reduce elements, nodes without a driver,
inventory outliers). Then, each in a fresh process (so its peak memory is its own):

* ``gpuconform merge`` of the 1,000 node files;
* ``gpuconform report`` of the 1,000 node files, and of the merged file;

printing wall time, CPU time, peak RSS, output sizes and what the page found.

    python benchmarks/fleet_reports.py                  # a real run first (~30-90 s), then the fleet
    python benchmarks/fleet_reports.py --base reports/junit.xml --nodes 1000 --keep /tmp/fleet

Bounds from the issue, checked and printed: merge <= 20 s and <= 300 MB; page <= 5 MB, built
in <= 20 s. Exit code 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.fleet import make_fleet  # noqa: E402

BOUNDS = {"merge_s": 20.0, "merge_mb": 300.0, "report_s": 20.0, "page_mb": 5.0}
MEASURE = """
import json, resource, sys, time
from pytest_gpuconform.cli import main
started, cpu = time.perf_counter(), time.process_time()
code = main(sys.argv[1:])
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"code": code, "wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
                  "peak_mb": usage.ru_maxrss / 1024}), file=sys.stderr)
"""


def measured(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, timeout=900)
    result = json.loads(done.stderr.strip().splitlines()[-1])
    result["line"] = done.stdout.strip()
    if result["code"] != 0:
        sys.exit(f"gpuconform {args[0]} failed: {done.stdout}{done.stderr}")
    return result


def real_run(directory: Path) -> Path:
    junit = directory / "junit-real.xml"
    empty = directory / "run"
    empty.mkdir()
    print("one real run of the shipped suite: pytest --gpuconform --junitxml ...", flush=True)
    started = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "pytest"), "--gpuconform", "-p", "no:cacheprovider", "-q"]
        + ["-o", "junit_logging=system-out", f"--junitxml={junit}"],  # as the CI templates run it
        cwd=empty,
        capture_output=True,
        text=True,
    )
    if not junit.exists():
        sys.exit(f"the real run wrote no JUnit file:\n{done.stdout[-3000:]}")
    print(f"  {done.stdout.strip().splitlines()[-1]} ({time.perf_counter() - started:.0f} s)")
    return junit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--base", type=Path, help="a real JUnit file to start from (default: run the suite now)")
    parser.add_argument("--keep", type=Path, help="keep the fleet, merged file and pages in this directory")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="gpuconform-fleet-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = args.base or real_run(work)
        started = time.perf_counter()
        plan = make_fleet(base, work / "nodes", args.nodes)
        inputs = sum(p.stat().st_size for p in plan.paths)
        print(
            f"fleet: {args.nodes} node files from {base.name}, {inputs / 1e6:.0f} MB "
            f"({time.perf_counter() - started:.1f} s to generate); injected: {len(plan.slow_gpu)} slow GPUs, "
            f"{len(plan.ecc)} ECC, {len(plan.wrong_elements)} wrong all_reduce, {len(plan.cpu_nodes)} without driver; "
            f"outliers: {len(plan.old_driver)} old driver, {len(plan.other_torch)} other torch, "
            f"{len(plan.other_nccl)} other NCCL, {len(plan.seven_gpus)} with 7 GPUs"
        )
        files = [str(p) for p in plan.paths]
        merged, page, page2 = work / "cluster.xml", work / "report.html", work / "report-from-merged.html"
        merge = measured("merge", *files, "-o", str(merged))
        report = measured("report", *files, "-o", str(page))
        from_merged = measured("report", str(merged), "-o", str(page2))
        rows = [
            ("merge", merge, merged),
            ("report (node files)", report, page),
            ("report (merged file)", from_merged, page2),
        ]
        print(f"\n{'step':<22}{'wall s':>8}{'CPU s':>8}{'peak MB':>9}{'output MB':>11}")
        for name, result, output in rows:
            size = output.stat().st_size / 1e6
            print(f"{name:<22}{result['wall_s']:>8.1f}{result['cpu_s']:>8.1f}{result['peak_mb']:>9.0f}{size:>11.2f}")
        print(f"\n{report['line']}")
        failed = []
        page_mb = page.stat().st_size / 1e6
        for name, value, bound in [
            ("merge time (s)", merge["wall_s"], BOUNDS["merge_s"]),
            ("merge peak memory (MB)", merge["peak_mb"], BOUNDS["merge_mb"]),
            ("report time (s)", report["wall_s"], BOUNDS["report_s"]),
            ("page size (MB)", page_mb, BOUNDS["page_mb"]),
        ]:
            verdict = "ok" if value <= bound else "OVER"
            print(f"  {name:<24} {value:8.1f} <= {bound:g}: {verdict}")
            if value > bound:
                failed.append(name)
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
