"""Per-rank findings turned into one verdict that every rank raises together.

A multi-rank check that asserts in one rank only leaves the other ranks waiting in their
next collective until the engine's timeout. So each rank writes down what it found (a
one-line problem, or nothing), the findings are exchanged as UTF-8 bytes with
``all_gather`` (a copy, no arithmetic, so a faulty reduction cannot garble them), and
every rank fails with the same message naming each rank that saw a problem. The message is one line: rank, tensor,
measured value and bound, as the suite's failure messages must be.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .compare import mismatch


def summarize_problems(problems: Sequence[str], shown: int = 3, kinds: Sequence[str] = ()) -> str | None:
    """One line for ``raise_if_any`` from many problems: the first ``shown`` of them, or with
    ``kinds`` (substrings naming the comparisons a check makes) the first problem of each
    kind, so that one loud symptom does not hide a second one, and of the problems of no
    kind the first ``shown``; then how many more there were. None when there are none."""
    if not problems:
        return None
    if kinds:
        first_of_kind: dict[str, str] = {}
        unkinded: list[str] = []
        for problem in problems:
            kind = next((kind for kind in kinds if kind in problem), None)
            if kind is None:
                unkinded.append(problem)
            else:
                first_of_kind.setdefault(kind, problem)
        picked = [problem for problem in problems if problem in first_of_kind.values() or problem in unkinded[:shown]]
    else:
        picked = list(problems[:shown])
    more = len(problems) - len(picked)
    return "; ".join(picked) + (f" (+{more} more)" if more else "")


def raise_if_any(problem: str | None, rank: int, world_size: int, check: str) -> None:
    """Exchange every rank's finding and fail in all ranks if any rank found something."""
    found = gather_text(problem or "", world_size)
    bad = [(r, p) for r, p in enumerate(found) if p]
    if bad:
        detail = "; ".join(f"rank {r}: {p}" for r, p in bad)
        raise AssertionError(f"{check}: {len(bad)} of {world_size} ranks wrong: {detail}")


def collective_device() -> torch.device:
    """Where tensors for the default group must live: NCCL takes only the current GPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_text(text: str, world_size: int) -> list[str]:
    """Every rank's string, in rank order. ``all_gather_object`` would do, but it needs
    numpy, which a lean training image may not have.

    The slots start as what no rank sends (length -1, bytes that are not UTF-8), so an
    all_gather that delivers nothing is an error here, not a list of empty findings; and a
    rank's own finding is its own text whatever the gather did.
    """
    device = collective_device()
    me = dist.get_rank()
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    lengths = [torch.full_like(length, -1) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    if any(int(n) < 0 for n in lengths) or int(lengths[me]) != data.numel():
        raise AssertionError(
            f"gather_text: all_gather did not deliver every rank's length (got {[int(n) for n in lengths]} "
            f"on rank {me}): the collective the verdicts rely on is broken"
        )
    longest = max(int(n) for n in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    slots = [torch.full_like(padded, 0xFF) for _ in range(world_size)]  # 0xFF never occurs in UTF-8
    dist.all_gather(slots, padded)
    found = [
        bytes(slot[: int(n)].tolist()).decode("utf-8", errors="replace") for slot, n in zip(slots, lengths, strict=True)
    ]
    if found[me] != text:
        raise AssertionError(f"gather_text: all_gather did not deliver rank {me}'s own text back to it")
    return found


def gather_float(value: float, world_size: int) -> list[float]:
    """Every rank's number, in rank order (timings: the slowest rank sets the bandwidth)."""
    mine = torch.tensor([value], dtype=torch.float64, device=collective_device())
    slots = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(slots, mine)
    return [float(s) for s in slots]


def same_on_all_ranks(tensor: torch.Tensor, what: str, rank: int, world_size: int) -> str | None:
    """Bitwise comparison of this rank's tensor with rank 0's: None, or one line naming the
    tensor, how many elements differ and the largest difference.

    Rank 0's copy travels by broadcast (a copy, not a reduction), so a faulty reduction
    cannot make unequal tensors look equal; and on the other ranks the buffer it lands in
    starts as this rank's tensor with every bit flipped, so a broadcast that delivers
    nothing differs at every element instead of comparing the tensor with itself.
    """
    reference = tensor.detach().clone() if rank == 0 else _every_bit_flipped(tensor.detach())
    dist.broadcast(reference, src=0)
    if rank == 0:
        return None
    problem = mismatch(tensor, reference, what)
    if problem is None:
        return None
    return problem.replace("expected", "rank 0 has").replace("(bound: exact)", "(bound: bitwise equal to rank 0)")


def _every_bit_flipped(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that differs from ``tensor`` at every element, in every bit."""
    if tensor.dtype == torch.bool:
        return torch.logical_not(tensor)
    if tensor.is_complex():
        return torch.view_as_complex(_every_bit_flipped(torch.view_as_real(tensor)))
    if tensor.is_floating_point():
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
        return torch.bitwise_not(tensor.contiguous().view(as_int)).view(tensor.dtype)
    return torch.bitwise_not(tensor)
