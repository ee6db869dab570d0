"""``topk-importance`` (H2O, Zhang et al. 2023; LinearKVCache's static score): a fixed budget
of blocks holding the attention sinks, the recent window, and the blocks that scored highest.

    blocks:  [S][.][#][.][.][#][.][#][.][.] ... [r][r][r][r]
    kept:     ^     ^        ^     ^              \\________/
            sinks   important (top score)        recent window
    budget = sink blocks + important blocks + recent blocks  (<= budget_tokens / block_size + 1)

Why blocks, not tokens: a vLLM page holds every head of a layer for ``block_size`` tokens,
and only whole pages go back to the pool. A token-level policy would keep pages alive for one
surviving token each; the budget would bound nothing.

Scores, per layer (each layer keeps its own set; heads are summed, as one page holds them all):

* ``attention`` (H2O): the attention mass each block received, summed over the heads of the
  layer and every query since the block was written; ``decay`` < 1 multiplies the old total
  by ``decay`` per query, so recent mass counts more.
* ``key-norm`` (static, LinearKVCache / Devoto et al. 2024): minus the mean L2 norm of the
  block's keys. Low-norm keys draw the most attention; the score never changes after the
  block is full.

How it runs in vLLM (mechanism in ``vllm_kvstream.adapter``): the scheduler holds a fixed set
of blocks per request, the sink blocks plus a window of ``budget - sink blocks`` tokens, and
frees the window's oldest block as the stream grows, exactly like ``streaming-sink`` does.
Which *content* survives is the worker's business: before the scheduler frees a block whose
content still scores high, the worker copies that content over the content this policy chose
to evict, inside the request's own blocks. The scheduler never needs the scores, so this
works with several processes and tensor parallelism (the workers sum each block's score over
the tensor-parallel ranks' heads, so every rank keeps the same blocks).

This module is the pure policy: which blocks a request holds after ``n`` tokens
(:meth:`held_blocks`), which are protected (:meth:`protected_from`), and which to evict
(:meth:`choose_victims`). :class:`BlockSelection` runs it for one request and one layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.policies.base import (
    DEFAULT_MAX_STREAM_TOKENS,
    MAX_STREAM_TOKENS_LIMIT,
    AttentionPattern,
    KVPolicy,
    PolicyConfig,
    cdiv,
)
from vllm_kvstream.policies.registry import register_policy

SCORES = ("attention", "key-norm")


class TopKImportanceConfig(PolicyConfig):
    budget_tokens: int = Field(1024, gt=0)
    sink_tokens: int = Field(4, gt=0)
    recent_tokens: int = Field(256, gt=0)
    score: Literal["attention", "key-norm"] = "attention"
    decay: float = Field(1.0, gt=0.0, le=1.0)
    max_stream_tokens: int = Field(DEFAULT_MAX_STREAM_TOKENS, gt=0, le=MAX_STREAM_TOKENS_LIMIT)


@register_policy
class TopKImportancePolicy(KVPolicy):
    name = "topk-importance"
    config_model = TopKImportanceConfig
    #: The attention backend keeps a per-request block selection for this policy.
    selects_blocks = True

    @classmethod
    def params_for_cache(cls, sink_tokens: int, window_tokens: int) -> dict:
        """Half of the non-sink budget for the recent window, half for important blocks, as
        H2O splits its budget between heavy hitters and recent tokens."""
        return {
            "budget_tokens": sink_tokens + window_tokens,
            "sink_tokens": sink_tokens,
            "recent_tokens": max(1, window_tokens // 2),
        }

    @property
    def pattern(self) -> AttentionPattern:
        """The widest sink + window the held blocks can cover (memory bound before the block
        size is known); attention itself follows the selection, not this pattern."""
        c = self.config
        return AttentionPattern(sink_tokens=c.sink_tokens, window_tokens=c.budget_tokens - c.sink_tokens)

    # --- block arithmetic (all block-size dependent) ------------------------------------

    def sink_blocks(self, block_size: int) -> int:
        return cdiv(self.config.sink_tokens, block_size)

    def window_tokens(self, block_size: int) -> int:
        """Tokens of the scheduler's window: the budget less the sink blocks, whole."""
        return self.config.budget_tokens - self.sink_blocks(block_size) * block_size

    def memory_pattern(self, block_size: int) -> AttentionPattern:
        """Whole sink blocks plus the window: the base class frees and sizes by it."""
        return AttentionPattern(
            sink_tokens=self.sink_blocks(block_size) * block_size, window_tokens=self.window_tokens(block_size)
        )

    def held_blocks(self, num_processed_tokens: int, block_size: int) -> int:
        """Blocks the scheduler leaves a request once ``num_processed_tokens`` are cached
        (before it allocates room for the next ones): the content this policy may keep."""
        n = num_processed_tokens
        first, last = self.freeable_block_range(n, block_size)
        return cdiv(n, block_size) - (last - first)

    def recent_tokens(self, block_size: int) -> int:
        """The recent window, widened by less than a block so the important blocks fill whole
        blocks: ``window - recent`` a multiple of ``block_size``. Then the number of important
        slots is constant once the stream passes the budget; were it to dip by one block at
        some boundaries, a block evicted at the dip could not come back when it rose again,
        and the kept set would no longer be the TopK of the history (the property tests found
        that counter-example with block 2, recent 1, budget 6)."""
        window = self.window_tokens(block_size)
        return window - ((window - self.config.recent_tokens) // block_size) * block_size

    def important_blocks(self, block_size: int) -> int:
        """Blocks left for the highest scores once the stream is past the budget."""
        return (self.window_tokens(block_size) - self.recent_tokens(block_size)) // block_size

    def protected_from(self, num_processed_tokens: int, block_size: int) -> int:
        """First block of the recent window of the next query (at ``num_processed_tokens``);
        it and every later block are never evicted."""
        return max(0, num_processed_tokens - self.recent_tokens(block_size) + 1) // block_size

    def choose_victims(
        self, kept: Iterable[int], scores: Mapping[int, float], num_processed_tokens: int, block_size: int
    ) -> list[int]:
        """Blocks of ``kept`` to evict so the rest fit :meth:`held_blocks`: lowest score
        first, the older block on a tie. Sink and recent blocks are never chosen."""
        kept = list(kept)
        excess = len(kept) - self.held_blocks(num_processed_tokens, block_size)
        if excess <= 0:
            return []
        lo, hi = self.sink_blocks(block_size), self.protected_from(num_processed_tokens, block_size)
        candidates = sorted((scores.get(b, 0.0), b) for b in kept if lo <= b < hi)
        if len(candidates) < excess:
            raise RuntimeError(
                f"topk-importance: {excess} blocks must go but only {len(candidates)} may "
                f"(n={num_processed_tokens}, block_size={block_size}, {self.describe()})"
            )
        return [b for _, b in candidates[:excess]]

    def attended_ranges(self, query_pos: int) -> tuple[range, ...]:
        raise NotImplementedError(
            "topk-importance: what a query attends to depends on the scores; use BlockSelection"
        )

    def check_engine_fit(self, *, block_size: int, trained_context: int | None) -> None:
        c = self.config
        window = self.window_tokens(block_size)
        if self.important_blocks(block_size) < 1:
            raise KVStreamConfigError(
                f"policy {self.name!r}: budget_tokens={c.budget_tokens} leaves no block for "
                f"important tokens after the sink blocks ({self.sink_blocks(block_size) * block_size} "
                f"tokens at block_size={block_size}) and recent_tokens={c.recent_tokens}; allowed: "
                f"recent_tokens <= {window - block_size} (or a larger budget_tokens)."
            )
        if trained_context is not None and c.budget_tokens > trained_context:
            raise KVStreamConfigError(
                f"policy {self.name!r}: budget_tokens={c.budget_tokens} does not fit the model's "
                f"trained context of {trained_context} tokens; allowed: budget_tokens <= {trained_context}."
            )
        if c.max_stream_tokens < c.budget_tokens:
            raise KVStreamConfigError(
                f"policy {self.name!r}: max_stream_tokens={c.max_stream_tokens} is smaller than "
                f"budget_tokens={c.budget_tokens}; allowed: max_stream_tokens >= {c.budget_tokens}."
            )


@dataclass
class BlockSelection:
    """The content blocks one request keeps in one layer.

    ``kept`` lists logical blocks (block ``b`` holds tokens ``[b * bs, (b + 1) * bs)``) in
    ascending order; ``scores`` their scores. Call :meth:`extend` as tokens are cached,
    :meth:`add_mass` as queries score them, and :meth:`evict` at every point where the
    selection must fit the budget again (the adapter does so at every block boundary)."""

    policy: TopKImportancePolicy
    block_size: int
    kept: list[int] = field(default_factory=list)
    scores: dict[int, float] = field(default_factory=dict)
    num_tokens: int = 0

    def extend(self, num_tokens: int) -> None:
        """Tokens ``[0, num_tokens)`` are now cached: their blocks join the selection."""
        if num_tokens < self.num_tokens:
            raise ValueError(f"stream cannot shrink: {self.num_tokens} -> {num_tokens} tokens")
        first_new = cdiv(self.num_tokens, self.block_size)
        self.kept.extend(range(first_new, cdiv(num_tokens, self.block_size)))
        self.num_tokens = num_tokens

    def add_mass(self, mass: Mapping[int, float], queries: int = 1) -> None:
        """``queries`` queries gave ``mass`` (already weighted by the decay within them);
        older totals decay by ``decay ** queries``."""
        decay = self.policy.config.decay ** queries
        if decay != 1.0:
            for b in self.scores:
                self.scores[b] *= decay
        for b, m in mass.items():
            self.scores[b] = self.scores.get(b, 0.0) + m

    def set_scores(self, scores: Mapping[int, float]) -> None:
        """Static scores (``key-norm``): replace the given blocks' scores."""
        self.scores.update(scores)

    def evict(self, num_processed_tokens: int | None = None) -> list[int]:
        """Drop the blocks the policy evicts once ``num_processed_tokens`` (default: all
        cached) tokens are processed; return them."""
        n = self.num_tokens if num_processed_tokens is None else num_processed_tokens
        victims = self.policy.choose_victims(self.kept, self.scores, n, self.block_size)
        if victims:
            gone = set(victims)
            self.kept = [b for b in self.kept if b not in gone]
            for b in victims:
                self.scores.pop(b, None)
        return victims
