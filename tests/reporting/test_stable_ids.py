"""The shipped suite's tests are named the same whatever directory pytest ran from; a node id
printed by any run reruns that test from an empty directory; a host override names the
JUnit suite's ``hostname`` too."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from pytest_gpuconform.collection.suite import suite_dir
from pytest_gpuconform.reporting import stable_ids

PYTEST = str(Path(sys.executable).parent / "pytest")
ONE = "torch_imports_and_is_recent"


def run(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [PYTEST, "--gpuconform", "-p", "no:cacheprovider", "-p", "no:randomly", "-rA", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, **(env or {})),
    )


def cases(path: Path) -> list[tuple[str, str]]:
    return [(c.get("classname", ""), c.get("name", "")) for c in ElementTree.parse(path).getroot().iter("testcase")]


def test_classnames_do_not_depend_on_the_directory_pytest_ran_from(tmp_path):
    """From an empty directory the rootdir is that directory; with --rootdir at the venv (as
    from a checkout holding .venv) pytest alone would say lib.python3.x.site-packages...."""
    empty = tmp_path / "empty"
    empty.mkdir()
    venv_root = Path(sys.prefix)
    runs = {
        "empty": run(empty, "-k", ONE, f"--junitxml={tmp_path / 'a.xml'}"),
        "checkout-like": run(
            empty, f"--rootdir={venv_root}", "-k", ONE, "--junit-prefix=node-7", f"--junitxml={tmp_path / 'b.xml'}"
        ),
    }
    for name, done in runs.items():
        assert done.returncode == 0, (name, done.stdout[-2000:])
    assert "site-packages" in runs["checkout-like"].stdout  # pytest's own node ids did differ
    assert cases(tmp_path / "a.xml") == [("pytest_gpuconform.conformance.test_environment", f"test_{ONE}")]
    assert cases(tmp_path / "b.xml") == [("node-7.pytest_gpuconform.conformance.test_environment", f"test_{ONE}")]


def printed_id(done: subprocess.CompletedProcess) -> str:
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("PASSED ")]
    return line.split()[1]


def test_a_printed_node_id_reruns_that_test_from_an_empty_directory(tmp_path):
    here, elsewhere = tmp_path / "first", tmp_path / "deeper" / "second"
    here.mkdir()
    elsewhere.mkdir(parents=True)
    first = run(here, f"--rootdir={sys.prefix}", "-k", ONE)
    pasted = printed_id(first)  # ../../.venv/lib/python3.x/site-packages/.../test_environment.py::test_...
    assert "site-packages/pytest_gpuconform/conformance/test_environment.py::" in pasted
    assert not (elsewhere / pasted.split("::")[0]).exists()  # pasted where that path means nothing
    for argument in (
        pasted,
        f"test_environment.py::test_{ONE}",
        f"pytest_gpuconform.conformance.test_environment::test_{ONE}",
    ):
        again = run(elsewhere, argument, f"--junitxml={tmp_path / 'again.xml'}")
        assert again.returncode == 0, (argument, again.stdout[-2000:], again.stderr[-2000:])
        assert printed_id(again) == f"test_environment.py::test_{ONE}", (argument, again.stdout[:800])
        assert re.search(r"\b1 passed, \d+ deselected", again.stdout), again.stdout[-300:]
        assert cases(tmp_path / "again.xml") == [("pytest_gpuconform.conformance.test_environment", f"test_{ONE}")]


def test_ids_of_two_modules_keep_their_own_classnames(tmp_path):
    amp = "pytest_gpuconform.conformance.test_amp::test_autocast_fp32_ops"
    done = run(tmp_path, f"test_environment.py::test_{ONE}", amp, f"--junitxml={tmp_path / 'two.xml'}")
    assert done.returncode == 0, done.stdout[-2000:]
    names = {classname for classname, _ in cases(tmp_path / "two.xml")}
    assert names == {"pytest_gpuconform.conformance.test_environment", "pytest_gpuconform.conformance.test_amp"}


def test_a_module_that_re_exports_a_shipped_test_keeps_its_own_classname(tmp_path):
    """The fault tests re-export shipped checks into modules of their own: those are not
    the shipped suite, whatever file the function was defined in."""
    (tmp_path / "test_reexport.py").write_text(
        f"from pytest_gpuconform.conformance.test_environment import test_{ONE}\n"
    )
    done = run(tmp_path, "test_reexport.py", f"--junitxml={tmp_path / 'r.xml'}")
    assert done.returncode == 0, done.stdout[-2000:]
    assert cases(tmp_path / "r.xml") == [("test_reexport", f"test_{ONE}")]


def test_a_module_id_selects_the_module_and_own_files_are_never_redirected(tmp_path):
    selection = stable_ids.resolve_pasted_args(["test_amp.py", "-x", "mine/"], tmp_path, suite_dir())
    assert selection.args == ["-x", "mine/", str(suite_dir())] and selection.wanted == ["test_amp.py"]
    assert selection.keeps("test_amp.py::test_autocast_fp32_ops[cpu-bf16]")
    assert not selection.keeps("test_ddp.py::test_x")
    (tmp_path / "test_amp.py").write_text("def test_mine():\n    pass\n")
    assert stable_ids.resolve_pasted_args(["test_amp.py"], tmp_path, suite_dir()).args == ["test_amp.py"]


def test_a_host_override_names_the_suite_hostname_too(tmp_path):
    done = run(tmp_path, "-k", ONE, f"--junitxml={tmp_path / 'j.xml'}", env={"GPUCONFORM_HOST": "rack3-node17"})
    assert done.returncode == 0
    suite = ElementTree.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("hostname") == "rack3-node17"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["gpuconform.host"] == "rack3-node17"
    if socket.gethostname() != "rack3-node17":
        assert props["gpuconform.machine_hostname"] == socket.gethostname()


@pytest.mark.parametrize(
    "nodeid, prefix, pytest_name, stable",
    [
        ("test_amp.py::test_x[cpu-bf16]", None, "test_amp", "pytest_gpuconform.conformance.test_amp"),
        (
            ".venv/lib/p/site-packages/pytest_gpuconform/conformance/test_amp.py::T::t",
            "n1",
            "n1..venv.lib.p.site-packages.pytest_gpuconform.conformance.test_amp.T",
            "n1.pytest_gpuconform.conformance.test_amp.T",
        ),
    ],
)
def test_classname_rules(nodeid, prefix, pytest_name, stable):
    assert stable_ids.pytest_classname(nodeid, prefix) == pytest_name
    assert stable_ids.stable_classname(nodeid, "test_amp", prefix) == stable
