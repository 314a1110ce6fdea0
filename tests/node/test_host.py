"""Host facts for the inventory, read from a copy of /proc, /sys and /etc (every branch)."""

from __future__ import annotations

import os

import pytest

from pytest_gpuconform.node import host

X86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480C\n\nprocessor\t: 1\n"
GRACE = "processor\t: 0\nBogoMIPS\t: 2000.00\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd4f\n"


def test_cpu_model_on_x86_and_arm():
    assert host.cpu_model(X86) == "Intel(R) Xeon(R) Platinum 8480C"
    assert host.cpu_model(GRACE) == "Arm CPU (implementer 0x41, part 0xd4f)"  # Grace has no model name
    assert host.cpu_model("") != ""


@pytest.mark.parametrize(
    "cpu_max, affinity, expected",
    [("max 100000", 64, 64), ("800000 100000", 64, 8), ("150000 100000", 64, 2), ("", 12, 12), ("junk x", 4, 4)],
)
def test_usable_cores_follow_affinity_and_cgroup_quota(cpu_max, affinity, expected):
    assert host.usable_cores(cpu_max, affinity) == expected


def test_read_from_a_fake_root(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(X86)
    (tmp_path / "proc/meminfo").write_text("MemTotal:       2113323008 kB\nMemFree: 1 kB\n")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text('NAME="Ubuntu"\nPRETTY_NAME="Ubuntu 22.04.4 LTS"\n')
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/cpu.max").write_text("100000 100000\n")
    facts = host.read(tmp_path)
    assert facts.cpu_model == "Intel(R) Xeon(R) Platinum 8480C"
    assert facts.memory_gib == pytest.approx(2015.4, abs=0.1) and facts.os == "Ubuntu 22.04.4 LTS"
    assert facts.cpu_cores == os.cpu_count() and facts.cpu_cores_usable == 1
    props = dict(facts.properties())
    assert props["host_memory_gib"] == "2015.4" and props["cpu_cores_usable"] == "1"
    assert "1 usable" in facts.header_line() or facts.cpu_cores == 1


def test_unreadable_facts_are_unknown_not_errors(tmp_path):
    facts = host.read(tmp_path / "nothing-here")
    assert facts.memory_bytes == 0 and dict(facts.properties())["host_memory_gib"] == "unknown"
    assert facts.as_json()["host_memory_gib"] is None and "unknown memory" in facts.header_line()
    assert facts.os  # platform.system() at least
