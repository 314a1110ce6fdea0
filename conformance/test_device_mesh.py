"""A 2-D DeviceMesh (dp x tp): collectives along each dimension give that dimension's result.

FSDP2 + tensor parallelism, HSDP and every torchtitan layout are written against a
DeviceMesh: rank = dp_index * tp_size + tp_index (row-major), one process group per mesh
dimension. A mesh whose groups are cut along the wrong axis still runs, and sums the wrong
ranks. So each rank checks its coordinate and local ranks, the members of its dp and tp
groups, and the exact result of an all_reduce and an all_gather along each dimension,
through c10d on the dimension's group and through the functional collectives with the
``(mesh, dim)`` group DTensor passes. Both orientations run ((2, n/2) and (n/2, 2)); on 2
ranks they are 2 x 1 and 1 x 2 meshes, the real 2-D cases need 4 ranks or more.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pytest_gpuconform.checks import ExactTally, integer_values, value_range

from ._collective_cases import all_gather_single, destroy_groups

WORLD_SIZES = (2, 4, 8)
COUNT = 1031
DIMS = ("dp", "tp")


def _shape(orientation: str, world_size: int) -> tuple[int, int]:
    return (2, world_size // 2) if orientation == "dp2" else (world_size // 2, 2)


def _values(source: int, salt: int, device, world_size: int) -> torch.Tensor:
    low, high = value_range(torch.float32, world_size)
    return integer_values(COUNT, low, high, source=source, salt=salt, device=device).to(torch.float32)


def _peers(rank: int, shape: tuple[int, int], dim: int) -> list[int]:
    """The global ranks sharing this rank's other coordinate, in order along ``dim``."""
    dp_size, tp_size = shape
    dp, tp = divmod(rank, tp_size)
    if dim == 0:
        return [i * tp_size + tp for i in range(dp_size)]
    return [dp * tp_size + j for j in range(tp_size)]


def _check_dimension(mesh, dim, shape, rank, world_size, device, tally) -> None:
    import torch.distributed._functional_collectives as funcol

    name = DIMS[dim]
    peers = _peers(rank, shape, dim)
    group = mesh.get_group(name)
    members = dist.get_process_group_ranks(group)
    if members != peers:
        tally.note(f"mesh {shape} {name} group of rank {rank}: ranks {members}, expected {peers}")
    if mesh.get_local_rank(name) != peers.index(rank):
        tally.note(
            f"mesh {shape} get_local_rank({name!r}) on rank {rank}: {mesh.get_local_rank(name)}, "
            f"expected {peers.index(rank)}"
        )
    inputs = {r: _values(r, dim, device, world_size) for r in peers}
    expected = sum(inputs[r] for r in peers)
    mine = inputs[rank].clone()
    dist.all_reduce(mine, group=group)
    tally.expect(mine, expected, f"mesh {shape} all_reduce(sum) along {name} (ranks {peers}) x{COUNT}")
    functional = funcol.wait_tensor(funcol.all_reduce(inputs[rank], "sum", (mesh, dim)))
    tally.expect(functional, expected, f"mesh {shape} funcol.all_reduce(sum, (mesh, {dim})) along {name}")
    # Sized by the group the mesh gave, so a wrong group is reported, not a size error.
    gathered = torch.empty(dist.get_world_size(group) * COUNT, device=device)
    all_gather_single()(gathered, inputs[rank], group=group)
    tally.expect(gathered, torch.cat([inputs[r] for r in peers]), f"mesh {shape} all_gather along {name}")


@pytest.mark.world_size(*WORLD_SIZES)
@pytest.mark.parametrize("orientation", ["dp2", "tp2"])
def test_device_mesh_2d(orientation, rank, world_size, device, record):
    """init_device_mesh(device, shape, ("dp", "tp")): row-major coordinates, the right
    groups per dimension, exact collectives along each."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
    except ImportError as exc:
        pytest.skip(f"torch.distributed.device_mesh unavailable in torch {torch.__version__}: {exc}")
    shape = _shape(orientation, world_size)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=DIMS)
    tally = ExactTally()
    try:
        expected_coordinate = list(divmod(rank, shape[1]))
        if list(mesh.get_coordinate() or []) != expected_coordinate:
            tally.note(
                f"mesh {shape} coordinate of rank {rank}: {mesh.get_coordinate()}, expected "
                f"{tuple(expected_coordinate)} (row-major)"
            )
        for dim in range(2):
            _check_dimension(mesh, dim, shape, rank, world_size, device, tally)
        tally.verdict(f"DeviceMesh {shape} (dp, tp)", rank, world_size, record)
    finally:
        destroy_groups([mesh.get_group(name) for name in DIMS])
