"""``full``: keep every token (stock vLLM semantics, through the plugin's attention path).

    tokens:  [0 1 2 3 4 5 6 7 8 9 ... p]
    kept:    [# # # # # # # # # # ### #]   everything; memory grows with the stream

Useful as the baseline beside the bounded policies: same attention code, no eviction.
"""

from __future__ import annotations

from vllm_kvstream.policies.base import AttentionPattern, KVPolicy, PolicyConfig
from vllm_kvstream.policies.registry import register_policy


class FullConfig(PolicyConfig):
    """``full`` takes no parameters."""


@register_policy
class FullPolicy(KVPolicy):
    name = "full"
    config_model = FullConfig
    bounded = False

    @classmethod
    def params_for_cache(cls, sink_tokens: int, window_tokens: int) -> None:
        return None  # keeps everything: no cache size to set

    @property
    def pattern(self) -> AttentionPattern:
        return AttentionPattern(sink_tokens=0, window_tokens=None)
