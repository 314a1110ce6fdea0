"""What every collective check of the suite runs over: dtypes, sizes, blocking and async.

Shared by the collective, rooted, all-to-all and point-to-point modules so that they cover
the same grid and say the same thing when they fail: which call, dtype, element count and
bytes, and whether it was the blocking call or ``async_op=True`` followed by ``wait()``
(training code uses both: DDP and FSDP overlap through async work objects).

Sizes: a single element, an odd count (tails of vectorised kernels), then on GPUs 1 MiB
(where nccl#2001 showed wrong elements) and the largest buffer free memory allows (64 MiB
and more on any data-centre GPU, capped at 256 MiB), so that bandwidth is not dominated by
latency. CPU nodes stop at 2**18 elements (1 MiB of fp32): gloo on two cores gains nothing
from more, and the whole CPU suite must stay fast.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pytest_gpuconform.checks import ExactTally, gather_float, integer_values, measure_bandwidth, value_range

ELEMENT_TYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
}

WORLD_SIZES = (2, 4, 8)
ODD_COUNT = 1031
MIB = 1 << 20
CPU_LARGEST_COUNT = 1 << 18  # 1 MiB of fp32; building int64 references costs per element
GPU_LARGEST_BYTES = 256 * MIB
GPU_MEMORY_SHARE = 4  # a check may use a quarter of the free memory of the fullest GPU
TIMED_ITERATIONS = {"cpu": 5, "cuda": 20}
MODES = (False, True)  # async_op


def all_gather_single():
    """all_gather into one tensor (all_gather_into_tensor is deprecated in 2.13 in favour of
    all_gather_single, which 2.11 lacks)."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_scatter_single():
    """reduce_scatter from one tensor, under this torch's current name."""
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def counts(element_type: str, device: torch.device, world_size: int) -> list[int]:
    """Element counts per rank buffer, smallest first; the same on every rank."""
    size = ELEMENT_TYPES[element_type].itemsize
    if device.type != "cuda":
        return [1, ODD_COUNT, CPU_LARGEST_COUNT]
    return [1, ODD_COUNT, MIB // size, _largest_gpu_count(size, device, world_size)]


def _largest_gpu_count(itemsize: int, device: torch.device, world_size: int) -> int:
    """The largest power-of-two buffer up to 256 MiB whose working memory fits in a share of
    the fullest GPU's free memory: the buffers themselves plus the int64 expected answer,
    built from every rank's input (world_size blocks for the gathers) and temporaries.
    64 MiB of uint8 at 8 ranks needs about 26 GiB free (wider dtypes and fewer ranks need
    less); a smaller GPU gets what fits, and ``size_bytes`` records it."""
    free = min(gather_float(float(torch.cuda.mem_get_info(device)[0]), world_size))
    per_element = 4 * itemsize + 8 * (world_size + 4)
    fits = int(free // GPU_MEMORY_SHARE // per_element) * itemsize
    nbytes = max(2 * MIB, min(GPU_LARGEST_BYTES, fits))
    return (1 << (nbytes.bit_length() - 1)) // itemsize


def describe(what: str, element_type: str, count: int, async_op: bool = False) -> str:
    """``all_gather fp16 x1031 (2062 B) async_op=True``: the count is the per-rank block a
    collective is sized by (the mismatch that follows gives the compared tensor's length)."""
    nbytes = count * ELEMENT_TYPES[element_type].itemsize
    return f"{what} {element_type} x{count} ({nbytes} B){' async_op=True' if async_op else ''}"


def finish(work, async_op: bool) -> None:
    """The async form's contract: a work object, complete after ``wait()``."""
    if async_op:
        if work is None:
            raise AssertionError("async_op=True returned no work object")
        work.wait()


def size_label(nbytes: int) -> str:
    for unit, scale in (("MiB", MIB), ("KiB", 1024)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def record_bandwidth(make_run, collective: str, element_type: str, device, world_size: int, record) -> None:
    """Bus bandwidth (nccl-tests' busbw) per size on GPUs, at the largest size on CPU.

    ``make_run(count) -> (run, nbytes)`` builds scratch buffers for one size; ``nbytes``
    is nccl-tests' S for that collective. The largest size is also recorded under the
    unsuffixed names, which the summary and baselines follow."""
    sizes = counts(element_type, device, world_size)
    timed = sizes if device.type == "cuda" else sizes[-1:]
    for count in timed:
        run, nbytes = make_run(count)
        measured = measure_bandwidth(run, nbytes, collective, world_size, device, TIMED_ITERATIONS[device.type])
        label = size_label(nbytes)
        record(f"busbw_GBps_{label}", measured.busbw_GBps)
        record(f"time_us_{label}", measured.seconds * 1e6)
    record("size_bytes", measured.nbytes)
    record("time_us", measured.seconds * 1e6)
    record("algbw_GBps", measured.algbw_GBps)
    record("busbw_GBps", measured.busbw_GBps)


def check_every_size(tally, element_type: str, device, world_size: int, check: str, run_once, modes=MODES) -> None:
    """``run_once(count, salt, async_op)`` for every size, blocking and async, yields
    ``(got, expected, label)``; each is compared exactly into ``tally``.

    The two forms get different data (salts), so an async call that hands back the
    previous call's result cannot pass for a correct one. Calls that have only one form
    (send/recv, isend/irecv) pass ``modes=(False,)``."""
    for count in counts(element_type, device, world_size):
        for async_op in modes:
            for got, want, label in run_once(count, 2 * count + async_op, async_op):
                tally.expect(got, want, describe(check + label, element_type, count, async_op))


def verify_every_size(
    check: str,
    run_once,
    element_type: str,
    rank: int,
    world_size: int,
    device,
    record,
    modes=MODES,
    described_as: str | None = None,
) -> None:
    """The whole of an exact collective check: ``check_every_size`` into a fresh tally, then
    one verdict named ``check`` that every rank raises together (results are described as
    ``described_as``, by default the check's name)."""
    tally = ExactTally()
    check_every_size(tally, element_type, device, world_size, described_as or check, run_once, modes)
    tally.verdict(check, rank, world_size, record)


def split_size(count: int, sender: int, receiver: int, splits: str) -> int:
    """Elements ``sender`` sends to ``receiver`` in an all-to-all: ``count`` each, or 0, 1
    or 2 x count depending on the pair (every world size has empty and double blocks, as
    mixture-of-experts routing does when an expert gets no tokens)."""
    return count if splits == "even" else count * ((sender + 2 * receiver + 1) % 3)


def routed_block(count, sender, receiver, world_size, dtype, salt, device, splits) -> torch.Tensor:
    """The block ``sender`` sends to ``receiver``; its values name the pair."""
    low, high = value_range(dtype)
    n = split_size(count, sender, receiver, splits)
    return integer_values(n, low, high, source=sender * world_size + receiver, salt=salt, device=device).to(dtype)


def destroy_groups(groups) -> None:
    """Destroy the groups a check made: the ranks are reused by the next test, which must
    not inherit them. Never the default group (a mesh dimension spanning the whole world
    may be it), and never "nothing" (``destroy_process_group(None)`` destroys everything)."""
    for group in groups:
        if group is None or group is dist.GroupMember.NON_GROUP_MEMBER or group is dist.group.WORLD:
            continue
        dist.destroy_process_group(group)
