"""One decision for every tensor-parallel rank: block scores summed over the ranks.

Why: ``topk-importance`` scores a block by the attention mass its layer's heads gave it (or
by its keys' norms), and under tensor parallelism each rank holds only some of the heads.
Scored per rank, the ranks kept different blocks (measured on vLLM 0.32 CPU, TP=2, key-norm
or ``decay`` < 1: the selections parted at the first eviction and the prompt log-probs moved
by up to 12 nats from TP=1), i.e. the model attended to a different context in each head
group — not the policy as specified, and not what TP=1 computes. Now every score is the sum
over the ranks' heads before the selection uses it, so every rank takes the decision TP=1
takes (up to float summation order).

How: ``all_gather`` over vLLM's tensor-parallel group (``get_tp_group()``, the group whose
ranks split the heads of one layer), then each rank sums the parts itself in rank order.
An all-reduce would do the arithmetic, but nothing promises that its result is bit-equal
on every rank; summing the gathered parts in the same order on every rank is, so the ranks
can never break a near-tie differently (which would also desynchronise the collectives that
follow: every rank must call the same ones, in the same order, with the same shapes —
which holds because the calls depend only on the step's metadata and the now-shared
decisions). Pipeline stages hold different layers and score their own; each stage's tensor
group agrees within itself.

Cost: one small collective (a float per kept block and request) per scoring point: per
layer and step for steady decodes (all requests of the step batched), per layer, request
and block-aligned tile for the general path. Nothing at all with one rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class RankSum:
    """``__call__(t)``: ``t`` summed over the ranks of a group (every rank gets the same bits);
    ``world_size`` its ranks."""

    def __init__(self, gather: Callable[[torch.Tensor], torch.Tensor], world_size: int) -> None:
        self._gather = gather  # [*shape] -> [world_size, *shape]
        self.world_size = world_size

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._gather(t.contiguous())
        total = parts[0].clone()
        for r in range(1, parts.shape[0]):
            total += parts[r]
        return total

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of per-rank means over equal head counts: the mean over every head (KV heads
        replicated across ranks are replicated evenly, so the mean is unchanged by it)."""
        return self(t) / self.world_size


def tp_rank_sum() -> RankSum | None:
    """The tensor-parallel group's :class:`RankSum`; None with one rank or where vLLM's model
    parallel groups are not initialised (unit tests, tools)."""
    try:
        from vllm.distributed import parallel_state
    except ImportError:  # pragma: no cover - vLLM is a dependency of the adapter
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_tp_group()
    if group.world_size == 1:
        return None
    return RankSum(lambda t: group.all_gather(t[None], dim=0), group.world_size)
