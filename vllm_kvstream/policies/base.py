"""The small base class every KV-cache policy implements.

A policy is pure arithmetic over token positions: given a query position it says which
earlier tokens that query attends to, and given how many tokens a request has processed
it says which cache blocks no future query can need. It never imports vLLM; the adapter
layer (``vllm_kvstream.adapter``) turns these answers into freed blocks and masks.

Token semantics are exact: a query at position ``p`` (0-based) attends to the tokens in
:meth:`KVPolicy.attended_ranges`. Block granularity only decides what memory is *freed*;
masking inside partly used blocks keeps attention token-exact.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from vllm_kvstream.errors import KVStreamConfigError

#: Longest stream a bounded policy accepts by default (vLLM's ``max_model_len`` is raised to
#: this). The worker's block table costs 4 bytes per block per request slot for it.
DEFAULT_MAX_STREAM_TOKENS = 1 << 20
#: Longest stream any bounded policy accepts: vLLM keeps token counts and positions of a
#: request in int32 (larger values end in an overflow inside the engine, not an error here).
MAX_STREAM_TOKENS_LIMIT = (1 << 31) - 1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PolicyConfig(BaseModel):
    """Base of the per-policy pydantic models: unknown keys are errors, values are strict ints."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass(frozen=True)
class AttentionPattern:
    """What every query sees: the first ``sink_tokens`` tokens and the last ``window_tokens``
    tokens up to and including itself (``None``: unbounded, i.e. full causal attention)."""

    sink_tokens: int
    window_tokens: int | None

    def evicted_before(self, query_pos: int) -> int:
        """Tokens between the sinks and the window of ``query_pos`` (never attended again).

        Cache-relative positions (StreamingLLM) shift a query back by this amount when it is
        scored against the sinks, so every query-key distance stays below sink + window.
        """
        if self.window_tokens is None:
            return 0
        return max(0, query_pos - self.window_tokens + 1 - self.sink_tokens)


class KVPolicy(ABC):
    """A KV-cache policy. Subclasses set ``name`` and ``config_model`` and implement the rest."""

    name: ClassVar[str]
    config_model: ClassVar[type[PolicyConfig]]
    #: Whether the policy frees blocks (and so lets a stream run past max_model_len).
    bounded: ClassVar[bool] = True
    #: Whether the kept set depends on scores (attention keeps a per-request selection)
    #: rather than on positions alone.
    selects_blocks: ClassVar[bool] = False

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    @classmethod
    def from_dict(cls, params: dict[str, Any] | None) -> KVPolicy:
        """Validate ``params`` against the policy's model (the only place input is checked)."""
        try:
            config = cls.config_model.model_validate({} if params is None else params)  # [] / 0 / '' are refused
        except ValidationError as exc:
            problems = "; ".join(_describe_error(err) for err in exc.errors())
            allowed = ", ".join(
                f"{k} ({_field_help(f)})" for k, f in cls.config_model.model_fields.items()
            ) or "no parameters"
            raise KVStreamConfigError(
                f"invalid --kv-policy-config for policy {cls.name!r}: {problems}. "
                f"Allowed: {allowed}."
            ) from None
        return cls(config)

    @classmethod
    def params_for_cache(cls, sink_tokens: int, window_tokens: int) -> dict[str, Any] | None:
        """Parameters that give this policy a cache of ``sink_tokens + window_tokens`` tokens,
        the budget evaluations compare policies at (``None``: the policy's memory does not
        depend on a cache size, e.g. ``full``). A new policy states how it spends the budget."""
        raise KVStreamConfigError(
            f"policy {cls.name!r} does not say how to size itself to a cache of "
            f"{sink_tokens}+{window_tokens} tokens (implement params_for_cache)"
        )

    @property
    @abstractmethod
    def pattern(self) -> AttentionPattern:
        """The sink/window pattern attention applies."""

    @property
    def max_stream_tokens(self) -> int | None:
        """Stream length cap the engine is configured with (None: keep vLLM's max_model_len)."""
        return getattr(self.config, "max_stream_tokens", None)

    def attended_ranges(self, query_pos: int) -> tuple[range, ...]:
        """Token positions a query at ``query_pos`` attends to, as disjoint ascending ranges."""
        if query_pos < 0:
            raise ValueError(f"query_pos must be >= 0, got {query_pos}")
        pat = self.pattern
        end = query_pos + 1
        if pat.window_tokens is None:
            return (range(0, end),)
        win_lo = max(0, end - pat.window_tokens)
        sink_hi = min(pat.sink_tokens, end)
        if win_lo <= sink_hi:
            return (range(0, end),)
        if sink_hi == 0:
            return (range(win_lo, end),)
        return (range(0, sink_hi), range(win_lo, end))

    def for_block_size(self, block_size: int) -> KVPolicy:
        """The policy as it runs at ``block_size`` (resolved once, when the engine knows its
        block size): ``self``, unless the policy shapes its pattern to blocks
        (``streaming-sink``'s ``align``)."""
        return self

    def memory_pattern(self, block_size: int) -> AttentionPattern:
        """The sink + window whose blocks the scheduler holds (freeing and sizing follow it):
        :attr:`pattern`, unless a policy's memory is shaped by the block size."""
        return self.pattern

    def freeable_block_range(self, num_processed_tokens: int, block_size: int) -> tuple[int, int]:
        """Blocks ``[first, last)`` that no query at position >= ``num_processed_tokens`` needs.

        A block is freeable when every token in it lies after the sink tokens' blocks and
        before the window of the earliest future query.
        """
        pat = self.memory_pattern(block_size)
        if pat.window_tokens is None:
            return (0, 0)
        first = cdiv(pat.sink_tokens, block_size)
        oldest_needed = max(0, num_processed_tokens - pat.window_tokens + 1)
        last = oldest_needed // block_size
        return (first, max(first, last))

    def max_blocks_per_request(self, block_size: int, max_query_tokens: int, max_len: int) -> int:
        """Most blocks one request holds while ``max_query_tokens`` of its tokens are being
        computed at once (a prefill chunk; 1 during decode), never more than ``max_len`` needs."""
        full = cdiv(max_len, block_size)
        pat = self.memory_pattern(block_size)
        if pat.window_tokens is None:
            return full
        window_blocks = cdiv(pat.window_tokens - 1 + max_query_tokens, block_size) + 1
        return min(full, cdiv(pat.sink_tokens, block_size) + window_blocks)

    def check_engine_fit(self, *, block_size: int, trained_context: int | None) -> None:
        """Reject parameters that cannot work with the engine's block size or the model's
        trained context. Raises :class:`KVStreamConfigError`."""
        pat = self.pattern
        if pat.window_tokens is None:
            return
        if pat.window_tokens < block_size:
            raise KVStreamConfigError(
                f"policy {self.name!r}: window_tokens={pat.window_tokens} is smaller than one KV "
                f"block ({block_size} tokens); allowed: window_tokens >= block_size "
                f"(or lower --block-size)."
            )
        total = pat.sink_tokens + pat.window_tokens
        if trained_context is not None and total > trained_context:
            raise KVStreamConfigError(
                f"policy {self.name!r}: sink_tokens + window_tokens = {total} does not fit the "
                f"model's trained context of {trained_context} tokens; allowed: "
                f"sink_tokens + window_tokens <= {trained_context}."
            )
        cap = self.max_stream_tokens
        if cap is not None and cap < total:
            raise KVStreamConfigError(
                f"policy {self.name!r}: max_stream_tokens={cap} is smaller than sink_tokens + "
                f"window_tokens = {total}; allowed: max_stream_tokens >= {total}."
            )

    def describe(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.config.model_dump().items())
        return f"{self.name}({params})"


def _field_help(field: Any) -> str:
    choices = getattr(field.annotation, "__args__", None)
    if choices and all(isinstance(c, str) for c in choices):
        text = "one of " + ", ".join(repr(c) for c in choices)
        return text if field.is_required() else f"{text}, default {field.default!r}"
    bounds = []
    for meta in field.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{sym} {getattr(meta, attr)}")
    kind = "number" if field.annotation is float else "integer"
    text = " ".join([kind, *bounds])
    if not field.is_required():
        text += f", default {field.default}"
    return text


def _describe_error(err: dict[str, Any]) -> str:
    parts = err.get("loc", ())
    loc = ".".join(str(p) for p in parts) if parts else "(config)"  # a key "" is named '', not (config)
    if err.get("type") == "extra_forbidden":
        return f"unknown parameter {loc!r}"
    if err.get("type") == "invalid_key":  # a Python dict with a key that is no string (JSON has none)
        return f"parameter name {err.get('input')!r} is not a string"
    return f"{loc}={err.get('input')!r}: {err.get('msg')}"
