"""The policy of the engine being built or run in this process, read from vLLM's config."""

from __future__ import annotations

from typing import Any

from vllm_kvstream.policies import KVPolicy
from vllm_kvstream.quant import KVQuant, pages_from_additional_config, quant_from_additional_config
from vllm_kvstream.settings import policy_from_additional_config

_cache: dict[str, Any] = {"key": None, "policy": None, "quant": None, "pages": "auto"}


def policy_for(additional_config: dict[str, Any] | None) -> KVPolicy | None:
    """Policy described by ``additional_config`` (already validated by the config process;
    parsed again here, cached by value)."""
    _parse(additional_config)
    return _cache["policy"]


def quant_for(additional_config: dict[str, Any] | None) -> KVQuant | None:
    """``--kv-quant`` setting described by ``additional_config`` (cached like the policy)."""
    _parse(additional_config)
    return _cache["quant"]


def _parse(additional_config: dict[str, Any] | None) -> None:
    key = repr(sorted((additional_config or {}).items()))
    if _cache["key"] != key:
        _cache["policy"] = policy_from_additional_config(additional_config)
        _cache["quant"] = quant_from_additional_config(additional_config)
        _cache["pages"] = pages_from_additional_config(additional_config)
        _cache["key"] = key


def pages_for(additional_config: dict[str, Any] | None) -> str:
    """``kv_pages`` setting described by ``additional_config`` (cached like the policy)."""
    _parse(additional_config)
    return _cache["pages"]


#: The engine config this worker process built its model under. vLLM calls some hooks
#: (``AttentionBackend.customize_spec``) outside ``set_current_vllm_config``; they read this.
_engine: dict[str, Any] = {"config": None}


def remember_engine_config(vllm_config: Any) -> None:
    _engine["config"] = vllm_config


def forget_engine_config() -> None:
    _engine["config"] = None


def current_config() -> Any:
    """The vLLM config currently set, else the one this process built its model under."""
    from vllm.config import get_current_vllm_config_or_none

    return get_current_vllm_config_or_none() or _engine["config"]


def active_policy() -> KVPolicy | None:
    """Policy of the current vLLM config (see :func:`current_config`), if any."""
    config = current_config()
    if config is None:
        return None
    return policy_for(config.additional_config)


def active_quant() -> KVQuant | None:
    """``--kv-quant`` setting of the current vLLM config (see :func:`current_config`), if any."""
    config = current_config()
    if config is None:
        return None
    return quant_for(config.additional_config)


def active_pages() -> str:
    """``kv_pages`` setting of the current vLLM config (``"auto"`` without one)."""
    config = current_config()
    if config is None:
        return "auto"
    return pages_for(config.additional_config)
