"""What a multi-rank body may be: class methods keep their setup state; a coroutine fails as
pytest itself fails it (no async plugin), in every rank."""

BODIES = """
import pytest
import torch
import torch.distributed as dist


class TestWithState:
    def setup_method(self):
        self.answer = 41

    @pytest.mark.world_size(2)
    def test_state_arrives(self, rank):
        assert self.answer == 41


@pytest.mark.world_size(2)
async def test_coroutine(rank):
    assert False


@pytest.mark.world_size(2)
def test_skip_while_peer_waits(rank):
    if rank == 0:
        pytest.skip("only rank 0 lacks the feature")
    dist.all_reduce(torch.ones(1))
"""


def test_bodies(run_gpuconform, pytester):
    pytester.makepyfile(test_bodies=BODIES)
    result = run_gpuconform("-k", "cpu", "--durations=0", "-p", "no:asyncio")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines_random(
        [
            "*rank 1: failed: Failed: async def functions are not natively supported*",
            "*ranks disagree about skipping (ranks 1 cut: blocked in a collective after a peer's skip): rank 0: skipped*",
        ]
    )
    durations = [line for line in result.stdout.lines if "call" in line and "test_skip_while_peer_waits" in line]
    assert durations and float(durations[0].split("s")[0]) < 15, durations
