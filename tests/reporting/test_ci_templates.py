"""The ci/ templates a platform team copies: they parse, their shell is valid, and the Slurm
and GitLab scripts do the right thing when run against stand-ins for the cluster tools.

The stand-ins (``srun``, ``scontrol``, ``hostname``, ``torchrun``, ``pytest``, ``pip``) are
small scripts put first on PATH; ``gpuconform merge`` / ``report`` are the real ones, so
the scripts' reports are real merged JUnit and real pages.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

import support

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the YAML templates (pip install pyyaml)")

CI = support.ROOT / "ci"
GITHUB = CI / "github" / "gpu-conformance-nightly.yml"
GITLAB = CI / "gitlab" / "gpu-conformance.gitlab-ci.yml"
KUBERNETES = CI / "kubernetes" / "gpuconform-indexed-job.yaml"
PER_NODE = CI / "slurm" / "gpuconform-per-node.sbatch"
MATRIX_PASS = re.compile(r'data-check="[^"]*" data-outcome="passed"')
TORCHRUN = CI / "slurm" / "gpuconform-cluster-torchrun.sbatch"


def check_shell(script: str, tmp_path: Path, name: str) -> None:
    """``bash -n``, and shellcheck (warnings and errors) where it is installed."""
    path = tmp_path / name
    path.write_text(script)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{name}: {result.stderr}"
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        result = subprocess.run(
            [shellcheck, "--shell=bash", "--severity=warning", str(path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{name}: {result.stdout}"


def github_expressions_away(script: str) -> str:
    return re.sub(r"\$\{\{[^}]*\}\}", "X", script)


def test_github_workflow_runs_nightly_uploads_and_publishes_even_after_failures(tmp_path):
    workflow = yaml.safe_load(GITHUB.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "schedule" in triggers and "workflow_dispatch" in triggers
    assert workflow["permissions"]["checks"] == "write"
    (job,) = workflow["jobs"].values()
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    steps = {step["name"]: step for step in job["steps"]}
    for name, step in steps.items():
        if "run" in step:
            check_shell(github_expressions_away(step["run"]), tmp_path, f"github-{len(name)}.sh")
    run = steps["Conformance suite"]["run"]
    junit = (
        re.search(r'--junitxml="([^"]+)"', run)
        .group(1)
        .replace("$REPORT_DIR", "reports")
        .replace("$RUNNER_NAME", "gpu-1")
    )
    upload, publish = steps["Upload JUnit and HTML report"], steps["Publish test results"]
    assert upload["uses"].startswith("actions/upload-artifact@") and publish["uses"].startswith(
        "mikepenz/action-junit-report@"
    )
    assert fnmatch.fnmatch(junit, publish["with"]["report_paths"]) and junit.startswith(upload["with"]["path"])
    for step in (steps["HTML report"], upload, publish):  # after a failed suite, still report
        assert "!cancelled()" in step["if"] or "always()" in step["if"]


def test_gitlab_job_reports_junit_and_fails_when_a_check_failed(tmp_path, stand_ins):
    config = yaml.safe_load(GITLAB.read_text())
    job = config["gpu-conformance"]
    assert job["artifacts"]["when"] == "always" and "reports/" in job["artifacts"]["paths"]
    junit_glob = job["artifacts"]["reports"]["junit"]
    script = "\n".join(job["script"])
    check_shell(script, tmp_path, "gitlab.sh")
    # Run the script as GitLab would (bash, errexit), with a failing stand-in pytest.
    workdir = tmp_path / "job"
    workdir.mkdir()
    env = stand_ins.env(GPUCONFORM_HOST="gitlab-runner-7", FAKE_PYTEST_FAIL="gitlab-runner-7")
    result = subprocess.run(
        ["bash", "-e", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    written = sorted(str(p.relative_to(workdir)) for p in (workdir / "reports").iterdir())
    assert written == [
        "reports/inventory-gitlab-runner-7.json",
        "reports/junit-gitlab-runner-7.xml",
        "reports/report.html",
    ]
    assert [w for w in written if fnmatch.fnmatch(w, junit_glob)] == ["reports/junit-gitlab-runner-7.xml"]


def kubernetes_documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(KUBERNETES.read_text())}


def test_kubernetes_indexed_job_one_pod_per_node_no_retries(tmp_path):
    docs = kubernetes_documents()
    claim, job = docs["PersistentVolumeClaim"], docs["Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["GPUCONFORM_HOST"]["value"] == "$(NODE_NAME)"
    (script,) = container["args"]
    check_shell(script, tmp_path, "pod.sh")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert 'report="/reports/junit-$NODE_NAME.xml"' in script and '--junitxml="$report"' in script
    assert mounts["reports"] == "/reports"
    assert {v["name"]: v for v in pod["volumes"]}["reports"]["persistentVolumeClaim"]["claimName"] == claim["metadata"][
        "name"
    ]


@pytest.mark.parametrize("script", [PER_NODE, TORCHRUN], ids=lambda p: p.name)
def test_slurm_scripts_are_valid_shell(tmp_path, script):
    check_shell(script.read_text(), tmp_path, script.name)
    assert os.access(script, os.X_OK)


# -- stand-ins -------------------------------------------------------------------------

FAKE_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="0" failures="{failures}" skipped="0" tests="2" time="0.100" hostname="{host}"><properties><property name="gpuconform.host" value="{host}" /><property name="gpuconform.gpu_count" value="8" /></properties><testcase classname="pytest_gpuconform.conformance.test_environment" name="test_torch_imports_and_is_recent" time="0.001" /><testcase classname="pytest_gpuconform.conformance.test_collectives" name="test_all_reduce[ws2-cuda-fp32]" time="0.100"><properties><property name="device" value="cuda" /></properties>{result}</testcase></testsuite></testsuites>
"""

PYTEST = f"""#!{sys.executable}
# Stand-in for pytest: logs its arguments, writes a one-test JUnit file for this host
# (failing where FAKE_PYTEST_FAIL names the host) and exits like pytest would.
import json, os, sys
host = os.environ["GPUCONFORM_HOST"]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["pytest", host, sys.argv[1:]]) + "\\n")
path = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--junitxml="))
path = path.replace("{{host}}", host).replace("{{rank}}", os.environ.get("RANK", "0"))
failed = host in os.environ.get("FAKE_PYTEST_FAIL", "").split()
result = '<failure message="busbw 12.0 &lt; floor 200 GB/s">trace</failure>' if failed else ""
text = {FAKE_JUNIT!r}.format(host=host, failures=int(failed), result=result)
if host in os.environ.get("FAKE_PYTEST_NO_GPU", "").split():  # its checks ran, none on a GPU
    text = text.replace('<property name="device" value="cuda" />', '')
with open(path, "w") as out:
    out.write(text)
sys.exit(1 if failed else 0)
"""

TORCHRUN_STANDIN = f"""#!{sys.executable}
# Stand-in for torchrun: logs its arguments and runs `-m pytest ...` once per local rank,
# with RANK set as the c10d rendezvous would (ranks named in FAKE_DEAD_RANKS never report).
import json, os, subprocess, sys
args = sys.argv[1:]
option = lambda name: next(a.split("=", 1)[1] for a in args if a.startswith(name + "="))
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["torchrun", os.environ["GPUCONFORM_HOST"], args]) + "\\n")
nproc = int(option("--nproc-per-node"))
pytest_args = args[args.index("-m") + 2:]
status = 0
for local in range(nproc):
    rank = int(os.environ["SLURM_NODEID"]) * nproc + local
    if str(rank) in os.environ.get("FAKE_DEAD_RANKS", "").split():
        status = 1
        continue
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(local))
    status = subprocess.call(["pytest", *pytest_args], env=env) or status
    if rank == 0:   # rank 0 of the real plugin also writes the collapsed cluster file
        junit = next(a.split("=", 1)[1] for a in pytest_args if a.startswith("--junitxml="))
        with open(os.path.join(os.path.dirname(junit), "junit-cluster.xml"), "w") as out:
            out.write({FAKE_JUNIT!r}.format(host="cluster", failures=0, result=""))
sys.exit(status)
"""

SRUN = """#!/bin/bash
# Stand-in for srun: runs the command once per node of FAKE_NODES, as that node (nodes named
# in FAKE_DEAD_NODES never start), and fails like srun when any task failed.
while [[ "$1" == -* ]]; do shift; done
status=0
index=0
for node in $FAKE_NODES; do
    if [[ " $FAKE_DEAD_NODES " == *" $node "* ]]; then
        status=1
    else
        SLURMD_NODENAME="$node" SLURM_NODEID="$index" SLURM_PROCID="$index" "$@" || status=$?
    fi
    index=$((index + 1))
done
exit "$status"
"""

SCONTROL = f"""#!{sys.executable}
# Stand-in for `scontrol show hostnames LIST` and `scontrol update ...` (logged).
import json, os, sys
args = sys.argv[1:]
if args[:1] == ["update"]:
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(json.dumps(["scontrol", "", args]) + "\\n")
    sys.exit(0)
if args[:2] != ["show", "hostnames"] or args[2:] != [os.environ["SLURM_JOB_NODELIST"]]:
    sys.exit("scontrol stand-in: " + " ".join(args))
print("\\n".join(os.environ["FAKE_NODES"].split()))
"""

KUBECTL = f"""#!{sys.executable}
# Stand-in for kubectl: logs its arguments.
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["kubectl", "", sys.argv[1:]]) + "\\n")
"""

HOSTNAME = """#!/bin/bash
echo "${SLURMD_NODENAME:-standin-host}"
"""

PIP = """#!/bin/bash
exit 0
"""


class StandIns:
    def __init__(self, directory: Path, log: Path) -> None:
        self.directory = directory
        self.log = log
        directory.mkdir()
        for name, text in [
            ("pytest", PYTEST),
            ("torchrun", TORCHRUN_STANDIN),
            ("srun", SRUN),
            ("scontrol", SCONTROL),
            ("kubectl", KUBECTL),
            ("hostname", HOSTNAME),
            ("pip", PIP),
        ]:
            path = directory / name
            path.write_text(text)
            path.chmod(0o755)

    def env(self, **extra: str) -> dict[str, str]:
        gpuconform = shutil.which("gpuconform", path=os.path.dirname(sys.executable)) or shutil.which("gpuconform")
        assert gpuconform, "the gpuconform console script must be installed beside this Python"
        path = os.pathsep.join([str(self.directory), os.path.dirname(gpuconform), os.environ["PATH"]])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "GPUCONFORM", "FAKE_"))}
        return dict(env, PATH=path, FAKE_LOG=str(self.log), **extra)

    def calls(self, tool: str) -> list[list]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [entry[1:] for entry in map(json.loads, lines) if entry[0] == tool]


@pytest.fixture
def stand_ins(tmp_path) -> StandIns:
    return StandIns(tmp_path / "bin", tmp_path / "calls.jsonl")


def run_sbatch(script: Path, workdir: Path, env: dict) -> subprocess.CompletedProcess:
    workdir.mkdir(exist_ok=True)
    return subprocess.run(["bash", str(script)], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)


def merged_suites(path: Path) -> dict[str, tuple[str, str]]:
    root = ElementTree.parse(path).getroot()
    return {s.get("name"): (s.get("tests"), s.get("failures")) for s in root.findall("testsuite")}


SLURM = dict(
    SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-[01-03]", SLURM_JOB_NUM_NODES="3", FAKE_NODES="gpu-01 gpu-02 gpu-03"
)


def test_per_node_script_one_pytest_per_node_then_merge(tmp_path, stand_ins):
    result = run_sbatch(PER_NODE, tmp_path / "ok", stand_ins.env(**SLURM))
    assert result.returncode == 0, result.stderr
    reports = tmp_path / "ok" / "reports" / "4242"
    assert merged_suites(reports / "cluster.xml") == {n: ("2", "0") for n in ("gpu-01", "gpu-02", "gpu-03")}
    page = (reports / "report.html").read_text()
    assert len(MATRIX_PASS.findall(page)) == 6  # the check x node matrix: two checks x three nodes
    assert 'data-count="passed">3<' in page
    calls = stand_ins.calls("pytest")
    assert [host for host, _ in calls] == ["gpu-01", "gpu-02", "gpu-03"]
    host, args = calls[1]
    assert {"--gpuconform", "-n", "auto", "--junit-prefix=gpu-02", f"--junitxml={reports}/junit-gpu-02.xml"} <= set(
        args
    )


def test_per_node_script_fails_on_a_silent_node_and_a_failed_check(tmp_path, stand_ins):
    env = stand_ins.env(**SLURM, FAKE_DEAD_NODES="gpu-02", FAKE_PYTEST_FAIL="gpu-03")
    result = run_sbatch(PER_NODE, tmp_path / "bad", env)
    assert result.returncode == 1
    assert "gpuconform: no report from 1 node(s): gpu-02" in result.stderr
    reports = tmp_path / "bad" / "reports" / "4242"
    assert merged_suites(reports / "cluster.xml") == {"gpu-01": ("2", "0"), "gpu-03": ("2", "1")}
    assert "busbw 12.0 &lt; floor 200 GB/s" in (reports / "report.html").read_text()
    assert stand_ins.calls("scontrol") == []  # draining is opt-in


def test_per_node_script_drains_failed_and_silent_nodes_when_asked(tmp_path, stand_ins):
    env = stand_ins.env(**SLURM, FAKE_DEAD_NODES="gpu-02", FAKE_PYTEST_FAIL="gpu-03", GPUCONFORM_DRAIN="1")
    result = run_sbatch(PER_NODE, tmp_path / "drain", env)
    assert result.returncode == 1
    updates = [args for _, args in stand_ins.calls("scontrol")]
    assert updates == [
        ["update", "NodeName=gpu-02", "State=DRAIN", "Reason=gpuconform: no report (crashed, hung or never started)"],
        ["update", "NodeName=gpu-03", "State=DRAIN", "Reason=gpuconform: test_all_reduce[ws2-cuda-fp32]"],
    ]
    assert "gpuconform: draining gpu-03: gpuconform: test_all_reduce[ws2-cuda-fp32]" in result.stderr


def test_torchrun_script_one_agent_per_node_every_rank_reports(tmp_path, stand_ins):
    env = stand_ins.env(
        **dict(
            SLURM,
            SLURM_JOB_NODELIST="gpu-[01-02]",
            SLURM_JOB_NUM_NODES="2",
            FAKE_NODES="gpu-01 gpu-02",
            GPUCONFORM_GPUS_PER_NODE="2",
        )
    )
    result = run_sbatch(TORCHRUN, tmp_path / "ok", env)
    assert result.returncode == 0, result.stderr
    reports = tmp_path / "ok" / "reports" / "4242"
    # Per-rank files merged (the collapsed junit-cluster.xml of rank 0 is not among them).
    assert merged_suites(reports / "cluster.xml") == {
        f"gpu-0{node}-r{rank}": ("2", "0") for node, rank in [(1, 0), (1, 1), (2, 2), (2, 3)]
    }
    agents = stand_ins.calls("torchrun")
    assert [host for host, _ in agents] == ["gpu-01", "gpu-02"]
    for _, args in agents:
        assert {
            "--nnodes=2",
            "--nproc-per-node=2",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=gpu-01:29500",
            "--rdzv-id=4242",
            "-p",
            "no:xdist",
            "no:randomly",
            f"--junitxml={reports}/junit-{{host}}-r{{rank}}.xml",
        } <= set(args)
    page = (reports / "report.html").read_text()
    assert len(MATRIX_PASS.findall(page)) == 4  # two hosts x two checks, their ranks folded per column


def test_torchrun_script_fails_when_a_rank_is_missing(tmp_path, stand_ins):
    env = stand_ins.env(
        **dict(
            SLURM,
            SLURM_JOB_NODELIST="gpu-[01-02]",
            SLURM_JOB_NUM_NODES="2",
            FAKE_NODES="gpu-01 gpu-02",
            GPUCONFORM_GPUS_PER_NODE="2",
            FAKE_DEAD_RANKS="3",
        )
    )
    result = run_sbatch(TORCHRUN, tmp_path / "bad", env)
    assert result.returncode == 1
    assert "gpuconform: no report from 1 of 4 rank(s): r3" in result.stderr
    assert set(merged_suites(tmp_path / "bad" / "reports" / "4242" / "cluster.xml")) == {
        "gpu-01-r0",
        "gpu-01-r1",
        "gpu-02-r2",
    }


@pytest.mark.parametrize(
    "action, failing",
    [("label", True), ("taint", True), ("taint", False), ("", True), ("label", None), ("taint", None)],
)
def test_kubernetes_pod_labels_or_taints_its_node_when_asked(tmp_path, stand_ins, action, failing):
    """failing None: every check passed, none on a GPU: exit 0, but the node is not verified
    (labelled and annotated so, never tainted as failed nor cleared)."""
    (script,) = kubernetes_documents()["Job"]["spec"]["template"]["spec"]["containers"][0]["args"]
    reports = tmp_path / "reports"
    reports.mkdir()
    script = script.replace("/reports/", f"{reports}/")
    env = stand_ins.env(NODE_NAME="gpu-node-5", GPUCONFORM_HOST="gpu-node-5", GPUCONFORM_NODE_ACTION=action)
    if failing:
        env["FAKE_PYTEST_FAIL"] = "gpu-node-5"
    elif failing is None:
        env["FAKE_PYTEST_NO_GPU"] = "gpu-node-5"
    # `gpuconform inventory` is real; stand-ins for pip, pytest and kubectl.
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == (1 if failing else 0), result.stderr
    calls = [args for _, args in stand_ins.calls("kubectl")]
    verdict = {True: "failed", False: "passed", None: "not-verified"}[failing]
    if not action:
        assert calls == []
        return
    if failing is None:
        assert calls == [
            ["label", "node", "gpu-node-5", "gpuconform.io/verdict=not-verified", "--overwrite"],
            [
                "annotate",
                "node",
                "gpu-node-5",
                "gpuconform.io/first-failure=not verified: no check ran on a GPU",
                "--overwrite",
            ],
        ]
        return
    expected = [["label", "node", "gpu-node-5", f"gpuconform.io/verdict={verdict}", "--overwrite"]]
    if failing:
        expected.append(
            [
                "annotate",
                "node",
                "gpu-node-5",
                "gpuconform.io/first-failure=test_all_reduce[ws2-cuda-fp32]",
                "--overwrite",
            ]
        )
        if action == "taint":
            expected.append(["taint", "node", "gpu-node-5", "gpuconform.io/failed=true:NoSchedule", "--overwrite"])
    elif action == "taint":
        expected.append(["taint", "node", "gpu-node-5", "gpuconform.io/failed:NoSchedule-"])
    assert calls == expected
    rbac = kubernetes_documents()["ClusterRole"]["rules"][0]
    assert rbac["resources"] == ["nodes"] and set(rbac["verbs"]) == {"get", "patch"}
