"""``streaming-sink`` (StreamingLLM, Xiao et al. 2023): the first ``sink_tokens`` tokens
(attention sinks) plus the last ``window_tokens`` tokens.

    tokens:  [0 1 2 3 4 5 6 7 8 9 ... p-W+1 ... p]
    kept:    [# # # # . . . . . . ...   #  ### #]   S sinks + last W tokens
              \\_____/                  \\______/
               sinks       evicted        window

Positions are counted inside the cache: the query at p sees sink i at distance
(S + W - 1) - i once eviction has begun, and window token j at distance p - j, so no
query-key distance ever exceeds S + W - 1 and the model stays inside its trained range.
Blocks strictly between the sink blocks and the window go back to vLLM's pool.
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


class StreamingSinkConfig(PolicyConfig):
    sink_tokens: int = Field(4, gt=0)
    window_tokens: int = Field(1020, gt=0)
    max_stream_tokens: int = Field(DEFAULT_MAX_STREAM_TOKENS, gt=0, le=MAX_STREAM_TOKENS_LIMIT)


@register_policy
class StreamingSinkPolicy(KVPolicy):
    name = "streaming-sink"
    config_model = StreamingSinkConfig

    @classmethod
    def params_for_cache(cls, sink_tokens: int, window_tokens: int) -> dict:
        return {"sink_tokens": sink_tokens, "window_tokens": window_tokens}

    @property
    def pattern(self) -> AttentionPattern:
        return AttentionPattern(
            sink_tokens=self.config.sink_tokens, window_tokens=self.config.window_tokens
        )
