"""Where the policy settings live in vLLM's config, and how they are read (no vLLM import).

The same two keys serve every entry point:

* ``vllm serve MODEL --kv-policy NAME --kv-policy-config JSON`` (flags added by the plugin),
* ``LLM(MODEL, additional_config={"kv_policy": NAME, "kv_policy_config": {...}})``,
* ``vllm serve MODEL --additional-config '{"kv_policy": ...}'``.

The flags are folded into ``additional_config``, which vLLM hands to the API server, the
engine core and every worker. Validation happens once, in the process that builds the
engine config; it writes back the normalized settings (defaults filled in), which the
other processes only read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.policies import KVPolicy, available_policies, build_policy
from vllm_kvstream.quant import QUANT_KEY, additional_config_mapping

POLICY_KEY = "kv_policy"
PARAMS_KEY = "kv_policy_config"


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} is given twice")
        out[key] = value
    return out


def parse_params_json(text: str, flag: str = "--kv-policy-config") -> dict[str, Any]:
    """Parse the JSON object of ``--kv-policy-config`` (or ``flag``)."""
    if not isinstance(text, str):
        raise KVStreamConfigError(f"{flag} must be a JSON object given as text, got {text!r}")
    try:
        value = json.loads(text, object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as exc:
        raise KVStreamConfigError(f"{flag} must be a JSON object, got {text!r} ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # a repeated key, an integer of > 4300 digits, nesting too deep
        raise KVStreamConfigError(f"{flag} must be a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise KVStreamConfigError(f"{flag} must be a JSON object like '{{\"sink_tokens\": 4}}', got {text!r}")
    return value


def policy_from_additional_config(additional_config: Mapping[str, Any] | None) -> KVPolicy | None:
    """The policy ``additional_config`` asks for, validated; ``None`` when none is asked for
    (the plugin is then inert)."""
    additional_config = additional_config_mapping(additional_config)
    if not additional_config:
        return None
    name = additional_config.get(POLICY_KEY)
    params = additional_config.get(PARAMS_KEY)
    if name is None and additional_config.get(QUANT_KEY) is not None:
        name = "full"  # --kv-quant alone: every token kept, each block quantized
    if name is None:
        if params is not None:
            raise KVStreamConfigError(
                f"{PARAMS_KEY}={params!r} was given without {POLICY_KEY}; allowed policies: "
                f"{', '.join(available_policies())}"
            )
        return None
    if isinstance(params, str):
        params = parse_params_json(params)
    if params is not None and not isinstance(params, Mapping):
        raise KVStreamConfigError(
            f"{PARAMS_KEY} must be a mapping of parameter names to values, got {params!r}"
        )
    return build_policy(name, dict(params) if params is not None else None)


def normalized(policy: KVPolicy) -> dict[str, Any]:
    """The ``additional_config`` entries that describe ``policy`` with every default filled."""
    return {POLICY_KEY: policy.name, PARAMS_KEY: policy.config.model_dump()}
