"""Worker side: an attention backend that applies the policy's sink + window pattern and reads
only the blocks the policy keeps.

Why a backend of its own: vLLM's worker block tables are append-only. After the scheduler
frees a block, the request's row on the worker still holds the old id, which may already
belong to another request; stock CPU attention would read it. This backend derives the kept
token positions from the policy (a pure function of the sequence length, the same function
the scheduler used to free blocks) and dereferences only those blocks: evicted blocks are
skipped, not masked. It also meets the sinks at StreamingLLM's cache-relative distance
(keys are cached rotated at absolute positions, see ``rope.py``).

Mechanism: the cache layout, the cache writes and, while nothing is evicted, attention itself
are vLLM's own CPU backend (``CPU_ATTN``), composed, not copied: a step in which no request
has passed sink + window (every short stream; ``full`` always) runs the stock C++ kernel
unchanged, so the plugin costs short streams nothing. A step with an evicting request reads
its one-token (decode) requests *directly* where the cache is float32 or bfloat16 and the
compiled helpers are built (``kernels/sink_direct.py``: one compiled pass per layer over each
request's sink and window slots where they lie, the query rotated back for the sinks; nothing
gathered, nothing written, prefix caching or not; planned once per step). Otherwise
(float16, no compiler, logit soft-capping, ``VLLM_KVSTREAM_DIRECT_DECODE=0``) it reads them
*in place* with the same C++ kernel where the layout allows
(``kernels/sink_in_place.py``: the sinks' rotated copies staged in the window's dead and free
slots, the window's blocks as the block table, a sliding window of S + W tokens; dead slots of
a window's first block are written only with prefix caching off, where no block is shared),
the others through ``kernels.sink_window_decode`` (one gather of their kept blocks), both
from plans built once per step by the metadata builder (the blocks to read and the attended
slots do not depend on the layer), and its prefill chunks through ``kernels.sink_prefill``. Both read the stock
layout through ``kernels.split_cpu_kv_cache``. A policy that selects blocks by score
(``topk-importance``) runs its steps through ``adapter.selection.SelectionStore``, which
keeps each request's selection per layer and copies kept content out of blocks about to be
freed (its docstring argues the design); a step of steady decodes that have evicted nothing
yet runs the stock kernel, the store only recording the queries it scores later. The stock builder picks a kernel ISA per
machine; this backend pins it to ``vec``/``vec16``, whose layout (keys transposed per block
and head) is the one those readers know (``amx`` packs bf16 keys into tiles instead).

This backend is the CPU one: it composes vLLM's CPU kernels, which CUDA builds of vLLM do
not ship. Everywhere else, and on CPU with ``--kv-quant`` or ``kv_pages='paged16'``, a policy
runs ``quant_attention.KVStreamQuantBackend`` over the plugin's own pages (quantized, or
16-bit floats), whose attention is the Triton kernels on CUDA.

How it is selected (monkeypatch, written down): on CPU the platform always answers
``CPU_ATTN``. :func:`route_backend` wraps the platform's ``get_attn_backend_cls`` so that,
while the config being served names a policy, decoder attention resolves to
:class:`KVStreamBackend`, or ``quant_attention.KVStreamQuantBackend`` where the blocks live
in the plugin's pages (``kv_manager.plugin_pages``); with no policy the wrapper returns the
platform's answer untouched. A model's own sliding-window layers (Mistral, Gemma-2/3) keep
vLLM's semantics: the platform's backend where blocks stay in vLLM's layout, the paged backend
(reading just the window) where they live in the plugin's pages, so one model has one page size. The same wrapper serves the CUDA platform (vLLM 0.33), whose
choice it overrides the same way (the selector still validates the class it is handed).
Upstream change that would remove it: a platform honouring a backend chosen per KV-cache
spec kind by plugins (``attention_config.backend_per_kind`` exists but the CPU platform
ignores the selected backend).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import torch

from vllm_kvstream.adapter import trace
from vllm_kvstream.adapter.compat import on_cpu, probe
from vllm_kvstream.adapter.kv_manager import KVStreamAttentionSpec, make_sliding_spec, make_spec, plugin_pages
from vllm_kvstream.adapter.request_policy import row_patterns
from vllm_kvstream.adapter.rope import rope_of_building_layer
from vllm_kvstream.adapter.selection import SelectionStore, select_requests
from vllm_kvstream.adapter.state import (
    active_pages,
    active_policy,
    active_quant,
    current_config,
    policy_for,
    remember_engine_config,
)
from vllm_kvstream.kernels.sink_direct import DirectPlan, can_read_direct, plan_direct, sink_direct_decode
from vllm_kvstream.kernels.sink_in_place import InPlacePlan, plan_in_place, stage_sinks_
from vllm_kvstream.kernels import (
    DecodePlan,
    RequestSlice,
    Rope,
    cpu_ext,
    plan_decode,
    sink_window_attention,
    sink_window_decode,
    split_cpu_kv_cache,
)
from vllm_kvstream.policies import AttentionPattern, KVPolicy

_backend_mod = probe("vllm.v1.attention.backend")
AttentionBackend = _backend_mod.AttentionBackend
AttentionImpl = _backend_mod.AttentionImpl
AttentionMetadataBuilder = _backend_mod.AttentionMetadataBuilder
AttentionType = _backend_mod.AttentionType
MultipleOf = _backend_mod.MultipleOf
FullAttentionSpec = probe("vllm.v1.kv_cache_interface:FullAttentionSpec")
SlidingWindowSpec = probe("vllm.v1.kv_cache_interface:SlidingWindowSpec")
_cpu_attn = probe("vllm.v1.attention.backends.cpu_attn")
StockBackend = _cpu_attn.CPUAttentionBackend
StockBuilder = _cpu_attn.CPUAttentionMetadataBuilder
StockImpl = _cpu_attn.CPUAttentionBackendImpl
_cpu_ops = probe("vllm._custom_ops")
_envs = probe("vllm.envs")
#: ``VLLM_KVSTREAM_IN_PLACE_DECODE=0`` in the engine's environment: every decode past eviction
#: gathers its blocks (``kernels/sink_decode.py``) instead of being read in place by the stock
#: kernel where the layout allows (``kernels/sink_in_place.py``). For comparisons and bisecting.
IN_PLACE_ENV = "VLLM_KVSTREAM_IN_PLACE_DECODE"
#: ``VLLM_KVSTREAM_DIRECT_DECODE=0``: decodes past eviction skip the compiled direct read
#: (``kernels/sink_direct.py``) and take the in-place or gathering paths. For comparisons.
DIRECT_ENV = "VLLM_KVSTREAM_DIRECT_DECODE"
#: Stock CPU kernel ISAs whose cache layout ``split_cpu_kv_cache`` describes.
LAYOUT_ISAS = ("vec", "vec16")
KVCacheLayout = probe("vllm.v1.kv_cache_interface:KVCacheLayout")

BACKEND_PATH = "vllm_kvstream.adapter.attention.KVStreamBackend"
#: ``--kv-quant``: the backend over quantized pages (``quant_attention.py``).
QUANT_BACKEND_PATH = "vllm_kvstream.adapter.quant_attention.KVStreamQuantBackend"


def _max_query_tokens() -> int:
    config = current_config()
    if config is None:
        raise RuntimeError("vllm-kvstream: customize_spec called before any vLLM config was set")
    return int(config.max_in_flight_tokens)


class KVStreamBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(16)]  # vec16 serves multiples of 16, vec multiples of 32

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return StockBackend.get_supported_head_sizes()

    @classmethod
    def supported_kv_cache_layouts(cls):
        return (KVCacheLayout.LBHNC,)

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # a name vLLM's backend enum knows; CUSTOM is the slot for out-of-tree backends

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls():
        return KVStreamImpl

    @staticmethod
    def get_builder_cls():
        return KVStreamMetadataBuilder

    @classmethod
    def customize_spec(cls, spec):
        policy = active_policy()
        if policy is None or spec.block_size == 1:  # block size 1: per-token page-size probes by the platform
            return spec
        if type(spec) is SlidingWindowSpec:  # a model's own sliding layer routed here: the plugin's pages
            return make_sliding_spec(spec, active_quant(), active_pages())
        if type(spec) is not FullAttentionSpec:
            return spec
        return make_spec(spec, policy, _max_query_tokens(), active_quant(), active_pages())


@dataclass
class KVStreamMetadata:
    num_actual_tokens: int
    stock: object | None  # the stock CPU metadata when no request of the step evicts
    requests: list[RequestSlice]  # requests with several query tokens (prefill chunks)
    #: Requests with one query token, planned once for all layers: read directly by the
    #: compiled pass (``DirectPlan``) where it serves the cache, else gathered (``DecodePlan``).
    decode: DecodePlan | DirectPlan | None
    block_table: torch.Tensor
    #: One-token requests read in place by the stock kernel (``kernels/sink_in_place.py``);
    #: ``decode`` then holds the others.
    in_place: InPlacePlan | None = None
    #: Block-selecting policies: the store and this step's requests bound to their selections.
    store: SelectionStore | None = None
    selection: list | None = None
    #: The pattern ``requests`` and ``decode`` follow (the server's, unless only requests with a
    #: policy of their own evict), and ``(pattern, requests, decode, in_place)`` of the step's
    #: other patterns.
    pattern: AttentionPattern | None = None
    others: list = field(default_factory=list)


class KVStreamMetadataBuilder(AttentionMetadataBuilder[KVStreamMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if not on_cpu():
            raise RuntimeError(
                "vllm-kvstream: the stock-layout backend composes vLLM's CPU kernels and runs on CPU only; "
                "off CPU a policy runs over the plugin's pages (route_backend chooses it)"
            )
        self.block_size = kv_cache_spec.block_size
        policy = kv_cache_spec.policy if isinstance(kv_cache_spec, KVStreamAttentionSpec) else active_policy()
        self.pattern = policy.pattern
        self.store = SelectionStore(policy, self.block_size) if policy.selects_blocks else None
        self.stock = StockBuilder(kv_cache_spec, layer_names, vllm_config, device)
        flag = os.environ.get(IN_PLACE_ENV, "1")
        if flag not in ("0", "1"):
            raise ValueError(f"vllm-kvstream: {IN_PLACE_ENV}={flag!r}; allowed: '1' (default) or '0'")
        self.in_place_on = flag == "1"
        direct = os.environ.get(DIRECT_ENV, "1")
        if direct not in ("0", "1"):
            raise ValueError(f"vllm-kvstream: {DIRECT_ENV}={direct!r}; allowed: '1' (default) or '0'")
        # The compiled read serves float32/bfloat16 caches without soft-capping (checked per
        # group, once the layers exist: see direct_on).
        self._direct_wanted = direct == "1" and can_read_direct(kv_cache_spec.dtype)
        self._staged: dict = {}  # per pattern: the last step's staged case-B requests (plan_in_place)
        if self.in_place_on:
            cpu_ext.library()  # build the sink-staging helper now, not in a decode step (None: torch)
        if self.stock.isa not in LAYOUT_ISAS:  # pin the layout the readers know (module docstring)
            self.stock.isa = "vec" if self.block_size % 32 == 0 else "vec16"
            self.stock._set_isa_to_layers(layer_names)

    @cached_property
    def rope(self) -> Rope:
        return group_rope(self.vllm_config, self.layer_names)  # looked up once, not per step

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> KVStreamMetadata:
        cm = common_attn_metadata
        pattern = self.pattern
        seq_lens = cm.seq_lens.cpu()[: cm.num_reqs]
        if self.store is not None:
            return self._build_selection(common_prefix_len, cm, seq_lens, fast_build)
        if trace.ENABLED:  # VLLM_KVSTREAM_TRACE_DIR (adapter/trace.py)
            trace.position_step(pattern, self.block_size, cm.query_start_loc_cpu[: cm.num_reqs + 1], seq_lens)
        # A query at p attends to a non-prefix set iff p >= S + W, i.e. seq_len > S + W.
        own = row_patterns()  # requests that asked for a policy of their own (adapter/request_policy.py)
        if own is None:
            groups = {pattern: None}
            evicting = pattern.window_tokens is not None and bool((seq_lens > pattern.sink_tokens + pattern.window_tokens).any())
        else:
            per_row = [(own[i] if i < len(own) else None) or pattern for i in range(cm.num_reqs)]
            groups = {}
            for i, pat in enumerate(per_row):
                groups.setdefault(pat, []).append(i)
            limit = torch.tensor([p.sink_tokens + p.window_tokens if p.window_tokens is not None else 1 << 62 for p in per_row])
            evicting = bool((seq_lens > limit).any())
        if not evicting:
            return KVStreamMetadata(
                num_actual_tokens=cm.num_actual_tokens,
                stock=self.stock.build(common_prefix_len, cm, fast_build),
                requests=[],
                decode=None,
                block_table=cm.block_table_tensor,
            )
        qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1]
        single = (qsl[1:] - qsl[:-1]) == 1
        planned = [self._plan_rows(pat, rows, qsl, single, seq_lens, cm.block_table_tensor) for pat, rows in groups.items()]
        (_, requests, decode, in_place), others = planned[0], planned[1:]
        return KVStreamMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            stock=None,
            requests=requests,
            decode=decode,
            block_table=cm.block_table_tensor,
            in_place=in_place,
            pattern=planned[0][0],
            others=others,
        )

    @cached_property
    def direct_on(self) -> bool:
        """Whether this group's decodes past eviction take the compiled direct read
        (``kernels/sink_direct.py``): wanted, and no layer soft-caps its logits (the pass
        does not)."""
        return self._direct_wanted and not group_softcap(self.vllm_config, self.layer_names)

    @cached_property
    def private_blocks(self) -> bool:
        """Whether no block is ever shared between requests (prefix caching off): the in-place
        decode may then write sink copies into the dead slots of a window's first block."""
        return not bool(getattr(self.vllm_config.cache_config, "enable_prefix_caching", True))

    def _in_place_plan(self, pattern, rows, seq_lens, tables) -> InPlacePlan | None:
        """Plan the decodes the stock kernel can read in place (``kernels/sink_in_place.py``),
        with the kernel's scheduler metadata, shared by every layer of the step."""
        if not self.in_place_on or pattern.window_tokens is None:
            return None
        plan = plan_in_place(
            rows, seq_lens, tables, sink_tokens=pattern.sink_tokens, window_tokens=pattern.window_tokens,
            block_size=self.block_size, rope=self.rope if pattern.sink_tokens else None,
            private_blocks=self.private_blocks, previous=self._staged.get(pattern),
        )
        self._staged[pattern] = plan.staged  # which value copies stay in place for the next step
        if len(plan.rows) == 0:
            return plan
        stock = self.stock
        return in_place_metadata(plan, num_heads=stock.num_heads, num_kv_heads=stock.num_kv_heads,
                                 head_dim=stock.head_dim, dtype=stock.dtype, isa=stock.isa,
                                 kv_cache_dtype=stock.kv_cache_dtype)

    def _plan_rows(self, pattern, rows, qsl, single, seq_lens, block_table):
        """``(pattern, prefill slices, gathering decode plan, in-place decode plan)`` of the batch
        rows ``rows`` (``None``: all) that follow ``pattern``."""
        in_group = torch.ones_like(single) if rows is None else torch.zeros_like(single).index_fill_(0, torch.tensor(rows), True)
        requests = [
            RequestSlice(q_start=int(qsl[i]), q_end=int(qsl[i + 1]), seq_len=int(seq_lens[i]), block_row=i)
            for i in torch.nonzero(~single & in_group).flatten().tolist()
        ]
        decode = in_place = None
        idx = torch.nonzero(single & in_group).flatten()
        tables = block_table[idx].cpu()
        served = idx[:0]
        if len(idx) and self.direct_on:  # every one-token request, evicting or not, in one call
            decode = plan_direct(qsl[idx], seq_lens[idx], tables, sink_tokens=pattern.sink_tokens,
                                 window_tokens=pattern.window_tokens, block_size=self.block_size, rope=self.rope)
            if trace.ENABLED:
                trace.decode_step(pattern, [], [], seq_lens[idx].tolist())
            return pattern, requests, decode, None
        if len(idx):
            in_place = self._in_place_plan(pattern, qsl[idx], seq_lens[idx], tables)
            if in_place is not None:  # the requests it cannot lay out go to the gathering path
                keep = torch.ones(len(idx), dtype=torch.bool).index_fill_(0, in_place.rest, False)
                served = idx[keep]
                idx, tables = idx[in_place.rest], tables[in_place.rest]
                if len(in_place.rows) == 0:
                    in_place = None
        if len(idx):
            decode = plan_decode(
                qsl[idx],
                seq_lens[idx],
                tables,
                sink_tokens=pattern.sink_tokens,
                window_tokens=pattern.window_tokens,
                block_size=self.block_size,
                rope=self.rope,
            )
        if trace.ENABLED and len(served) + len(idx):
            trace.decode_step(pattern, seq_lens[served].tolist(), seq_lens[idx].tolist())
        return pattern, requests, decode, in_place

    def _build_selection(self, common_prefix_len, cm, seq_lens: torch.Tensor, fast_build: bool) -> KVStreamMetadata:
        """Every step of a block-selecting policy runs the selection path: scores accrue from
        the first query on (H2O counts them all). A step of steady decodes that have evicted
        nothing yet reads its blocks in place, with the stock kernel, and the store only
        records the queries to score (``SelectionStore.reads_in_place``)."""
        requests = select_requests(
            cm.query_start_loc_cpu[: cm.num_reqs + 1], seq_lens, cm.block_table_tensor.cpu(), self.block_size
        )
        selection = self.store.begin_step(requests)
        in_place = self.store.reads_in_place(selection)
        return KVStreamMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            stock=self.stock.build(common_prefix_len, cm, fast_build) if in_place else None,
            requests=[],
            decode=None,
            block_table=cm.block_table_tensor,
            store=self.store,
            selection=selection,
        )


class PolicyImplBase(AttentionImpl):
    """What the plugin's attention implementations share: the features they refuse (named in
    one error), the head geometry, the policy and the model's RoPE. ``_setup`` adds the rest."""

    #: How the error names this implementation.
    feature: ClassVar[str] = "KV policies"
    #: Whether it serves a model's own sliding-window layers (vLLM's window semantics).
    serves_sliding_window: ClassVar[bool] = False
    #: Whether it serves attention logit soft-capping (Gemma-2), for position-pattern policies.
    serves_softcap: ClassVar[bool] = False

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **kwargs,
    ) -> None:
        policy = active_policy()
        if policy is None:
            raise RuntimeError("vllm-kvstream: attention backend built without a KV policy in the config")
        softcap_served = self.serves_softcap and not policy.selects_blocks
        unsupported = {
            "alibi_slopes": alibi_slopes is not None,
            "sliding_window (model-defined)": sliding_window is not None and not self.serves_sliding_window,
            "logits_soft_cap": bool(logits_soft_cap) and not softcap_served,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name is not None,
            "learned attention sinks": sinks is not None,
            f"kv_cache_dtype={kv_cache_dtype!r}": kv_cache_dtype != "auto",
        }
        bad = [name for name, present in unsupported.items() if present]
        if bad:
            raise NotImplementedError(
                f"vllm-kvstream: {self.feature} do not support {', '.join(bad)} yet (--kv-policy {policy.name}); "
                "supported: decoder attention with a fixed-rotation RoPE and kv_cache_dtype='auto', logit "
                "soft-capping with the position policies in vLLM's own layout (no --kv-quant, kv_pages=auto, CPU)."
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        from vllm.config import get_current_vllm_config_or_none

        self.engine_config = get_current_vllm_config_or_none()
        remember_engine_config(self.engine_config)
        self.policy: KVPolicy = policy
        self._rope: Rope = rope_of_building_layer()  # this layer's own rotary op (rope.py)
        self._setup(kv_cache_dtype)

    def _setup(self, kv_cache_dtype: str) -> None:
        """Implementation-specific state (called at the end of ``__init__``)."""

    @property
    def rope(self) -> Rope:
        return self._rope


def group_rope(vllm_config, layer_names) -> Rope:
    """The RoPE the layers of one KV cache group share (a metadata builder plans once for all
    of them). Raises if they differ: vLLM groups layers by KV spec, and a model whose layers of
    one spec use different rotary ops needs a plan per layer, which the plugin does not make."""
    layers = probe("vllm.model_executor.layers.attention_layer_base:AttentionLayerBase")
    found = probe("vllm.config:get_layers_from_vllm_config")(vllm_config, layers, layer_names)
    ropes = {id(layer.impl.rope): layer.impl.rope for layer in found.values() if isinstance(layer.impl, PolicyImplBase)}
    if len(ropes) != 1:
        raise RuntimeError(
            f"vllm-kvstream: the layers {sorted(layer_names)} of one KV cache group use {len(ropes)} "
            "different rotary embeddings; a group needs exactly one"
        )
    return next(iter(ropes.values()))


def group_softcap(vllm_config, layer_names) -> bool:
    """Whether any layer of the group soft-caps its attention logits (Gemma-2)."""
    layers = probe("vllm.model_executor.layers.attention_layer_base:AttentionLayerBase")
    found = probe("vllm.config:get_layers_from_vllm_config")(vllm_config, layers, layer_names)
    return any(getattr(layer.impl, "logits_soft_cap", None) for layer in found.values())


class KVStreamImpl(PolicyImplBase):
    serves_softcap = True

    def _setup(self, kv_cache_dtype: str) -> None:
        n, d = self.num_heads, self.head_size
        self.stock = StockImpl(
            n, d, self.scale, self.num_kv_heads, None, None, kv_cache_dtype, self.logits_soft_cap, self.attn_type
        )

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        self.stock.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vllm-kvstream: fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        n = attn_metadata.num_actual_tokens
        if attn_metadata.stock is not None:
            self.stock.forward(layer, query, key, value, kv_cache, attn_metadata.stock, output)
            if attn_metadata.selection is not None:  # a selecting policy still inside its budget
                attn_metadata.store.record(
                    layer.layer_name, query[:n].view(n, self.num_heads, self.head_size), kv_cache,
                    attn_metadata.selection, scale=self.scale, rope=self.rope,
                )
            return output
        query = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if attn_metadata.selection is not None:
            attn_metadata.store.run(
                layer.layer_name, query, kv_cache, attn_metadata.selection, scale=self.scale, rope=self.rope, out=out
            )
            return output
        groups = [(attn_metadata.pattern or self.policy.pattern, attn_metadata.requests, attn_metadata.decode,
                   attn_metadata.in_place)]
        for pattern, requests, decode, in_place in groups + attn_metadata.others:
            if in_place is not None:
                self._in_place_decode(layer, query, kv_cache, in_place, out)
            if isinstance(decode, DirectPlan):
                sink_direct_decode(query, kv_cache, decode, scale=self.scale, out=out)
            elif decode is not None:
                sink_window_decode(
                    query, kv_cache, decode, scale=self.scale, rope=self.rope, out=out, softcap=self.logits_soft_cap,
                )
            if requests:
                key_cache, value_cache = split_cpu_kv_cache(kv_cache)
                sink_window_attention(
                    query,
                    key_cache,
                    value_cache,
                    attn_metadata.block_table,
                    requests,
                    sink_tokens=pattern.sink_tokens,
                    window_tokens=pattern.window_tokens,
                    scale=self.scale,
                    rope=self.rope,
                    rope_applied=True,
                    out=out,
                    softcap=self.logits_soft_cap,
                )
        return output


    def _in_place_decode(self, layer, query, kv_cache, plan: InPlacePlan, out) -> None:
        in_place_decode(query, kv_cache, plan, scale=self.scale, rope=self.rope, out=out, isa=layer.isa,
                        softcap=self.logits_soft_cap, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float)


def in_place_metadata(plan: InPlacePlan, *, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      isa: str, kv_cache_dtype: str = "auto") -> InPlacePlan:
    """``plan`` with the stock kernel's scheduler metadata (once per step, every layer reads it)."""
    return dataclasses.replace(plan, metadata=_cpu_ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(plan.rows),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        seq_lens=plan.seq_lens,
        dtype=dtype,
        query_start_loc=plan.query_start_loc,
        causal=True,
        sliding_window_size=plan.window,
        isa=isa,
        enable_kv_split=bool(_envs.VLLM_CPU_ATTN_SPLIT_KV),
        kv_cache_dtype=kv_cache_dtype,
    ))


def in_place_decode(query, kv_cache, plan: InPlacePlan, *, scale: float, rope, out, isa: str, softcap=None,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """The stock C++ kernel over the plan's layout (``kernels/sink_in_place.py``): the sink
    copies staged in the window's dead and free slots, then one call for all the plan's
    requests; writes rows ``plan.rows`` of ``out`` ``[T, heads, D]``."""
    num_blocks, kv_heads, block_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, kv_heads, 2 * block_size, -1).chunk(2, dim=2)

    def write(k, v, slots):  # vLLM's cache writer: the layout it reads
        _cpu_ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa, k_scale=k_scale, v_scale=v_scale)

    stage_sinks_(kv_cache, plan, rope, write)
    q = query.index_select(0, plan.rows)
    o = torch.empty_like(q)
    _cpu_ops.cpu_attention_with_kv_cache(
        query=q,
        key_cache=key_cache,
        value_cache=value_cache,
        output=o,
        query_start_loc=plan.query_start_loc,
        seq_lens=plan.seq_lens,
        scale=scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=plan.window,
        block_table=plan.block_table,
        softcap=softcap or 0.0,
        scheduler_metadata=plan.metadata,
        s_aux=None,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    out.index_copy_(0, plan.rows, o.to(out.dtype))


def route_backend() -> None:
    """Wrap the platform's backend choice (see module docstring). Idempotent."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls
    if getattr(original, "__kvstream_wrapped__", False):
        return
    original_func = original.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        path = original_func(cls, selected_backend, attn_selector_config, *args, **kwargs)
        if (
            active_policy() is not None
            and not attn_selector_config.use_mla
            and attn_selector_config.attn_type == AttentionType.DECODER
        ):
            paged = plugin_pages(active_quant(), active_pages(), on_cpu())
            if attn_selector_config.has_sliding_window:
                # A model's own sliding-window layers keep vLLM's semantics (SlidingWindowSpec,
                # vLLM already bounds them): the platform's backend where blocks stay in vLLM's
                # layout, else the paged backend reading just the window (one page size for
                # every group, quantized capacity for all).
                return QUANT_BACKEND_PATH if paged else path
            return QUANT_BACKEND_PATH if paged else BACKEND_PATH
        return path

    get_attn_backend_cls.__kvstream_wrapped__ = True
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def clear_backend_cache() -> None:
    """vLLM caches backend choices per process without the policy in the key; a process that
    builds a second engine (tests, notebooks) must not inherit the first one's choice."""
    selector = probe("vllm.v1.attention.selector")
    cached = getattr(selector, "_cached_get_attn_backend", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()


__all__ = ["BACKEND_PATH", "KVStreamAttentionSpec", "KVStreamBackend", "policy_for", "route_backend"]
