"""KV-cache policies: pure Python/torch, no vLLM import.

One file per policy; :mod:`.registry` maps names to classes. Importing this package
registers the built-in policies (a registration, not a side effect on anything outside
this package).
"""

from vllm_kvstream.policies import full, sliding_window, streaming_sink, topk_importance  # noqa: F401  (registers)
from vllm_kvstream.policies.base import AttentionPattern, KVPolicy, PolicyConfig
from vllm_kvstream.policies.topk_importance import BlockSelection, TopKImportancePolicy
from vllm_kvstream.policies.registry import (
    available_policies,
    build_policy,
    get_policy_class,
    register_policy,
)

__all__ = [
    "AttentionPattern",
    "BlockSelection",
    "KVPolicy",
    "PolicyConfig",
    "available_policies",
    "build_policy",
    "get_policy_class",
    "register_policy",
    "TopKImportancePolicy",
]
