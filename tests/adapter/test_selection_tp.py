"""topk-importance under tensor parallelism, without an engine: two "ranks" (threads), each
holding one of the two KV heads (and its query heads), run the selection store on the same
stream. With their scores summed over the ranks (``adapter/tensor_parallel.RankSum``, here
over a thread barrier instead of vLLM's group) both keep, at every step, exactly the blocks one
store over every head keeps, and each rank's outputs are that store's for its heads. Scored
per rank, as before the fix, the ranks part (the engine check: tests/e2e/test_tensor_parallel.py).
"""

import threading

import pytest
import torch

from tests.adapter.test_selection import HKV, HQ, _stream
from vllm_kvstream.adapter.tensor_parallel import RankSum, tp_rank_sum


class ThreadGroup:
    """An all-gather between ``n`` threads (the shape vLLM's ``GroupCoordinator.all_gather``
    returns for ``t[None]`` along dim 0: ``[n, *t.shape]``)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.parts: list[torch.Tensor | None] = [None] * n
        self.barrier = threading.Barrier(n, timeout=60)
        self.calls = [0] * n

    def rank_sum(self, rank: int) -> RankSum:
        def gather(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.parts[rank] = t.clone()
            self.barrier.wait()
            out = torch.stack(self.parts)
            self.barrier.wait()  # every rank has read before anyone writes the next round
            return out

        return RankSum(gather, self.n)


def _two_ranks(score: str, decay: float, summed: bool):
    group = ThreadGroup(HKV)
    results: list = [None] * HKV
    errors: list = []

    def rank(r: int) -> None:
        try:
            traj: list = []
            out, store, _ = _stream(
                reuse=True, score=score, decay=decay, kv_heads=slice(r, r + 1),
                rank_sum=group.rank_sum(r) if summed else None, trajectory=traj,
            )
            results[r] = (out, store, traj)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(HKV)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, group


@pytest.mark.parametrize(("score", "decay"), [("attention", 1.0), ("attention", 0.9), ("key-norm", 1.0)])
def test_ranks_summing_scores_keep_what_one_rank_with_every_head_keeps(score, decay):
    ref_traj: list = []
    reference, ref_store, _ = _stream(reuse=True, score=score, decay=decay, trajectory=ref_traj)
    ranks, group = _two_ranks(score, decay, summed=True)
    per_head = HQ // HKV
    for r, (out, store, traj) in enumerate(ranks):
        assert traj == ref_traj, f"rank {r} kept other blocks than one store over every head"
        assert store.block_copies == ref_store.block_copies > 0
        # Same kept blocks; the scores only differ in float summation order.
        torch.testing.assert_close(out, reference[:, r * per_head : (r + 1) * per_head], atol=2e-6, rtol=2e-6)
    assert group.calls[0] == group.calls[1] > 0  # the same collectives on every rank


def test_ranks_scoring_their_own_heads_part():
    """Why the sum is needed: per-rank scores (key norms of one head each) keep different
    blocks on the two ranks of the same stream."""
    ranks, _ = _two_ranks("key-norm", 1.0, summed=False)
    assert ranks[0][2] != ranks[1][2]


def test_rank_sum_is_the_same_bits_on_every_rank_and_absent_without_vllm_groups():
    parts = torch.tensor([[0.1, 1e-8, 3.0], [0.2, 1.0, -3.0]])
    total = RankSum(lambda t: parts, 2)
    torch.testing.assert_close(total(parts[0]), parts[0] + parts[1], atol=0, rtol=0)
    torch.testing.assert_close(total.mean(parts[0]), (parts[0] + parts[1]) / 2, atol=0, rtol=0)
    assert tp_rank_sum() is None  # no vLLM model-parallel group in this process
