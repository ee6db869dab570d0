"""``sliding-window``: only the last ``window_tokens`` tokens (the baseline that collapses
once the first tokens leave the window, as StreamingLLM shows).

    tokens:  [0 1 2 3 4 5 6 7 8 9 ... p-W+1 ... p]
    kept:    [. . . . . . . . . . ...   #  ### #]   last W tokens, positions inside the cache

Blocks entirely before the window of the next query go back to vLLM's pool.
"""

from __future__ import annotations

from pydantic import Field

from vllm_kvstream.policies.base import (
    DEFAULT_MAX_STREAM_TOKENS,
    MAX_STREAM_TOKENS_LIMIT,
    AttentionPattern,
    KVPolicy,
    PolicyConfig,
)
from vllm_kvstream.policies.registry import register_policy


class SlidingWindowConfig(PolicyConfig):
    window_tokens: int = Field(1024, gt=0)
    max_stream_tokens: int = Field(DEFAULT_MAX_STREAM_TOKENS, gt=0, le=MAX_STREAM_TOKENS_LIMIT)


@register_policy
class SlidingWindowPolicy(KVPolicy):
    name = "sliding-window"
    config_model = SlidingWindowConfig

    @classmethod
    def params_for_cache(cls, sink_tokens: int, window_tokens: int) -> dict:
        return {"window_tokens": sink_tokens + window_tokens}  # the same budget, all of it window

    @property
    def pattern(self) -> AttentionPattern:
        return AttentionPattern(sink_tokens=0, window_tokens=self.config.window_tokens)
