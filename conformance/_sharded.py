"""Comparing a sharded (DTensor) model with its full single-process reference, shard by shard.

FSDP2 and tensor parallelism keep each parameter and gradient as a DTensor whose local
part is this rank's share. The checks compare that local part with the same share cut from
the reference's full tensor (upstream's ``check_sharded_parity``), rather than gathering
the shards with ``full_tensor()``: gathering runs an all_gather, and a faulty collective
could then garble what is being judged. Cutting uses ``distribute_tensor`` with
``src_data_rank=None``, which splits locally with DTensor's own padding rules, for 1-D
and 2-D meshes alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

Judge = Callable[[torch.Tensor, torch.Tensor, str], "str | None"]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def reduced(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor with pending partial sums (the gradient of a replicated parameter under
    sequence parallelism is Partial) reduced to what an optimizer step would apply; other
    tensors as they are."""
    if not isinstance(tensor, DTensor) or not any(p.is_partial() for p in tensor.placements):
        return tensor
    from torch.distributed.tensor import Replicate

    return tensor.redistribute(placements=[Replicate() if p.is_partial() else p for p in tensor.placements])


def expected_local(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The share of the reference ``full`` that this rank holds of ``like`` (a DTensor, or a
    plain tensor, whose expected value is ``full`` itself)."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.detach(), like.device_mesh, like.placements, src_data_rank=None).to_local()


def compare_sharded(
    model: torch.nn.Module, reference: dict[str, torch.Tensor], kind: str, judge: Judge, where: str
) -> list[str]:
    """Each parameter (``kind="param"``) or gradient (``"grad"``) of ``model``, as this rank
    holds it, against its share of the reference's full tensor; one line per rejection."""
    problems = []
    for name, param in model.named_parameters():
        got = param if kind == "param" else reduced(param.grad)
        if got is None:
            problems.append(f"{where} {kind} {name!r}: missing (the reference has one)")
            continue
        found = judge(local(got), expected_local(reference[name], got), f"{where} {kind} {name!r}")
        if found:
            problems.append(found)
    return problems


def full_tensors(model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """Clones of a plain model's parameters or gradients, by name."""
    tensors = ((n, p if kind == "param" else p.grad) for n, p in model.named_parameters())
    return {n: t.detach().clone() for n, t in tensors if t is not None}
