"""Messages between the controller and the ranks.

Only plain, picklable data crosses the pipe: exceptions are sent as formatted text, because
an arbitrary exception object may not unpickle in the controller (and a failed unpickle
would hide the real failure).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunTest:
    nodeid: str
    module_name: str
    module_file: str
    function: str  # qualified name inside the module: "test_x" or "TestCls.test_x"
    kwargs: dict[str, bytes]  # controller-resolved fixture values, each pickled on its own
    instance: bytes | None  # the pickled test-class instance (setup_method state), or None
    rank_fixtures: tuple[str, ...]  # fixture names the rank must provide itself
    sys_path: tuple[str, ...]
    seed: int


@dataclass
class RankReport:
    rank: int
    outcome: str  # "passed" | "failed" | "skipped"
    message: str = ""  # one line: exception type and text, or skip reason
    traceback: str = ""  # the rank's formatted traceback, frames of the test first
    records: list = field(default_factory=list)  # [(name, value)] from record()
    duration: float = 0.0


@dataclass(frozen=True)
class Ready:
    rank: int
    pid: int


@dataclass(frozen=True)
class StartupFailed:
    rank: int
    traceback: str
