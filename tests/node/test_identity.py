"""Which devices CUDA will see, from NVML and the environment alone: every branch.

The parsing is plain Python; these tests pin it to CUDA's documented rules (as torch.cuda
models them) before it ever meets a GPU: CUDA_VISIBLE_DEVICES as indices, UUIDs, UUID
prefixes, MIG UUIDs (new and legacy form), CUDA_DEVICE_ORDER, repeats, invalid entries,
and the answers NVML cannot give on its own.
"""

from __future__ import annotations

import pytest

from pytest_gpuconform.node import identity, nvml
from support import h100


def board(index, name="NVIDIA H100 80GB HBM3", bus=None, uuid=None, mig=False, memory_gib=80, cc=(9, 0)):
    spec = h100(index)
    return nvml.GpuInfo(
        index,
        name,
        uuid or spec["uuid"],
        bus or spec["bus_id"],
        memory_gib * 2**30,
        cc,
        mig_enabled=mig,
    )


def mig_device(parent, slot, gi, uuid):
    return nvml.GpuInfo(
        parent.index,
        f"{parent.name} MIG 3g.40gb",
        uuid,
        parent.pci_bus_id,
        40 * 2**30,
        parent.compute_capability,
        parent_uuid=parent.uuid,
        mig_slot=(gi, 0),
        mig_index=slot,
    )


EIGHT = tuple(board(i) for i in range(8))


def visible(environ, gpus=EIGHT, migs=()):
    return identity.resolve(gpus, migs, environ)


def indices(result):
    return [d.index for d in result.devices]


# -- plain boards ------------------------------------------------------------------------------
def test_unset_means_every_board_in_pci_order():
    shuffled = (EIGHT[3], EIGHT[0], EIGHT[7], EIGHT[1], EIGHT[2], EIGHT[6], EIGHT[4], EIGHT[5])
    result = visible({}, gpus=shuffled)
    assert indices(result) == list(range(8)) and result.exact and result.note == ""


@pytest.mark.parametrize(
    "value, expected",
    [
        ("3,1", [3, 1]),  # listed order is CUDA's order
        (" 2 , 0 ", [2, 0]),  # whitespace around entries
        ("1gpu,2ampere", [1, 2]),  # strtoul: leading digits count
        ("0,2,-1,1", [0, 2]),  # a negative entry ends the list (CUDA docs' example)
        ("0,9,1", [0]),  # an index past the end ends the list
        ("0,x,1", [0]),  # so does an entry that is not a number
        ("0,GPU-00000001,1", [0]),  # a UUID in an index list is not a number
        ("1,1", []),  # a device named twice: CUDA sees none
        ("", []),
        ("   ", []),
    ],
)
def test_index_lists(value, expected):
    result = visible({"CUDA_VISIBLE_DEVICES": value})
    assert indices(result) == expected and result.exact


@pytest.mark.parametrize(
    "value, expected",
    [
        (f"{h100(5)['uuid']},{h100(2)['uuid']}", [5, 2]),
        ("GPU-00000004,GPU-00000006-aaaa", [4, 6]),  # unique prefixes, as CUDA allows
        ("gpu-00000004", [4]),  # prefix match ignores case
        ("GPU-0000000,GPU-00000001", []),  # ambiguous prefix (matches all eight): the list ends there
        ("GPU-00000003,2", [3]),  # an index in a UUID list ends it
        ("GPU-00000003,GPU-ffffffff", [3]),  # an unknown UUID ends it
        ("GPU-00000003,GPU-00000003-aaaa", []),  # the same board twice
    ],
)
def test_uuid_lists(value, expected):
    result = visible({"CUDA_VISIBLE_DEVICES": value})
    assert indices(result) == expected and result.exact


def test_device_order_decides_what_indices_mean_on_mixed_nodes():
    mixed = (board(0, "NVIDIA A100-SXM4-80GB", cc=(8, 0)), board(1), board(2, "NVIDIA A100-SXM4-80GB", cc=(8, 0)))
    pci = visible({"CUDA_DEVICE_ORDER": "pci_bus_id", "CUDA_VISIBLE_DEVICES": "1"}, gpus=mixed)
    assert indices(pci) == [1] and pci.exact
    fastest = visible({"CUDA_VISIBLE_DEVICES": "1"}, gpus=mixed)
    assert not fastest.exact and "FASTEST_FIRST and the GPUs differ in model" in fastest.note
    unset = visible({}, gpus=mixed)
    assert not unset.exact and indices(unset) == [0, 1, 2]
    # UUIDs do not depend on the order at all
    by_uuid = visible({"CUDA_VISIBLE_DEVICES": mixed[1].uuid}, gpus=mixed)
    assert indices(by_uuid) == [1] and by_uuid.exact


def test_identical_boards_need_no_cuda_answer_under_fastest_first():
    result = visible({"CUDA_DEVICE_ORDER": "FASTEST_FIRST", "CUDA_VISIBLE_DEVICES": "6,7"})
    assert indices(result) == [6, 7] and result.exact


# -- MIG ---------------------------------------------------------------------------------------
PARENT = board(1, mig=True)
MIG_A = mig_device(PARENT, 0, 1, "MIG-a1b2c3d4-0000-0000-0000-000000000001")
MIG_B = mig_device(PARENT, 1, 2, "MIG-e5f6a7b8-0000-0000-0000-000000000002")
MIG_NODE = (board(0), PARENT)


def test_mig_uuids_are_mapped():
    result = visible({"CUDA_VISIBLE_DEVICES": MIG_B.uuid}, gpus=MIG_NODE, migs=(MIG_A, MIG_B))
    assert result.devices == (MIG_B,) and result.exact
    assert result.devices[0].board_uuid == PARENT.uuid and result.devices[0].key == "gpu1_mig1"
    assert result.devices[0].label() == f"GPU 1 MIG 1 ({MIG_B.uuid}, bus {PARENT.pci_bus_id})"


def test_legacy_mig_form_names_board_gpu_instance_and_compute_instance():
    token = f"MIG-{PARENT.uuid}/2/0"
    result = visible({"CUDA_VISIBLE_DEVICES": token}, gpus=MIG_NODE, migs=(MIG_A, MIG_B))
    assert result.devices == (MIG_B,)
    missing = visible({"CUDA_VISIBLE_DEVICES": f"MIG-{PARENT.uuid}/5/0"}, gpus=MIG_NODE, migs=(MIG_A, MIG_B))
    assert missing.devices == ()


def test_several_mig_devices_or_mig_mode_without_a_list_need_cuda():
    both = visible({"CUDA_VISIBLE_DEVICES": f"{MIG_A.uuid},{MIG_B.uuid}"}, gpus=MIG_NODE, migs=(MIG_A, MIG_B))
    assert both.devices == (MIG_A, MIG_B) and not both.exact and "only one MIG device" in both.note
    unset = visible({}, gpus=MIG_NODE, migs=(MIG_A, MIG_B))
    assert not unset.exact and "MIG mode is on" in unset.note
    assert unset.devices == (MIG_NODE[0], MIG_A, MIG_B)  # the board in MIG mode is not a CUDA device
    parent_by_uuid = visible({"CUDA_VISIBLE_DEVICES": PARENT.uuid}, gpus=MIG_NODE, migs=(MIG_A, MIG_B))
    assert not parent_by_uuid.exact and "in MIG mode" in parent_by_uuid.note


# -- CUDA's own answer -----------------------------------------------------------------------
def test_cuda_answer_replaces_an_inexact_one_by_uuid():
    mixed = (board(0, "NVIDIA A100-SXM4-80GB", cc=(8, 0)), board(1))
    guess = visible({}, gpus=mixed)
    # CUDA puts the faster H100 first and prints UUIDs bare
    answer = identity.with_cuda_answer(guess, mixed, [identity.bare_uuid(mixed[1].uuid), mixed[0].uuid[4:]])
    assert indices(answer) == [1, 0] and answer.exact and answer.note.startswith("order taken from CUDA")
    kept = identity.with_cuda_answer(guess, mixed, None)
    assert indices(kept) == [0, 1] and not kept.exact and "CUDA could not be asked" in kept.note
    stranger = identity.with_cuda_answer(guess, mixed, ["deadbeef"])
    assert stranger.devices == () and not stranger.exact and "NVML does not list: deadbeef" in stranger.note
    exact = visible({})
    assert identity.with_cuda_answer(exact, EIGHT, None) is exact


def test_uuid_spellings_and_lookups():
    assert identity.bare_uuid("GPU-ABCD-12") == "abcd-12" == identity.bare_uuid("MIG-abcd-12")
    assert identity.bare_uuid(" abcd-12 ") == "abcd-12"
    assert identity.same_device("GPU-ABCD", "abcd") and not identity.same_device("", "")
    assert identity.find(EIGHT, h100(3)["uuid"][4:]) is EIGHT[3]
    assert identity.find(EIGHT, "GPU-ffff") is None
    assert identity.lock_name("GPU-ABCD") == identity.lock_name("gpu-abcd") == "gpu-abcd"
    assert identity.lock_name("MIG-ABCD") == "mig-abcd" and identity.lock_name("3") == "3"


def test_each_rank_gets_a_device_list_it_can_use():
    boards = [h100(0)["uuid"], h100(1)["uuid"]]
    assert identity.per_rank_visible_devices(boards, 2) == [",".join(boards)] * 2
    migs = [MIG_A.uuid, MIG_B.uuid]
    assert identity.per_rank_visible_devices(migs, 2) == migs  # one MIG device per process


# -- through NVML (the fake module, in this process) -------------------------------------------
def test_query_reads_mig_devices_and_asks_cuda_only_when_needed(fake_pynvml, monkeypatch):
    migs = [
        {"uuid": MIG_A.uuid, "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb", "memory_gib": 40, "gi": 1, "ci": 0},
        {"uuid": MIG_B.uuid, "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb", "memory_gib": 40, "gi": 2, "ci": 0},
    ]
    fake_pynvml({"gpus": [h100(0), h100(1, mig={"enabled": 1, "devices": migs})]})
    asked = []

    def ask():
        asked.append(True)
        return [MIG_B.uuid[4:]]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIG_B.uuid)
    node = nvml.query(ask_cuda=ask)
    assert [g.uuid for g in node.visible] == [MIG_B.uuid] and node.visible_exact and not asked
    assert node.migs[1].mig_slot == (2, 0) and node.migs[1].memory_gib == 40 and node.gpus[1].mig_enabled
    assert node.find(MIG_A.uuid[4:]) == node.migs[0] and "2 MIG device(s)" in node.message
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    node = nvml.query(ask_cuda=ask)
    assert asked and [g.uuid for g in node.visible] == [MIG_B.uuid] and node.visible_note.startswith("order taken")
