"""Fixtures for cluster-mode tests: hosts as network namespaces, a Slurm cluster on them.

Where namespaces cannot be made (not root, no CAP_NET_ADMIN), tests that need them skip
with the reason; with GPUCONFORM_REQUIRE_NETNS=1 (set by .ci/run, where CI runs as root)
that skip is a failure, so CI cannot pass without having run them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from support import netns_hosts
from support.netns_hosts import Hosts, require_netns


@pytest.fixture(scope="session")
def netns_ready() -> list[str]:
    """Namespace hosts can be made here (else skip, or fail under GPUCONFORM_REQUIRE_NETNS=1);
    hosts an earlier run left behind when it was killed (its owner is gone) are removed."""
    require_netns()
    return netns_hosts.remove_stale()


def _hosts_factory(request: pytest.FixtureRequest) -> Callable[[Sequence[str]], Hosts]:
    request.getfixturevalue("netns_ready")

    def make(names: Sequence[str]) -> Hosts:
        hosts = Hosts(names)
        request.addfinalizer(hosts.close)
        return hosts

    return make


@pytest.fixture
def make_hosts(request) -> Callable[[Sequence[str]], Hosts]:
    """make_hosts(["alpha", "beta"]) -> Hosts, removed (with every process in them) after the test."""
    return _hosts_factory(request)


@pytest.fixture(scope="module")
def make_module_hosts(request) -> Callable[[Sequence[str]], Hosts]:
    """As make_hosts, for hosts shared by the tests of one module (a Slurm cluster)."""
    return _hosts_factory(request)
