"""Distributed checkpoint (DCP) conformance: a sharded training state survives save and load.

``torch.distributed.checkpoint`` writes each rank's shards of the model and optimizer state
(FSDP2 DTensors, via ``get_state_dict``) to files plus one metadata file, and loads them
back into whatever sharding the loading job has: the same, or another world size. A
checkpoint that loses or garbles a shard, or an optimizer state that does not come back,
shows only as a worse loss after the restart, which nobody traces to the checkpoint. Here:

* save at world size N, load into a fresh FSDP2 model and optimizer (initialised
  differently, so nothing passes by coincidence): every local shard of every parameter and
  optimizer state bitwise equal to what was saved, on every rank, and one more training
  step after the load equal to the step without the restart;
* save at world size N, load in one process into a plain model: every tensor bitwise
  equal to the full (gathered) state;
* save from one process, load at world size N: every shard bitwise equal to its share of
  the saved full state.

All ranks must see the same directory (one node, or a shared filesystem in cluster mode);
where they do not, the checks are skipped saying so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pytest_gpuconform.checks import gather_float, gather_text, mismatch, raise_if_any, summarize_problems

from ._dist_models import rank_slice
from ._sharded import expected_local, local
from ._transformer import TinyLM, lm_batches, lm_loss, seeded

STEPS = 2
LOCAL_BATCH = 2
LOADED_SEED = 777  # the model a checkpoint is loaded into starts from other weights


def _dcp():
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:
        pytest.skip(f"torch {torch.__version__} lacks DCP state_dict helpers or FSDP2: {exc}")
    return dcp, get_state_dict, set_state_dict, fully_shard


def _model(device, mesh=None, seed=None):
    """TinyLM, fully sharded over ``mesh`` when given (per block and root)."""
    _, _, _, fully_shard = _dcp()
    model = seeded(TinyLM, device, **({"seed": seed} if seed is not None else {}))
    if mesh is not None:
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _train(model, device, shares: int, share: int, steps=STEPS):
    """Adam steps on batch share ``share`` of ``shares`` (shares=1: the whole batch)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in lm_batches(steps, LOCAL_BATCH * 2, device, seed=41):
        lm_loss(model(rank_slice(x, share, shares)), rank_slice(y, share, shares)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def _state(model, optimizer) -> dict:
    _, get_state_dict, _, _ = _dcp()
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _load_into(model, optimizer, directory: str, no_dist: bool = False) -> dict:
    """dcp.load into the state dict of ``model``/``optimizer``, then set it on them."""
    dcp, _, set_state_dict, _ = _dcp()
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=directory, no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return state


def _leaves(state, prefix=""):
    """(path, value) for every leaf of a nested state dict: "optim/state/<fqn>/exp_avg"."""
    for key, value in state.items() if isinstance(state, dict) else enumerate(state):
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, (dict, list, tuple)):
            yield from _leaves(value, name)
        else:
            yield name, value


def _flat(state, full=False) -> dict:
    """Every leaf: this rank's shard of a tensor (or the gathered full tensor), cloned, or
    the plain value."""

    def value_of(value):
        if not torch.is_tensor(value):
            return value
        return (value.full_tensor() if full and hasattr(value, "full_tensor") else local(value)).detach().clone()

    return {name: value_of(value) for name, value in _leaves(state)}


def _differences(got: dict, want: dict, where: str, expected=lambda name, value: value) -> list[str]:
    """Every entry of ``want`` bitwise equal in ``got`` (after ``expected``), one line each."""
    problems = [f"{where}: {name!r} missing after load" for name in want if name not in got]
    for name, value in want.items():
        if name not in got:
            continue
        if torch.is_tensor(value):
            found = mismatch(got[name], expected(name, value), f"{where} {name!r}")
        else:
            found = None if got[name] == value else f"{where} {name!r}: {got[name]!r} != saved {value!r}"
        problems.extend([found] if found else [])
    return problems


def _record_comparison(record, compared: dict, problems: list, world_size: int) -> None:
    """What was compared, and the most tensors any rank found differing (not rank 0's count)."""
    record("tensors_compared", sum(torch.is_tensor(v) for v in compared.values()))
    record("tensors_differing", int(max(gather_float(len(problems), world_size))))
    record("tensors_differing_max", 0)


def _shared_directory(tmp_path: Path, rank: int, world_size: int) -> str:
    """Rank 0's directory, used by every rank: the ranks of a pool on one node all see it;
    across cluster nodes it must be on a filesystem they share, else the test skips saying
    which ranks cannot see it."""
    return gather_text(str(tmp_path / "checkpoint"), world_size)[0]


def _skip_unless_visible(directory: str, world_size: int) -> None:
    seen = gather_text("yes" if (Path(directory) / ".metadata").exists() else "no", world_size)
    if "no" in seen:
        blind = [r for r, s in enumerate(seen) if s == "no"]
        pytest.skip(
            f"checkpoint directory {directory} is not visible to ranks {blind}: DCP needs a filesystem all ranks share"
        )


def _mesh(device, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,))


@pytest.mark.world_size(2)
def test_dcp_sharded_roundtrip_bitwise(rank, world_size, device, tmp_path, record):
    """Save FSDP2 model + Adam state at world size N, load into a differently initialised
    FSDP2 model + optimizer: every shard and optimizer state bitwise equal on every rank,
    and one more step after the load equals one more step without the restart."""
    dcp, *_ = _dcp()
    directory = _shared_directory(tmp_path, rank, world_size)
    mesh = _mesh(device, world_size)
    model = _model(device, mesh)
    optimizer = _train(model, device, world_size, rank)
    saved = _flat(_state(model, optimizer))
    dcp.save(_state(model, optimizer), checkpoint_id=directory)
    _skip_unless_visible(directory, world_size)

    restored = _model(device, mesh, seed=LOADED_SEED)
    restored_optimizer = torch.optim.Adam(restored.parameters(), lr=1e-2)
    loaded = _flat(_load_into(restored, restored_optimizer, directory))
    problems = _differences(loaded, saved, "loaded state")
    problems += _differences(_flat(_state(restored, restored_optimizer)), saved, "state on the restored model")
    for m, opt in ((model, optimizer), (restored, restored_optimizer)):
        x, y = lm_batches(1, LOCAL_BATCH * world_size, device, seed=43)[0]
        lm_loss(m(rank_slice(x, rank, world_size)), rank_slice(y, rank, world_size)).backward()
        opt.step()
    after = {n: local(p) for n, p in model.named_parameters()}
    problems += [
        found
        for n, p in restored.named_parameters()
        if (found := mismatch(local(p), after[n], f"param {n!r} one step after the load vs without restart"))
    ]
    _record_comparison(record, saved, problems, world_size)
    raise_if_any(summarize_problems(problems), rank, world_size, f"DCP save/load at world size {world_size}")


@pytest.mark.world_size(2)
def test_dcp_sharded_checkpoint_loads_in_one_process(rank, world_size, device, tmp_path, record):
    """A checkpoint saved by N FSDP2 ranks, loaded by one process into a plain model and
    optimizer: every tensor bitwise equal to the full (gathered) state that was saved."""
    dcp, *_ = _dcp()
    directory = _shared_directory(tmp_path, rank, world_size)
    model = _model(device, _mesh(device, world_size))
    optimizer = _train(model, device, world_size, rank)
    full = _flat(_state(model, optimizer), full=True)
    dcp.save(_state(model, optimizer), checkpoint_id=directory)
    _skip_unless_visible(directory, world_size)
    problems = []
    if rank == 0:
        plain = _model(device, seed=LOADED_SEED)
        plain_optimizer = torch.optim.Adam(plain.parameters(), lr=1e-2)
        _load_into(plain, plain_optimizer, directory, no_dist=True)
        problems = _differences(_flat(_state(plain, plain_optimizer)), full, f"world size {world_size} -> 1")
    dist.barrier()
    _record_comparison(record, full, problems, world_size)
    raise_if_any(summarize_problems(problems), rank, world_size, f"DCP saved at world size {world_size}, loaded at 1")


@pytest.mark.world_size(2)
def test_dcp_single_process_checkpoint_loads_sharded(rank, world_size, device, tmp_path, record):
    """A checkpoint saved by one process (plain model + Adam), loaded by N FSDP2 ranks:
    every local shard bitwise equal to its share of the saved full tensor."""
    dcp, *_ = _dcp()
    directory = _shared_directory(tmp_path, rank, world_size)
    plain = _model(device)
    plain_optimizer = _train(plain, device, 1, 0)  # every rank trains it: same full state
    full = _flat(_state(plain, plain_optimizer))
    if rank == 0:
        dcp.save(_state(plain, plain_optimizer), checkpoint_id=directory, no_dist=True)
    dist.barrier()
    _skip_unless_visible(directory, world_size)
    sharded = _model(device, _mesh(device, world_size), seed=LOADED_SEED)
    sharded_optimizer = torch.optim.Adam(sharded.parameters(), lr=1e-2)
    layout = {name: value for name, value in _leaves(_state(sharded, sharded_optimizer)) if torch.is_tensor(value)}
    _load_into(sharded, sharded_optimizer, directory)
    problems = _differences(
        _flat(_state(sharded, sharded_optimizer)),
        full,
        f"world size 1 -> {world_size}",
        expected=lambda name, value: expected_local(value, layout[name]) if name in layout else value,
    )
    _record_comparison(record, full, problems, world_size)
    raise_if_any(summarize_problems(problems), rank, world_size, f"DCP saved at world size 1, loaded at {world_size}")
