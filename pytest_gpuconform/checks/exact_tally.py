"""One rank's exact comparisons in a multi-rank check, and the one verdict all ranks share.

A collective check compares many results (sizes, roots, forms, blocking and async); an
operator needs to know how many elements were wrong in all (nccl-tests' ``#wrong``), on
which rank the most, and the first few places where they were wrong, in one line. Each
rank tallies its own comparisons; ``verdict`` exchanges the tallies (by copy, never by a
reduction the check may be testing), records the numbers and fails every rank together.
"""

from __future__ import annotations

import torch

from .compare import mismatch
from .rank_verdicts import gather_float, raise_if_any

# Problems shown in a failure message per rank; the rest are counted, so one loud symptom
# repeated at every size does not push the rank and tensor of the first one off the screen.
SHOWN_PER_RANK = 3


class ExactTally:
    """``tally.expect(got, want, what)`` for each result, then ``tally.verdict(...)`` once."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.wrong = 0
        self.compared = 0

    def expect(self, got: torch.Tensor, want: torch.Tensor, what: str) -> bool:
        """Exact comparison; counts wrong elements (all of them when the shape is wrong)."""
        self.compared += want.numel()
        problem = mismatch(got, want, what)
        if problem is None:
            return True
        if got.numel() == want.numel():  # at least 1: -0.0 vs 0.0 differ in bits, not in value
            self.wrong += max(1, int((got.reshape(-1) != want.reshape(-1)).sum()))
        else:
            self.wrong += max(want.numel(), 1)
        self.problems.append(problem)
        return False

    def note(self, problem: str | None, wrong_elements: int = 0) -> None:
        """A problem found some other way (an exception, a buffer that changed)."""
        if problem:
            self.problems.append(problem)
            self.wrong += wrong_elements

    def verdict(self, check: str, rank: int, world_size: int, record=None) -> None:
        """Every rank calls this once: records ``wrong_elements`` (the worst rank's count),
        its bound 0 and, when any element was wrong, ``wrong_elements_worst_rank``; then
        every rank fails if any rank found a problem."""
        counts = gather_float(float(self.wrong), world_size)
        if record is not None:
            worst = max(range(world_size), key=lambda r: (counts[r], -r))
            record("wrong_elements", int(counts[worst]))
            record("wrong_elements_bound", 0)
            if counts[worst] > 0:
                record("wrong_elements_worst_rank", worst)
        shown = self.problems[:SHOWN_PER_RANK]
        if len(self.problems) > len(shown):
            shown.append(f"(+{len(self.problems) - len(shown)} more)")
        raise_if_any("; ".join(shown) or None, rank, world_size, check)
