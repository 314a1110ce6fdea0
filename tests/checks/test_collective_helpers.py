"""The public helpers collective checks are built from: exact data, tallies, object
comparison and nccl-tests' bandwidth factors (their use in ranks is covered by tests/faults)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")

from pytest_gpuconform.checks import (  # noqa: E402
    ExactTally,
    bit_patterns,
    bus_factor,
    exact_integer_bound,
    integer_values,
    structure_mismatch,
    value_range,
)


@pytest.mark.parametrize(
    "dtype, bound",
    [
        (torch.float32, 2**24),
        (torch.float16, 2**11),
        (torch.bfloat16, 2**8),
        (torch.int32, 2**31 - 1),
        (torch.int64, 2**63 - 1),
        (torch.uint8, 255),
    ],
)
def test_exact_integer_bound(dtype, bound):
    assert exact_integer_bound(dtype) == bound
    if dtype.is_floating_point:  # the bound is exact, the next integer is not
        assert torch.tensor(bound, dtype=dtype).item() == bound
        assert torch.tensor(bound + 1, dtype=dtype).item() != bound + 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.uint8, torch.int64])
def test_sums_of_values_in_range_are_exact(dtype):
    world = 4
    low, high = value_range(dtype, world)
    inputs = [integer_values(4096, low, high, source=r, salt=3) for r in range(world)]
    assert all(int(v.min()) >= low and int(v.max()) <= high for v in inputs)
    total = sum(inputs)
    assert torch.equal(sum(v.to(dtype) for v in inputs).to(torch.int64), total)  # summed in the dtype itself
    assert torch.equal(total.to(dtype).to(torch.int64), total)


def test_values_differ_by_source_salt_and_index():
    a = integer_values(1000, 0, 1, source=0, salt=5)
    assert torch.equal(a, integer_values(1000, 0, 1, source=0, salt=5))  # rebuilt identically anywhere
    for other in (integer_values(1000, 0, 1, source=1, salt=5), integer_values(1000, 0, 1, source=0, salt=6)):
        assert not torch.equal(a, other)  # even in the lowest bit
    assert 0 < int(a.sum()) < 1000  # not constant along the index


def test_bit_patterns_use_the_whole_width():
    assert int(bit_patterns(4096, torch.uint8, source=0).max()) >= 128
    wide = bit_patterns(4096, torch.int64, source=0)
    assert int(wide.abs().max()) > 2**53 and int(wide.min()) < 0
    with pytest.raises(TypeError):
        bit_patterns(4, torch.float32, source=0)


def test_tally_counts_wrong_elements_and_keeps_messages():
    tally = ExactTally()
    assert tally.expect(torch.arange(5), torch.arange(5), "same")
    got = torch.arange(5)
    got[3] = 7
    assert not tally.expect(got, torch.arange(5), "one off")
    assert not tally.expect(torch.zeros(2), torch.zeros(3), "short")
    tally.note("hung", wrong_elements=0)
    assert tally.wrong == 1 + 3 and tally.compared == 13
    assert tally.problems[0].startswith("one off: #wrong=1 of 5 elements, first at [3]: got 7 expected 3")
    assert tally.problems[1] == "short: shape (2,) != expected (3,)" and tally.problems[2] == "hung"


@dataclass
class _Record:
    name: str
    shape: tuple


def test_structure_mismatch_names_the_path():
    want = {"a": [1, (2, {"t": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)})], "r": _Record("w", (2, 3))}
    same = {"a": [1, (2, {"t": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)})], "r": _Record("w", (2, 3))}
    assert structure_mismatch(same, want, "obj") is None
    as_list = {"a": [1, [2, {"t": want["a"][1][1]["t"]}]], "r": want["r"]}
    assert structure_mismatch(as_list, want, "obj") == "obj['a'][1]: type list != expected tuple"
    widened = {"a": [1, (2, {"t": torch.tensor([1.0, 2.0])})], "r": want["r"]}
    assert structure_mismatch(widened, want, "obj").startswith(
        "obj['a'][1][1]['t']: tensor torch.float32 (2,) != expected torch.bfloat16 (2,)"
    )
    changed = {"a": want["a"], "r": _Record("w", (2, 4))}
    assert structure_mismatch(changed, want, "obj") == "obj['r'].shape[1]: got 4 expected 3"
    assert structure_mismatch({"b": 1}, {"a": 1}, "obj") == "obj: keys ['b'] != expected ['a']"


@pytest.mark.parametrize(
    "collective, factor",
    [
        ("all_reduce", 2 * 7 / 8),
        ("all_gather", 7 / 8),
        ("reduce_scatter", 7 / 8),
        ("all_to_all", 7 / 8),
        ("broadcast", 1.0),
        ("reduce", 1.0),
        ("send_recv", 1.0),
    ],
)
def test_bus_factors_are_nccl_tests(collective, factor):
    assert bus_factor(collective, 8) == pytest.approx(factor)
