"""torchrun agents running pytest --gpuconform in every rank: one agent per namespace host
(support.netns_hosts) with the c10d rendezvous on host 0's name, or agents on loopback that
play hosts by name only (GPUCONFORM_HOST), or one standalone agent.

Each agent's output goes to its own file (two agents writing to pipes read in turn could
block); ``Agents.wait`` returns when every agent has ended or the hard bound has passed,
and says how long each one took -- the fault tests measure time to fail with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from support.netns_hosts import Host

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
RDZV_PORT = 29400  # every host has its own network stack: no port race with anything else

# What a rank must not inherit from the test process: it has to find out who it is itself.
# (PYTEST_ADDOPTS stays: tests/conftest.py keeps pytest-randomly off through it.)
_OWN_ENV = (
    "GPUCONFORM_HOST",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "PYTEST_CURRENT_TEST",
    "PYTEST_XDIST",
)


def host_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_ENV) and not k.startswith("TORCHELASTIC")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass
class Agent:
    name: str  # the host it runs on (or plays)
    process: subprocess.Popen
    log: Path
    started: float
    ended: float | None = None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def seconds(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Agents:
    agents: list[Agent] = field(default_factory=list)

    def __iter__(self):
        return iter(self.agents)

    def __getitem__(self, index: int) -> Agent:
        return self.agents[index]

    def wait(self, bound: float, only: list[Agent] | None = None) -> None:
        """Until the agents (all, or ``only``) have ended, at most ``bound`` seconds;
        an agent still running then is left running (the test decides)."""
        waiting = list(only if only is not None else self.agents)
        end = time.monotonic() + bound
        while waiting and time.monotonic() < end:
            for agent in list(waiting):
                if agent.process.poll() is not None:
                    agent.ended = time.monotonic()
                    waiting.remove(agent)
            time.sleep(0.05)

    def outputs(self) -> str:
        return "\n".join(f"===== {a.name} (rc {a.returncode}) =====\n{a.output()[-4000:]}" for a in self.agents)


def _torchrun(launch: list[str], pytest_args: list[str]) -> list[str]:
    return [TORCHRUN, *launch, "-m", "pytest", "--gpuconform", "-p", "no:cacheprovider", *pytest_args]


def _rendezvous(nodes: int, endpoint: str) -> list[str]:
    return ["--nnodes", str(nodes), "--nproc-per-node", "1", "--rdzv-backend", "c10d"] + [
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        "gpuconform-test",
    ]


def start_agents(hosts: list[Host], cwd: Path, pytest_args: list[str], env: dict[str, str] | None = None) -> Agents:
    """One torchrun agent (one rank) per host, all meeting at host 0's name (its /etc/hosts entry)."""
    agents = Agents()
    argv = _torchrun(_rendezvous(len(hosts), f"{hosts[0].name}:{RDZV_PORT}"), pytest_args)
    for host in hosts:
        log = cwd / f"agent-{host.name}.log"
        with open(log, "w") as handle:
            process = host.popen(
                argv, cwd=cwd, env=env or host_env(), stdout=handle, stderr=subprocess.STDOUT, text=True
            )
        agents.agents.append(Agent(host.name, process, log, time.monotonic()))
    return agents


def start_loopback_agents(names: list[str], cwd: Path, pytest_args: list[str], port: int) -> Agents:
    """One agent (one rank) per name on 127.0.0.1; GPUCONFORM_HOST gives each its host name."""
    agents = Agents()
    argv = _torchrun(_rendezvous(len(names), f"127.0.0.1:{port}"), pytest_args)
    for name in names:
        log = cwd / f"agent-{name}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen(
                argv, cwd=cwd, env=dict(host_env(), GPUCONFORM_HOST=name), stdout=handle, stderr=subprocess.STDOUT
            )
        agents.agents.append(Agent(name, process, log, time.monotonic()))
    return agents


def start_standalone(cwd: Path, pytest_args: list[str], nproc: int, port: int) -> Agents:
    """One agent with ``nproc`` ranks on this machine (torchrun --standalone)."""
    log = cwd / "agent-standalone.log"
    argv = _torchrun(["--standalone", "--nproc-per-node", str(nproc)], pytest_args)
    with open(log, "w") as handle:
        process = subprocess.Popen(
            argv, cwd=cwd, env=dict(host_env(), MASTER_PORT=str(port)), stdout=handle, stderr=subprocess.STDOUT
        )
    return Agents([Agent("standalone", process, log, time.monotonic())])
