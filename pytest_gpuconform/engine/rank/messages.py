"""What crosses the pipe between the controller and a rank, in both directions.

Only plain data travels: pytest's own serialised reports (``pytest_report_to_serializable``,
dictionaries of strings and numbers), text and numbers. An exception object never crosses,
so a failure whose exception cannot be pickled or even stringified still arrives.

Every message about a test carries that test's sequence number (``seq``), unique per run
of a test in this pool: the controller drops, and never attributes, a message whose number
is not the test it is waiting for.
"""

from __future__ import annotations

from dataclasses import dataclass, field


# -- controller -> rank ----------------------------------------------------------------------
@dataclass(frozen=True)
class RunTest:
    seq: int
    nodeid: str
    path: str  # the test's file, absolute
    names: tuple[str, ...]  # the item's names below its file node, e.g. ("TestX", "test_y[ws2-cpu]")
    seed: int  # the same on every rank, derived from the test id
    next_path: str | None  # the file of the controller's next test (None: this is the last)
    next_names: tuple[str, ...] = ()


CLOSE = None  # the controller's "leave the process group and exit"


# -- rank -> controller ----------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    rank: int
    pid: int
    seconds: dict[str, float]  # start-up split: {"torch": ..., "process_group": ..., "pytest": ...}


@dataclass(frozen=True)
class StartupFailed:
    rank: int
    text: str


@dataclass(frozen=True)
class Reports:
    """Phase reports of one test, as pytest's serialised dictionaries, in phase order.

    A rank sends a failing or skipping phase at once (so the controller can stop waiting
    for peers that will never answer); passing reports travel with ``Finished``, one
    message per test. Where a rank is meanwhile is in its phase file (spec.py).
    """

    seq: int
    rank: int
    reports: list[dict]


@dataclass(frozen=True)
class Finding:
    """State a test left behind in a rank: what was done about it, and whether the rank
    can run the next test (``restored``) or must be replaced."""

    kind: str  # "thread" | "child" | "process_group" | "default_group" | "teardown"
    text: str
    restored: bool


@dataclass(frozen=True)
class Finished:
    seq: int
    rank: int
    reports: list[dict] = field(default_factory=list)  # the phase reports not sent yet
    findings: list[Finding] = field(default_factory=list)
    log_span: tuple[int, int] = (0, 0)  # the test's bytes in the rank log
    collect_seconds: float = 0.0  # time spent collecting the test's file for this test
    rejoining: bool = False  # the default group is being recreated; a Rejoined follows


@dataclass(frozen=True)
class Rejoined:
    seq: int
    rank: int
    error: str = ""  # empty when the new default group is up


@dataclass(frozen=True)
class RankError:
    """The rank's own machinery failed for this test (not the test): the text says how.
    ``fatal``: the rank is about to exit."""

    seq: int
    rank: int
    text: str
    fatal: bool = False
