"""Errors raised by vllm-kvstream (no vLLM import)."""


class KVStreamConfigError(ValueError):
    """A policy name or parameter is invalid. The message names the bad value and what is allowed."""
