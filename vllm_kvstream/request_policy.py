"""A policy or a smaller budget per request, within the server's limits (no vLLM import).

A request asks through two fields of ``SamplingParams.extra_args`` (offline) or ``vllm_xargs``
(the OpenAI API, whose values are flat, so the parameters travel as a JSON string there):

* ``kv_policy``: a position policy (``streaming-sink`` or ``sliding-window``);
* ``kv_policy_config``: its parameters (a JSON object, or the JSON text of one), laid over the
  server's: with the server's policy, the server's own parameters; with another one, the
  server's budget spent that policy's way (``params_for_cache``). So ``{"kv_policy_config":
  {"window_tokens": 124}}`` under ``streaming-sink`` 4+252 keeps the 4 sinks and a 124-token
  window, and ``{"kv_policy": "sliding-window"}`` gets a 256-token window.

The limits: the request's policy must hold no more KV blocks than the server's (the bound
start-up sizing and admission used), its window must hold one block, and ``max_stream_tokens``
stays the server's (it is the server's ``max_model_len``; a request bounds itself with
``max_tokens``). A server whose policy selects blocks by score (``topk-importance``), or that
keeps its blocks in the plugin's pages (``--kv-quant``, ``kv_pages=paged16``, off CPU), takes
no per-request policy in this release; a request asking for one is refused, as is any other
``kv_``-prefixed field but vLLM's own ``kv_transfer_params`` (a misspelt one would otherwise be
dropped). Every refusal names the
value and what is allowed; the server answers it with HTTP 400 and keeps serving.

The same resolution runs in every process that needs it (the API server validates, the
scheduler frees, the workers attend), from the raw fields: it is deterministic and cached.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.policies import KVPolicy, available_policies, build_policy, get_policy_class

POLICY_FIELD = "kv_policy"
PARAMS_FIELD = "kv_policy_config"
FIELDS = (POLICY_FIELD, PARAMS_FIELD)
#: ``kv_``-prefixed fields that are vLLM's own (KV connectors), not the plugin's.
VLLM_FIELDS = ("kv_transfer_params",)
#: Policies a request may ask for: positions alone decide what they keep.
REQUEST_POLICIES = ("streaming-sink", "sliding-window")


@dataclass(frozen=True)
class ServerLimits:
    """What a request's policy is checked against: the server's policy and engine shape."""

    policy: KVPolicy
    block_size: int
    #: Tokens computed at once per request at most (a prefill chunk), for the block bound.
    max_query_tokens: int
    trained_context: int | None = None
    #: Why this server takes no per-request policy (``None``: it does).
    unsupported: str | None = None

    @property
    def max_blocks(self) -> int:
        return self.policy.max_blocks_per_request(self.block_size, self.max_query_tokens, 1 << 62)


def _ours(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("kv_") and key not in VLLM_FIELDS


def asks_for_policy(extra_args: Mapping[str, Any] | None) -> bool:
    """Whether ``extra_args`` holds a ``kv_``-prefixed field other than vLLM's own (the plugin's,
    or a misspelling of one)."""
    return bool(extra_args) and any(_ours(k) for k in extra_args)


def request_policy(extra_args: Mapping[str, Any] | None, limits: ServerLimits) -> KVPolicy | None:
    """The policy ``extra_args`` asks for, validated against ``limits``; ``None`` when it asks
    for none (or for exactly the server's). Raises :class:`KVStreamConfigError` naming the bad
    value and the allowed ones."""
    if not asks_for_policy(extra_args):
        return None
    fields = {k: extra_args[k] for k in extra_args if _ours(k)}
    try:
        key = json.dumps(fields, sort_keys=True)
    except (TypeError, ValueError):
        raise KVStreamConfigError(
            f"per-request {', '.join(fields)} must be JSON values; got {fields!r}"
        ) from None
    return _resolve(key, limits)


@lru_cache(maxsize=256)
def _resolve(key: str, limits: ServerLimits) -> KVPolicy | None:
    fields = json.loads(key)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise KVStreamConfigError(
            f"unknown per-request field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(FIELDS)}"
        )
    server = limits.policy.for_block_size(limits.block_size)  # as the engine runs it (engine_args)
    if limits.unsupported is not None:
        asked = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        raise KVStreamConfigError(
            f"per-request {asked} is not supported by this server ({limits.unsupported}); "
            f"allowed: no kv_ fields (the request gets --kv-policy {server.name})"
        )
    name = fields.get(POLICY_FIELD, server.name)
    if not isinstance(name, str) or name not in REQUEST_POLICIES:
        raise KVStreamConfigError(
            f"per-request kv_policy={name!r} is not allowed; allowed: {', '.join(REQUEST_POLICIES)} "
            f"(known policies: {', '.join(available_policies())})"
        )
    params = fields.get(PARAMS_FIELD, {})
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except json.JSONDecodeError as exc:
            raise KVStreamConfigError(f"per-request kv_policy_config must be a JSON object, got {params!r} ({exc.msg})") from None
    if not isinstance(params, dict):
        raise KVStreamConfigError(
            f"per-request kv_policy_config must be a JSON object like '{{\"window_tokens\": 124}}', got {params!r}"
        )
    if "max_stream_tokens" in params:
        raise KVStreamConfigError(
            f"per-request kv_policy_config max_stream_tokens={params['max_stream_tokens']!r} is not allowed: it is "
            "the server's (its max_model_len); a request bounds its length with max_tokens. Allowed keys: "
            f"{', '.join(k for k in get_policy_class(name).config_model.model_fields if k != 'max_stream_tokens')}"
        )
    pat = server.pattern
    if name == server.name:
        base = server.config.model_dump()
    elif pat.window_tokens is not None:
        base = dict(get_policy_class(name).params_for_cache(pat.sink_tokens, pat.window_tokens) or {})
    else:
        base = {}
    if server.max_stream_tokens is not None:
        base["max_stream_tokens"] = server.max_stream_tokens
    policy = build_policy(name, {**base, **params}).for_block_size(limits.block_size)  # align="block" if asked
    if name == server.name and policy.config == server.config:
        return None
    blocks = policy.max_blocks_per_request(limits.block_size, limits.max_query_tokens, 1 << 62)
    if server.bounded and blocks > limits.max_blocks:
        raise KVStreamConfigError(
            f"per-request {policy.describe()} holds up to {blocks} KV blocks per request; this server allows "
            f"{limits.max_blocks} (--kv-policy {server.describe()}); allowed: a sink + window budget of at most "
            f"{_budget(server)} tokens"
        )
    policy.check_engine_fit(block_size=limits.block_size, trained_context=limits.trained_context)
    return policy


def _budget(policy: KVPolicy) -> str:
    pat = policy.pattern
    return "unbounded" if pat.window_tokens is None else str(pat.sink_tokens + pat.window_tokens)


def describe_refusal(exc: KVStreamConfigError) -> str:
    """The message a client sees (HTTP 400)."""
    return f"vllm-kvstream: {exc}"
