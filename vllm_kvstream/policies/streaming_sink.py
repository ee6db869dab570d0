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

Block alignment (``align``). The sinks' block is held whole, so with ``S`` smaller than a
block its other slots cost memory and, with the window's own unaligned edge, a stream would
hold ``ceil(S/bs) + ceil(W/bs) + 1`` blocks: one more than its budget of ``S + W`` tokens
needs. ``align="block"`` (the default) spends the budget on what the blocks hold:

    budget S + W = 4 + 252, block 64
    token:  [####............................|..|#######]  4 sinks + 252 window: 6 blocks
    block:  [################################|..|#######]  64 sinks + 192 window: 5 blocks
             \__ the sink block, attended whole __/

the sinks become the whole sink blocks, ``S' = ceil(S/bs) * bs``, and the window gives up as
many tokens, ``W' = S + W - S'``, so every query still attends exactly ``S + W`` tokens (all
that the stream holds) and a decoding stream holds ``ceil((S + W)/bs) + 1`` blocks. The engine
resolves it once it knows the block size (:meth:`for_block_size`); ``align="token"`` keeps
``S`` and ``W`` exactly as given (StreamingLLM's four sinks).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.policies.base import (
    DEFAULT_MAX_STREAM_TOKENS,
    cdiv,
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
    align: Literal["block", "token"] = "block"


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

    def for_block_size(self, block_size: int) -> StreamingSinkPolicy:
        """The token-exact policy ``align="block"`` means at ``block_size`` (see the module
        docstring): whole sink blocks, the window shortened by as much; ``self`` for
        ``align="token"``. Raises naming the values when the window would not keep a block."""
        c = self.config
        if c.align == "token":
            return self
        sinks = cdiv(c.sink_tokens, block_size) * block_size
        window = c.sink_tokens + c.window_tokens - sinks
        if window < block_size:
            raise KVStreamConfigError(
                f"policy {self.name!r}: align='block' rounds sink_tokens={c.sink_tokens} up to {sinks} (whole "
                f"blocks of {block_size}), which leaves window_tokens={window} of the budget "
                f"{c.sink_tokens}+{c.window_tokens}; allowed: sink_tokens + window_tokens >= {sinks + block_size}, "
                f"or align='token', or a smaller --block-size."
            )
        return type(self).from_dict({**c.model_dump(), "sink_tokens": sinks, "window_tokens": window, "align": "token"})
