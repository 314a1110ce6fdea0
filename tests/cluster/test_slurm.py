"""The shipped Slurm templates on a real Slurm cluster (Debian's slurm-wlm on namespace hosts).

One cluster per module (support.slurm_cluster): slurmctld on ``head``, slurmd on ``node0``
and ``node1`` (partition ``gpu``, the default) and on ``node2`` and ``node3`` (partition
``limits``, for the two time-limit jobs, which run beside the template jobs). The templates are submitted from
the checkout as they are, with ``sbatch --wait``; only their documented variables are set
(GPUCONFORM_VENV, GPUCONFORM_PYTEST_ARGS, GPUCONFORM_GPUS_PER_NODE) and sbatch's own
command-line options (``--nodes``, ``--time``, ``--partition``).
"""

from __future__ import annotations

import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from support import ROOT
from support.slurm_cluster import KILL_WAIT, SlurmCluster, missing_daemons
from support.tools import schema_errors as _schema_errors
from support.torchrun_hosts import host_env

PER_NODE = ROOT / "ci" / "slurm" / "gpuconform-per-node.sbatch"
CLUSTER = ROOT / "ci" / "slurm" / "gpuconform-cluster-torchrun.sbatch"
VENV = Path(sys.executable).parent.parent

TIME_LIMITED = """
import time

def test_a_finishes():
    pass

def test_b_finishes():
    pass

def test_c_outlives_the_time_limit():
    time.sleep(600)
"""


def _require_tools() -> None:
    missing = missing_daemons()
    if missing:
        message = f"{', '.join(missing)} not installed (Debian packages slurm-wlm, munge)"
        if os.environ.get("GPUCONFORM_REQUIRE_TOOLS"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def slurm(make_module_hosts, tmp_path_factory):
    _require_tools()
    hosts = make_module_hosts(["head", "node0", "node1", "node2", "node3"])
    cluster = SlurmCluster(
        tmp_path_factory.mktemp("slurm"),
        hosts[0],
        {"gpu": [hosts[1], hosts[2]], "limits": [hosts[3], hosts[4]]},
        cpus=os.cpu_count() or 1,
        memory_mib=1000,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def _job_env(**variables: str) -> dict[str, str]:
    return host_env(GPUCONFORM_VENV=str(VENV), **variables)


def _submit_wait(slurm: SlurmCluster, cwd: Path, template: Path, env: dict[str, str], *options: str):
    started = time.monotonic()
    done = slurm.client(["sbatch", "--wait", *options, str(template)], cwd=cwd, env=env, timeout=240, check=False)
    job = done.stdout.strip().split()[-1] if done.stdout.strip() else "?"
    output = "\n".join(p.read_text(errors="replace")[-4000:] for p in cwd.glob(f"*-{job}.out"))
    return done, job, time.monotonic() - started, output


# The per-node template runs pytest with -n auto; GPUCONFORM_PYTEST_ARGS can override that.
TIME_LIMITED_RUNS = {"xdist": "test_time_limited.py", "no-xdist": "-n 0 test_time_limited.py"}


@pytest.fixture(scope="module")
def time_limited_jobs(slurm, tmp_path_factory) -> dict[str, tuple[Path, str, float]]:
    """Submitted before the template tests run (they use the other partition), so their
    minute-plus runs beside them; the time-limit tests at the end wait for them. One runs
    the template as it is (-n auto), one with -n 0 (pytest in one process)."""
    jobs = {}
    for name, args in TIME_LIMITED_RUNS.items():
        cwd = tmp_path_factory.mktemp(f"time-limit-{name}")
        (cwd / "test_time_limited.py").write_text(TIME_LIMITED)
        done = slurm.client(
            ["sbatch", "--parsable", "--time=1", "--nodes=1", "--partition=limits", str(PER_NODE)],
            cwd=cwd,
            env=_job_env(GPUCONFORM_PYTEST_ARGS=args),
        )
        jobs[name] = (cwd, done.stdout.strip().split(";")[0], time.monotonic())
    return jobs


@pytest.fixture(autouse=True)
def _time_limited_jobs_run_beside(time_limited_jobs):
    """Every test of this module starts the time-limited jobs first (once)."""


def test_per_node_template_on_real_slurm(slurm, tmp_path):
    """One pytest per node, then merge and page: per-node JUnit named after the node,
    cluster.xml with both nodes, report.html; the job passes."""
    env = _job_env(GPUCONFORM_PYTEST_ARGS="-k test_environment")
    done, job, took, output = _submit_wait(slurm, tmp_path, PER_NODE, env, "--nodes=2")
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{output}\n{slurm.logs()}"
    reports = tmp_path / "reports" / job
    assert sorted(p.name for p in reports.iterdir()) == [
        "cluster.xml",
        "junit-node0.xml",
        "junit-node1.xml",
        "report.html",
    ], output
    assert _schema_errors(reports / "cluster.xml", reports / "junit-node0.xml", reports / "junit-node1.xml") == ""
    suites = ET.parse(reports / "cluster.xml").getroot().findall("testsuite")
    assert sorted(s.get("hostname") for s in suites) == ["node0", "node1"]
    assert all(int(s.get("tests")) > 0 and s.get("failures") == "0" for s in suites)
    print(f"per-node template: job {job} in {took:.1f} s")


def test_cluster_torchrun_template_on_real_slurm(slurm, tmp_path):
    """torchrun on each node, one world across them: per-rank JUnit named by host and rank,
    rank 0's junit-cluster.xml, the merged cluster.xml and the page; the job passes."""
    env = _job_env(GPUCONFORM_PYTEST_ARGS="-k ws2-cpu-fp32-sum", GPUCONFORM_GPUS_PER_NODE="1")
    done, job, took, output = _submit_wait(slurm, tmp_path, CLUSTER, env, "--nodes=2")
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{output}\n{slurm.logs()}"
    reports = tmp_path / "reports" / job
    names = sorted(p.name for p in reports.iterdir())
    assert names == ["cluster.xml", "junit-cluster.xml", "junit-node0-r0.xml", "junit-node1-r1.xml", "report.html"]
    assert _schema_errors(*(reports / n for n in names if n.endswith(".xml"))) == ""
    merged = ET.parse(reports / "junit-cluster.xml").getroot()
    ranks = {p.get("value") for p in merged.iter("property") if p.get("name") == "gpuconform.cluster_ranks"}
    assert ranks == {"node0/r0 node1/r1"}, ranks
    (case,) = merged.iter("testcase")
    assert case.get("name") == "test_all_reduce[ws2-cpu-fp32-sum]" and case.find("failure") is None
    print(f"cluster template: job {job} in {took:.1f} s")


def _wait_for_end(slurm: SlurmCluster, job: str, bound: float) -> dict[str, str]:
    end = time.monotonic() + bound
    while True:
        info = slurm.job_info(job)
        if info.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return info
        assert time.monotonic() < end, f"job {job} still {info.get('JobState')} after {bound:g} s"
        time.sleep(0.5)


@pytest.mark.parametrize("run", list(TIME_LIMITED_RUNS))
def test_time_limit_ends_the_job(slurm, time_limited_jobs, record_property, run):
    """--time=1: slurmctld cancels the job at the limit (checked every 30 s, so 60-90 s
    after the start), SIGTERM then SIGKILL after KillWait; the job ends TIMEOUT."""
    cwd, job, submitted = time_limited_jobs[run]
    info = _wait_for_end(slurm, job, 180)
    took = time.monotonic() - submitted
    record_property("job_seconds", round(took, 1))
    output = "".join(p.read_text(errors="replace") for p in cwd.glob(f"*-{job}.out"))
    assert info["JobState"] == "TIMEOUT", info
    assert "CANCELLED AT" in output and "DUE TO TIME LIMIT" in output, output[-3000:]
    assert 60 <= took <= 90 + KILL_WAIT + 15, took
    print(f"time limit ({run}): job {job} ended {info['JobState']} after {took:.1f} s (RunTime {info.get('RunTime')})")


@pytest.mark.parametrize("run", list(TIME_LIMITED_RUNS))
def test_time_limit_leaves_a_valid_junit_per_node(slurm, time_limited_jobs, run):
    """The node's JUnit file survives the time limit: valid against the schema, every case
    named, the two finished tests passed and the one cut short as an error naming SIGTERM
    (under -n auto the xdist controller gives it that error: reporting/in_flight.py)."""
    cwd, job, _ = time_limited_jobs[run]
    _wait_for_end(slurm, job, 180)
    output = "".join(p.read_text(errors="replace") for p in cwd.glob(f"*-{job}.out"))
    (junit,) = list((cwd / "reports" / job).glob("junit-node*.xml")) or [None]
    assert junit is not None, f"no JUnit file after the time limit; the job's output:\n{output[-3000:]}"
    assert _schema_errors(junit) == ""
    found = list(ET.parse(junit).getroot().iter("testcase"))
    assert all(c.get("name") for c in found), [ET.tostring(c, encoding="unicode")[:300] for c in found]
    cases = {c.get("name"): c for c in found}
    for name in ("test_a_finishes", "test_b_finishes"):
        assert name in cases and not [e for e in cases[name] if e.tag in ("failure", "error", "skipped")], cases
    cut = cases["test_c_outlives_the_time_limit"]
    problem = cut.find("error") if cut.find("error") is not None else cut.find("failure")
    assert problem is not None and "SIGTERM" in (problem.get("message") or ""), ET.tostring(cut, encoding="unicode")
    if run == "xdist":
        assert cut.find("error") is not None, ET.tostring(cut, encoding="unicode")
