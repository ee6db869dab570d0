"""Scheduler side: a KV cache spec that carries the policy, and a manager that frees the
blocks the policy no longer keeps, back to vLLM's block pool, as the stream proceeds.

Route (no monkeypatch): the attention backend's ``customize_spec`` turns the layer's
``FullAttentionSpec`` into :class:`KVStreamAttentionSpec`; ``KVCacheSpecRegistry`` maps that
spec to :class:`KVStreamManager`, grouped with full attention
(``uniform_type_base_spec=FullAttentionSpec``). Re-mapping ``FullAttentionSpec`` itself is
not possible: engine start re-registers the built-ins and the registry rejects a conflict.

Freeing: vLLM calls ``remove_skipped_blocks(req, processed_tokens)`` before every
allocation, between chunked-prefill chunks too. The base class can only skip a *leading*
range (``get_num_skipped_tokens``); a sink policy frees a middle range, so the manager
overrides ``remove_skipped_blocks`` and frees ``[after the sink blocks, before the next
query's window)`` with ``_remove_blocks_in_range`` (which puts the null block in their
place and stops at the first null, so repeated calls are cheap). Prefix-cache hits are
trimmed the same way right after they are attached, so a long cached prefix does not pin
its middle blocks.

Quantized blocks (``--kv-quant``): the same spec carries the method; its page is the
quantized layout (``kernels/kv_quant.py``, dtype uint8, ``state_content_bytes`` per token and
head), so the block count vLLM derives from the KV memory, and the token capacity it logs
and admits by, grows by the real byte ratio. Unquantized blocks use the same backend with
16-bit pages (``kv_pages``, see ``quant.py``) off CPU, or on CPU when asked: the page then
costs exactly what vLLM's own layout costs (``(K + V) x head size x 2 bytes`` a token).

Sizing: vLLM sizes start-up and admission for ``max_model_len`` tokens per request; this
spec reports the policy's bound instead (``max_memory_usage_bytes``), and the manager caps
admission by the same number, so a pool that holds a few windows serves a 1M-token stream.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar

import torch

from vllm_kvstream.adapter.compat import on_cpu, probe
from vllm_kvstream.adapter.metrics import StreamTracker
from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.kernels import QuantLayout
from vllm_kvstream.policies import KVPolicy, build_policy
from vllm_kvstream.quant import KVQuant, parse_quant
from vllm_kvstream.request_policy import ServerLimits, request_policy

FullAttentionSpec = probe("vllm.v1.kv_cache_interface:FullAttentionSpec")
SlidingWindowSpec = probe("vllm.v1.kv_cache_interface:SlidingWindowSpec")
FullAttentionManager = probe("vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager")
SlidingWindowManager = probe("vllm.v1.core.single_type_kv_cache_manager:SlidingWindowManager")
KVCacheSpecRegistry = probe("vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry")


class _PluginPages:
    """What the plugin's specs share: where their blocks live (the ``kv_quant``,
    ``kv_quant_params`` and ``kv_pages`` fields each declares) and a ``merge`` that keeps the
    plugin's fields, which the layers of one KV cache group must agree on."""

    #: The vLLM spec class this one extends, and the fields it adds to it.
    _vllm_base: ClassVar[type]
    _own_fields: ClassVar[tuple[str, ...]]

    @cached_property
    def quant(self) -> KVQuant | None:
        return parse_quant(self.kv_quant or None, dict(self.kv_quant_params))

    @cached_property
    def quant_layout(self) -> QuantLayout | None:
        """The plugin's page layout (quantized or 16-bit); ``None``: vLLM's own layout."""
        if self.kv_pages:
            return float_page_layout(self.kv_pages, self.head_size, self.block_size)
        return quant_layout(self.quant, self.head_size, self.block_size)

    @classmethod
    def merge(cls, specs: list):
        extra = {tuple(getattr(s, name) for name in cls._own_fields) for s in specs}
        if len(extra) != 1:
            raise ValueError(f"vllm-kvstream: layers of one KV cache group disagree on the policy or pages: {extra}")
        base = cls._vllm_base.merge(specs)
        values = {f.name: getattr(base, f.name) for f in fields(cls._vllm_base)}
        return cls(**values, **dict(zip(cls._own_fields, extra.pop())))


@dataclass(frozen=True, kw_only=True)
class KVStreamAttentionSpec(_PluginPages, FullAttentionSpec):
    """Full-attention page layout plus the policy that decides which blocks are kept."""

    _vllm_base: ClassVar[type] = FullAttentionSpec
    _own_fields: ClassVar[tuple[str, ...]] = (
        "kv_policy", "kv_policy_params", "max_query_tokens", "kv_quant", "kv_quant_params", "kv_pages",
    )

    kv_policy: str = "full"
    kv_policy_params: tuple[tuple[str, Any], ...] = ()
    #: Tokens computed at once per request at most (a prefill chunk), for the block bound.
    max_query_tokens: int = 1
    #: ``--kv-quant`` method ("" when unquantized) and its options.
    kv_quant: str = ""
    kv_quant_params: tuple[tuple[str, Any], ...] = ()
    #: Unquantized blocks in the plugin's 16-bit pages: their float type ("" otherwise).
    kv_pages: str = ""

    @cached_property
    def policy(self) -> KVPolicy:
        return build_policy(self.kv_policy, dict(self.kv_policy_params))

    def max_blocks_per_request(self, max_model_len: int) -> int:
        return self.policy.max_blocks_per_request(self.block_size, self.max_query_tokens, max_model_len)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        if not self.policy.bounded:
            return super().max_memory_usage_bytes(vllm_config)
        return self.max_blocks_per_request(vllm_config.model_config.max_model_len) * self.page_size_bytes


@dataclass(frozen=True, kw_only=True)
class KVStreamSlidingSpec(_PluginPages, SlidingWindowSpec):
    """A model's own sliding-window layers in the plugin's pages (``--kv-quant``, 16-bit pages):
    vLLM's sliding-window semantics and manager (``SlidingWindowManager`` frees what falls out
    of the window), the page of the plugin's layout, so every group of a hybrid model (Gemma-3:
    5 sliding to 1 full layer) has the same page size and the quantized capacity applies to
    all of them."""

    _vllm_base: ClassVar[type] = SlidingWindowSpec
    _own_fields: ClassVar[tuple[str, ...]] = ("kv_quant", "kv_quant_params", "kv_pages")

    kv_quant: str = ""
    kv_quant_params: tuple[tuple[str, Any], ...] = ()
    kv_pages: str = ""


#: Model dtypes the plugin's 16-bit pages store as they are.
PAGE_FLOAT_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def quant_layout(quant: KVQuant | None, head_size: int, block_size: int) -> QuantLayout | None:
    """The page layout of quantized blocks (``None`` unquantized). ``head_bytes`` is padded to
    a multiple of the block size: vLLM views a page as ``[heads, block_size, bytes per token]``."""
    if quant is None:
        return None
    c = quant.config
    try:
        return QuantLayout(
            quant.bits, head_size, block_size,
            sink_tokens=c.sink_tokens, outlier_channels=c.outlier_channels, align=block_size, key_scale=c.key_scale,
            key_zero_point=quant.key_zero_point, value_levels=quant.value_levels,
        )
    except ValueError as exc:
        raise KVStreamConfigError(f"--kv-quant {quant.method} with block size {block_size}, head size {head_size}: {exc}") from None


def float_page_layout(float_dtype: str, head_size: int, block_size: int) -> QuantLayout:
    """16-bit pages: keys (before RoPE) and values as floats of the model's dtype."""
    return QuantLayout(16, head_size, block_size, sink_tokens=0, outlier_channels=0, align=block_size, float_dtype=float_dtype)


def plugin_pages(quant: KVQuant | None, pages: str, cpu: bool) -> bool:
    """Whether a policy's blocks live in the plugin's pages (quantized, or 16-bit) rather than
    vLLM's own layout: always quantized, always off CPU, on CPU when ``kv_pages='paged16'``."""
    return quant is not None or pages == "paged16" or not cpu


def page_layout(
    quant: KVQuant | None, pages: str, head_size: int, block_size: int, dtype: torch.dtype, *, cpu: bool
) -> QuantLayout | None:
    """The plugin's page layout for a layer, ``None`` where vLLM's own layout serves. Raises
    :class:`KVStreamConfigError` naming the bad value (a float32 model cannot keep its
    precision in 16-bit pages; the plugin refuses rather than round silently)."""
    if quant is not None:
        return quant_layout(quant, head_size, block_size)
    if not plugin_pages(quant, pages, cpu):
        return None
    name = PAGE_FLOAT_DTYPES.get(dtype)
    if name is None:
        where = "the unquantized KV layout off CPU" if pages == "auto" else "kv_pages='paged16'"
        raise KVStreamConfigError(
            f"{where} stores 16-bit floats; the model's dtype is {dtype}. Allowed: --dtype "
            f"{' or '.join(PAGE_FLOAT_DTYPES.values())}, or --kv-quant int8|int4"
        )
    return float_page_layout(name, head_size, block_size)


def _paged_values(spec, base, quant: KVQuant | None, pages: str, cpu: bool | None) -> tuple[dict, dict]:
    """A spec's fields (as of ``base``) and the plugin's page fields. In the plugin's pages
    (quantized or 16-bit): dtype uint8, ``state_content_bytes`` = the layout's bytes per token
    per head, so vLLM's page size, and with it the number of blocks a KV budget buys, is the
    real one, metadata counted."""
    values = {f.name: getattr(spec, f.name) for f in fields(base)}
    extra: dict[str, Any] = {}
    layout = page_layout(quant, pages, spec.head_size, spec.block_size, spec.dtype, cpu=on_cpu() if cpu is None else cpu)
    if layout is not None:
        values["dtype"] = torch.uint8
        values["state_content_bytes"] = layout.head_bytes // spec.block_size
        values["page_size_padded"] = None
    if quant is not None:
        extra = {"kv_quant": quant.method, "kv_quant_params": tuple(sorted(quant.config.model_dump().items()))}
    elif layout is not None:
        extra = {"kv_pages": layout.float_dtype}
    return values, extra


def make_sliding_spec(spec, quant: KVQuant | None, pages: str, *, cpu: bool | None = None):
    """A model's sliding-window layer in the plugin's pages (:class:`KVStreamSlidingSpec`), or
    the spec unchanged where its blocks stay in vLLM's own layout."""
    values, extra = _paged_values(spec, SlidingWindowSpec, quant, pages, cpu)
    return KVStreamSlidingSpec(**values, **extra) if extra else spec


def make_spec(
    spec, policy: KVPolicy, max_query_tokens: int, quant: KVQuant | None = None, pages: str = "auto", *, cpu: bool | None = None
) -> KVStreamAttentionSpec:
    """The plugin's spec for a full-attention layer (see :func:`_paged_values` for its page)."""
    values, extra = _paged_values(spec, FullAttentionSpec, quant, pages, cpu)
    return KVStreamAttentionSpec(
        **values,
        kv_policy=policy.name,
        kv_policy_params=tuple(sorted(policy.config.model_dump().items())),
        max_query_tokens=max_query_tokens,
        **extra,
    )


class KVStreamManager(FullAttentionManager):
    """Full-attention bookkeeping (prefix caching, hashing) plus policy-driven freeing."""

    def __init__(self, kv_cache_spec: KVStreamAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.policy = kv_cache_spec.policy
        if self.policy.bounded and self.max_admission_blocks_per_request is None:
            # vLLM passes an admission cap only to its own recycling specs; this spec recycles
            # too, so cap admission by the same bound start-up sizing used.
            self.max_admission_blocks_per_request = kv_cache_spec.max_blocks_per_request(1 << 62)
        self.tracker = StreamTracker()  # the plugin's /metrics (adapter/metrics.py)
        #: Requests that asked for a policy of their own (``request_policy.py``), by request id.
        self.request_policies: dict[str, KVPolicy] = {}
        self._limits = ServerLimits(self.policy, self.block_size, kv_cache_spec.max_query_tokens)

    def bind_request(self, request_id: str, extra_args: dict) -> None:
        """Follow the policy ``extra_args`` asks for (validated by the API server) for this
        request, from its next allocation until its blocks are freed."""
        if request_id in self.request_policies:
            return
        policy = request_policy(extra_args, self._limits)
        if policy is not None:
            self.request_policies[request_id] = policy
            if self.tracker.on:
                self.tracker.request_policy(request_id)

    def _free_outside_policy(self, request_id: str, processed_tokens: int) -> None:
        policy = self.request_policies.get(request_id, self.policy)
        first, last = policy.freeable_block_range(processed_tokens, self.block_size)
        if last > first:
            if self.tracker.on:
                self.tracker.evicted_blocks(request_id, self._live_blocks_in_range(request_id, first, last))
            self._remove_blocks_in_range(request_id, first, last)

    def _live_blocks_in_range(self, request_id: str, first: int, last: int) -> int:
        """Blocks ``_remove_blocks_in_range(first, last)`` is about to free: it walks back from
        ``last`` and stops at the first null."""
        blocks = self.req_to_blocks.get(request_id, ())
        n = 0
        for i in range(min(last, len(blocks)) - 1, first - 1, -1):
            if blocks[i].is_null:
                break
            n += 1
        return n

    def allocate_new_blocks(self, request_id: str, num_tokens: int, *args, **kwargs):
        before = len(self.req_to_blocks.get(request_id, ()))
        new = super().allocate_new_blocks(request_id, num_tokens, *args, **kwargs)
        if self.tracker.on:
            after = len(self.req_to_blocks[request_id])
            self.tracker.allocated(request_id, after, after - before, num_tokens)
        return new

    def pop_blocks_for_free(self, request_id: str):
        # The row's length, read before the pop: vLLM 0.33 returns the blocks without their
        # leading nulls (a sliding window's evicted prefix), 0.32 the whole row.
        row = len(self.req_to_blocks.get(request_id, ()))
        self.request_policies.pop(request_id, None)  # bound again if a preempted request returns
        blocks = super().pop_blocks_for_free(request_id)
        if self.tracker.on:
            self.tracker.freed(request_id, row)
        return blocks

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None) -> None:
        self._free_outside_policy(request_id, processed_computed_tokens)

    def add_local_computed_blocks(self, request_id, new_computed_blocks, num_local_computed_tokens, num_external_computed_tokens) -> None:
        super().add_local_computed_blocks(
            request_id, new_computed_blocks, num_local_computed_tokens, num_external_computed_tokens
        )
        if self.tracker.on:  # a prefix-cache hit: its blocks are held from here
            row = len(self.req_to_blocks[request_id])
            self.tracker.allocated(request_id, row, row, num_local_computed_tokens + num_external_computed_tokens)
        self._free_outside_policy(request_id, num_local_computed_tokens + num_external_computed_tokens)

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        # A policy that selects blocks has the worker rewrite their contents in place, so a
        # block's hash would lie; engine_args turns prefix caching off for it, and this keeps
        # a forced setting from publishing blocks anyway.
        if self.policy.selects_blocks:
            return
        super().cache_blocks(request, num_tokens, *args, **kwargs)

    def held_blocks(self, request_id: str) -> int:
        """Blocks this request holds in the pool (null placeholders excluded)."""
        return sum(not b.is_null for b in self.req_to_blocks.get(request_id, ()))


def register_kv_manager() -> None:
    """Map the spec to the manager (idempotent: the registry accepts an identical repeat)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        KVStreamAttentionSpec, KVStreamManager, uniform_type_base_spec=FullAttentionSpec
    )
    KVCacheSpecRegistry.register(
        KVStreamSlidingSpec, SlidingWindowManager, uniform_type_base_spec=SlidingWindowSpec
    )
