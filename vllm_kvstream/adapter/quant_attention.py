"""Worker side of the plugin's own pages: an attention backend over quantized pages
(``--kv-quant``) or 16-bit pages (unquantized blocks off CPU, or ``kv_pages='paged16'``), for
every policy: the position patterns (``full``, ``sliding-window``, ``streaming-sink``) here,
and ``topk-importance`` through :class:`QuantSelectionStore`.

It owns its page layout (``kernels/kv_quant.py``: codes, scales, outlier channels and sink
keys of one block and head together, so evicting a block frees its metadata too; a 16-bit
page holds the floats alone), so it writes the cache itself:
``forward_includes_kv_cache_update = True`` and ``forward`` runs store, then attention, with
the positions of the step's tokens from the metadata.

Per step (the metadata builder, once for all layers): each token's absolute position, and per
request the blocks holding tokens some query of the step attends to (sinks + window of the
policy, every block for ``full``), listed once in ``needed``; a compact block table maps each
request's logical blocks into that list. Blocks outside it, among them every evicted block
whose stale id stays in vLLM's append-only worker table, are never dereferenced.

Per layer:

* **store**: the model hands keys rotated at absolute positions; they are rotated back
  (float64 angles, exact at any position) and stored before RoPE, KVQuant-style, into their
  slots (quantized: updating the layer's online statistics,
  :class:`~vllm_kvstream.kernels.QuantStats`).
* **attention**: keys rotated at their cache-relative positions, the query likewise, exactly
  the semantics of the unquantized path (``kernels/sink_attention.py``), through the
  dispatcher ``kernels.quant_sink_window_attention``: on CUDA the Triton kernels
  (``kernels/kv_quant_triton.py``: every one-token request of the step in one decode launch,
  prefill chunks through the prefill kernel), elsewhere torch: the step's one-token requests
  all at once through ``kernels.quant_sink_window_decode_cpu``, from a plan the builder makes
  once per step for every layer (``plan_decode``: the pages to read, the attended slots, the
  position each key is met at), and prefill chunks through the float32 path over the
  dequantized needed blocks (``sink_window_attention``, keys before RoPE).

Tested: the torch path end to end on vLLM 0.32 CPU; the Triton kernels against the
reference under ``TRITON_INTERPRET=1``; the import, registration and spec on vLLM 0.33's
CUDA wheel without a GPU (README, "What was tested where").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import torch

from vllm_kvstream.adapter import trace
from vllm_kvstream.adapter.attention import KVStreamBackend, PolicyImplBase, group_rope
from vllm_kvstream.adapter.compat import on_cpu, probe
from vllm_kvstream.adapter.metrics import QuantWriteMeter
from vllm_kvstream.adapter.kv_manager import KVStreamAttentionSpec, KVStreamSlidingSpec, page_layout
from vllm_kvstream.adapter.selection import SelectionStore, select_requests
from vllm_kvstream.adapter.state import active_pages, active_quant
from vllm_kvstream.kernels import (
    DecodePlan,
    QuantLayout,
    QuantStats,
    RequestSlice,
    plan_decode,
    quant_read_cpu,
    quant_sink_window_attention,
    quant_sink_window_decode_cpu,
    quant_write,
    selected_attention_ref,
    sink_window_attention,
)
from vllm_kvstream.policies import AttentionPattern
from vllm_kvstream.policies.base import cdiv

_backend_mod = probe("vllm.v1.attention.backend")
AttentionMetadataBuilder = _backend_mod.AttentionMetadataBuilder

QUANT_BACKEND_PATH = "vllm_kvstream.adapter.quant_attention.KVStreamQuantBackend"
#: Head sizes the Triton kernels take (``tl.arange`` over half a head needs a power of two).
TRITON_HEAD_SIZES = [32, 64, 128, 256]


class KVStreamQuantBackend(KVStreamBackend):
    forward_includes_kv_cache_update: bool = True
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return KVStreamBackend.get_supported_head_sizes() if on_cpu() else TRITON_HEAD_SIZES

    @staticmethod
    def get_impl_cls():
        return KVStreamQuantImpl

    @staticmethod
    def get_builder_cls():
        return KVStreamQuantBuilder


@dataclass
class QuantStepMetadata:
    num_actual_tokens: int
    positions: torch.Tensor  # [T] absolute position of each query token
    slots: torch.Tensor  # [T] slot of each token (negative: padding, not written)
    requests: list[RequestSlice]  # block_row indexes ``table``
    needed: torch.Tensor  # [m] physical blocks read this step
    table: torch.Tensor  # [R, max logical blocks] index into ``needed`` (0 where not needed)
    #: Block-selecting policies (``topk-importance``): the store and this step's requests.
    store: QuantSelectionStore | None = None
    selection: list | None = None
    #: CPU, keys before RoPE: the step's one-token requests, planned once for every layer
    #: (``kernels.quant_sink_window_decode_cpu``); ``requests`` then holds the chunks alone.
    decode: DecodePlan | None = None
    #: What every layer of the step derives alike, made by the first (``once``).
    workspace: dict = field(default_factory=dict)

    def once(self, name: str, make):
        value = self.workspace.get(name)
        if value is None:
            value = self.workspace[name] = make()
        return value


def token_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Absolute position of every query token of a step (request ``i``'s queries end at
    ``seq_lens[i]``)."""
    qsl = query_start_loc.to(torch.long)
    n_query = qsl[1:] - qsl[:-1]
    firsts = seq_lens.to(torch.long) - n_query
    return torch.repeat_interleave(firsts, n_query) + (
        torch.arange(int(n_query.sum())) - torch.repeat_interleave(qsl[:-1], n_query)
    )


def plan_quant_step(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    pattern: AttentionPattern,
    block_size: int,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[RequestSlice], torch.Tensor, torch.Tensor]:
    """``(positions, requests, needed, table)`` of :class:`QuantStepMetadata` (pure; tested
    against the policy's ``attended_ranges``). ``skip`` ``[R]`` bool: requests whose attention
    is planned elsewhere (the CPU decode plan); they get positions but no blocks here."""
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    S, W = pattern.sink_tokens, pattern.window_tokens
    positions = token_positions(query_start_loc, seq_lens)
    index: dict[int, int] = {}
    width = max((cdiv(L, block_size) for L in lens), default=0)
    table = torch.zeros(len(lens), max(width, 1), dtype=torch.long)
    rows = block_table[:, :width].tolist() if width else [[] for _ in lens]
    requests = []
    for i, L in enumerate(lens):
        first = L - (qsl[i + 1] - qsl[i])
        if qsl[i + 1] == qsl[i] or (skip is not None and bool(skip[i])):
            continue
        n_sink = min(S, L)
        rest_lo = 0 if W is None else max(n_sink, first - W + 1, 0)
        logical = list(range(cdiv(n_sink, block_size))) + list(range(rest_lo // block_size, cdiv(L, block_size)))
        for j in logical:
            phys = int(rows[i][j])
            table[i, j] = index.setdefault(phys, len(index))
        requests.append(RequestSlice(q_start=qsl[i], q_end=qsl[i + 1], seq_len=L, block_row=i))
    needed = torch.tensor(list(index), dtype=torch.long)
    return positions, requests, needed, table


def model_window(sliding_window: int) -> AttentionPattern:
    """A model's own sliding-window layer, vLLM's semantics: the last ``sliding_window`` tokens
    up to the query, no sinks (its builder and its layers read the same pattern)."""
    return AttentionPattern(sink_tokens=0, window_tokens=sliding_window)


class KVStreamQuantBuilder(AttentionMetadataBuilder[QuantStepMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if not isinstance(kv_cache_spec, (KVStreamAttentionSpec, KVStreamSlidingSpec)) or kv_cache_spec.quant_layout is None:
            raise RuntimeError("vllm-kvstream: the paged backend was given a KV spec in vLLM's own layout")
        self.block_size = kv_cache_spec.block_size
        self.store = None
        if isinstance(kv_cache_spec, KVStreamSlidingSpec):
            self.pattern = model_window(kv_cache_spec.sliding_window)
            return
        policy = kv_cache_spec.policy
        self.pattern = policy.pattern
        if policy.selects_blocks:
            self.store = QuantSelectionStore(policy, self.block_size, kv_cache_spec.quant_layout)

    @cached_property
    def rope(self):
        return group_rope(self.vllm_config, self.layer_names)

    @cached_property
    def plans_decode(self) -> bool:
        """Whether one-token requests take the batched CPU decode plan: on CPU (the Triton
        kernels plan their own launch on CUDA), with keys cached before RoPE."""
        quant = active_quant()
        post = quant is not None and quant.config.key_rope == "post"
        return on_cpu() and not post and self.rope is not None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> QuantStepMetadata:
        cm = common_attn_metadata
        n = cm.num_actual_tokens
        if self.store is not None:
            return self._build_selection(cm)
        if trace.ENABLED:  # VLLM_KVSTREAM_TRACE_DIR (adapter/trace.py)
            trace.position_step(self.pattern, self.block_size, cm.query_start_loc_cpu[: cm.num_reqs + 1],
                                cm.seq_lens.cpu()[: cm.num_reqs])
        qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1]
        seq_lens = cm.seq_lens.cpu()[: cm.num_reqs]
        block_table = cm.block_table_tensor[: cm.num_reqs].cpu()
        decode, single = None, None
        if self.plans_decode:
            single = (qsl[1:] - qsl[:-1]) == 1
            if bool(single.any()):
                idx = torch.nonzero(single).flatten()
                decode = plan_decode(
                    qsl[idx], seq_lens[idx], block_table[idx], sink_tokens=self.pattern.sink_tokens,
                    window_tokens=self.pattern.window_tokens, block_size=self.block_size, rope=None, pad_block=None,
                )
        positions, requests, needed, table = plan_quant_step(
            qsl, seq_lens, block_table, self.pattern, self.block_size, skip=single if decode is not None else None,
        )
        device = cm.block_table_tensor.device
        return QuantStepMetadata(
            num_actual_tokens=n,
            positions=positions.to(device),
            slots=cm.slot_mapping[:n].to(torch.long),
            requests=requests,
            needed=needed.to(device),
            table=table.to(device),
            decode=decode,
        )

    def _build_selection(self, cm) -> QuantStepMetadata:
        n = cm.num_actual_tokens
        qsl_t = cm.query_start_loc_cpu[: cm.num_reqs + 1]
        seq_lens = cm.seq_lens.cpu()[: cm.num_reqs]
        requests = select_requests(qsl_t, seq_lens, cm.block_table_tensor.cpu(), self.block_size)
        device = cm.block_table_tensor.device
        empty = torch.zeros(0, dtype=torch.long)
        return QuantStepMetadata(
            num_actual_tokens=n,
            positions=token_positions(qsl_t, seq_lens).to(device),
            slots=cm.slot_mapping[:n].to(torch.long),
            requests=[],
            needed=empty,
            table=empty,
            store=self.store,
            selection=self.store.begin_step(requests),
        )


class QuantSelectionStore(SelectionStore):
    """``topk-importance`` over quantized pages: the selection logic of
    :class:`~vllm_kvstream.adapter.selection.SelectionStore` unchanged, through its layout hooks.

    Per layer and step, the blocks the step's requests hold (the only ones a selection can
    point at) are dequantized once into a small dense cache, their keys rotated at the
    absolute positions of the content they hold (a block may hold another logical block's
    content, moved there); attention and key norms then run the float32 selection reference
    on it. Moving a kept block's content is a copy of its whole page: codes, scales, outlier
    channels and sink keys travel together, and pre-RoPE keys need no re-rotation.
    """

    def __init__(self, policy, block_size: int, layout: QuantLayout) -> None:
        super().__init__(policy, block_size, batch_decode=False)
        self.layout = layout
        self._ids: dict[int, int] = {}
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None

    def run(self, layer_name, query, kv_cache, step, *, scale, rope, out) -> None:
        bs = self.block_size
        phys, logical = [], []
        for req, state in step:
            layer = state.layers.get(layer_name)
            holder = {p: lb for lb, p in layer.moved.items()} if layer is not None else {}
            first, last = self.policy.freeable_block_range(req.first_pos, bs)
            for j in (*range(first), *range(last, cdiv(req.seq_len, bs))):
                p = req.row[j]
                phys.append(p)
                logical.append(holder.get(p, j))
        neox = rope.is_neox_style if rope is not None else True
        k, v = quant_read_cpu(kv_cache, torch.tensor(phys, dtype=torch.long), self.layout, is_neox_style=neox)
        if rope is not None:  # cached keys are pre-RoPE; the selection path wants them at their positions
            m, h, _, d = k.shape
            pos = (torch.tensor(logical)[:, None] * bs + torch.arange(bs)[None, :]).reshape(-1)
            tokens = rope.rotate(k.permute(0, 2, 1, 3).reshape(m * bs, h, d), pos)
            k = tokens.view(m, bs, h, d).permute(0, 2, 1, 3)
        self._ids = {p: i for i, p in enumerate(phys)}
        self._dense = (k, v)
        try:
            super().run(layer_name, query, kv_cache, step, scale=scale, rope=rope, out=out)
        finally:
            self._dense = None

    def _key_view(self, kv_cache: torch.Tensor) -> torch.Tensor:
        return self._dense[0]

    def _read_ids(self, physical: list[int]) -> torch.Tensor:
        return torch.tensor([self._ids[p] for p in physical], dtype=torch.long)

    def _selected_attention(self, query, kv_cache, blocks, logical, **kwargs) -> torch.Tensor:
        return selected_attention_ref(query, self._dense[0], self._dense[1], blocks, logical, **kwargs)


class KVStreamQuantImpl(PolicyImplBase):
    feature = "--kv-quant"
    serves_sliding_window = True

    def _setup(self, kv_cache_dtype: str) -> None:
        self.pattern = model_window(self.sliding_window) if self.sliding_window is not None else self.policy.pattern
        self.quant = active_quant()  # None: 16-bit pages
        layout = page_layout(
            self.quant, active_pages(), self.head_size, self.engine_config.cache_config.block_size,
            self.engine_config.model_config.dtype, cpu=on_cpu(),
        )
        if layout is None:
            raise RuntimeError("vllm-kvstream: the paged backend was built for blocks in vLLM's own layout")
        self.layout: QuantLayout = layout
        self.stats: QuantStats | None = None
        self.meter: QuantWriteMeter | None = None

    def pages(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """vLLM's ``[blocks, heads, block_size, bytes per token]`` view as the layout's
        ``[blocks, heads, head_bytes]`` uint8."""
        nb, h = kv_cache.shape[0], kv_cache.shape[1]
        return kv_cache.view(torch.uint8).reshape(nb, h, self.layout.head_bytes)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vllm-kvstream: fused output quantization is not supported")
        md: QuantStepMetadata | None = attn_metadata
        if md is None:  # profiling / warm-up run
            return output
        n = md.num_actual_tokens
        pages = self.pages(kv_cache)
        if self.stats is None:
            decay = self.quant.config.ema_decay if self.quant is not None else 0.99  # unused by 16-bit pages
            self.stats = QuantStats.empty(self.num_kv_heads, self.head_size, decay, device=pages.device)
        rope = self.rope
        positions = md.positions
        post = self.quant is not None and self.quant.config.key_rope == "post"  # ablation: keys as the model rotated them
        if key is not None and value is not None:
            k = key[:n].view(n, self.num_kv_heads, self.head_size).float()
            if not post:  # back to pre-RoPE: the step's angles computed once, for every layer
                k = rope.apply(k, *md.once("unrotate", lambda: rope.cos_sin(-positions)))
            v = value[:n].view(n, self.num_kv_heads, self.head_size)
            valid = md.once("valid", lambda: md.slots >= 0)
            if not md.once("all_valid", lambda: bool(valid.all())):
                k, v, slots, pos = k[valid], v[valid], md.slots[valid], positions[valid]
            else:
                slots, pos = md.slots, positions
            quant_write(k, v, pages, slots, pos, self.stats, self.layout, is_neox_style=rope.is_neox_style)
            if self.quant is not None:  # the quantization's /metrics (16-bit pages have none)
                if self.meter is None:
                    self.meter = QuantWriteMeter(layer.layer_name)
                self.meter.record(len(slots), self.stats)
        query = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if md.selection is not None:  # the query as the model rotated it (the selection path's contract)
            md.store.run(layer.layer_name, query, pages, md.selection, scale=self.scale, rope=rope, out=out)
            return output
        if md.decode is not None:  # CPU: every one-token request at once, from the step's plan
            quant_sink_window_decode_cpu(query, pages, md.decode, self.layout, scale=self.scale, rope=rope, out=out)
        if not md.requests:
            return output
        if post:  # ablation: keys cached after RoPE (torch reference only)
            k_all, v_all = quant_read_cpu(pages, md.needed, self.layout, is_neox_style=rope.is_neox_style)
            sink_window_attention(
                query, k_all, v_all, md.table, md.requests,
                sink_tokens=self.pattern.sink_tokens, window_tokens=self.pattern.window_tokens,
                scale=self.scale, rope=rope, rope_applied=True, out=out,
            )
            return output
        # Keys cached before RoPE: the query back to unrotated too, both rotated at cache
        # positions. The dispatcher runs the Triton kernel on CUDA, the torch reference here.
        quant_sink_window_attention(
            rope.rotate(query.float(), -positions), pages, md.needed, md.table, md.requests, self.layout,
            sink_tokens=self.pattern.sink_tokens, window_tokens=self.pattern.window_tokens,
            scale=self.scale, rope=rope, out=out,
        )
        return output

    def outlier_rate(self) -> float:
        return 0.0 if self.stats is None else self.stats.outlier_rate()
