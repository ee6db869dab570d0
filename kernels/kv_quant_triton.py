"""Triton kernels for quantized KV pages (layout and oracle: ``kv_quant.py``).

* :func:`quant_store` quantizes and stores a batch of tokens: one program per (written
  block, KV head) owns that page slice, so growing a block's channel scales and re-encoding its
  earlier tokens needs no atomics.
* :func:`quant_prefill_attention` runs a prefill chunk of one request with the sink + window
  pattern (tiles of queries x heads per program, the same dequantization, RoPE at
  cache-relative positions, only the listed blocks read).
* :func:`quant_decode_attention` runs one query per request over its quantized blocks:
  dequantize on the fly (main codes + outlier channels + sink keys), rotate the keys at their
  cache positions (RoPE table lookups), online softmax across blocks. Blocks with an empty
  slot range are skipped without being dereferenced (evicted blocks in an append-only table).

Both take keys/queries already in the right rotation (pre-RoPE keys for the store, the query
at its cache position for attention): the host does those rotations with float64 angles,
exact at any stream position; inside the kernel only cache positions (< the RoPE table) occur.

Triton is imported when a kernel is first built, not at import: on CPU these run only under
``TRITON_INTERPRET=1`` (tests), and the plugin's CPU path is the torch one.

Which path a dispatcher takes (:func:`use_triton`): the Triton kernels for CUDA tensors, the
torch reference otherwise; ``VLLM_KVSTREAM_KERNELS=triton`` forces the kernels on CPU tensors
too (with ``TRITON_INTERPRET=1``), so a real vLLM engine on CPU runs every kernel call the
CUDA path makes, with the engine's own block tables, slots and batches (``tests/e2e``).
"""

from __future__ import annotations

import functools
import os

import torch

from vllm_kvstream.errors import KVStreamConfigError

from vllm_kvstream.kernels.kv_quant import (
    NF4,
    NF4_EDGES,
    QuantLayout,
    QuantStats,
    quant_read_cpu,
    quant_write_cpu,
)
from vllm_kvstream.kernels.rope import Rope
from vllm_kvstream.kernels.sink_prefill import sink_window_attention


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


KERNELS_ENV = "VLLM_KVSTREAM_KERNELS"
#: ``auto``: Triton for CUDA tensors, torch otherwise; ``triton`` / ``torch``: always that path.
KERNEL_CHOICES = ("auto", "triton", "torch")


def use_triton(t: torch.Tensor) -> bool:
    """Whether a dispatcher runs the Triton kernels on ``t`` (module docstring)."""
    choice = os.environ.get(KERNELS_ENV, "auto")
    if choice not in KERNEL_CHOICES:
        raise KVStreamConfigError(f"{KERNELS_ENV}={choice!r}; allowed: {', '.join(KERNEL_CHOICES)}")
    if choice == "auto":
        return t.is_cuda
    if choice == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise KVStreamConfigError(
            f"{KERNELS_ENV}=triton on {t.device} tensors needs TRITON_INTERPRET=1 (set before Triton is imported); "
            "allowed otherwise: auto, torch"
        )
    return choice == "triton"


@functools.cache
def _jit():
    """The JIT module, imported on first use (see the module docstring)."""
    from vllm_kvstream.kernels import _kv_quant_jit

    return _kv_quant_jit


def _sink_window(first: int, seq_len: int, sink_tokens: int, window_tokens: int | None) -> tuple[int, int, int, int]:
    """The sink + window pattern of queries from ``first``: ``(sinks cached, window, tokens
    evicted before the first query's window, first window token)`` (window ``None``: unbounded)."""
    S = min(sink_tokens, seq_len)
    W = window_tokens if window_tokens is not None else 1 << 30
    return S, W, max(0, first - W + 1 - sink_tokens), max(S, first - W + 1)


def _layout_args(layout: QuantLayout) -> dict:
    L = layout
    if L.key_scale != "channel":
        raise NotImplementedError(f"the Triton kernels implement key_scale='channel' only, got {L.key_scale!r}")
    return dict(
        BITS=L.bits, S=L.sink_tokens, NOUT=L.n_out, VNF4=L.value_levels == "nf4",
        KZP=L.key_zero_point, K_ZERO_OFF=L.k_zero_off, BF16=L.float_dtype == "bfloat16",
        K_SCALE_OFF=L.k_scale_off, V_SCALE_OFF=L.v_scale_off, SINK_SCALE_OFF=L.sink_scale_off,
        K_CODES_OFF=L.k_codes_off, V_CODES_OFF=L.v_codes_off, SINK_K_OFF=L.sink_k_off,
        OUT_IDX_OFF=L.out_idx_off, OUT_K_OFF=L.out_k_off, HEAD_BYTES=L.head_bytes,
    )


def _rope_tables(rope: Rope | None, head_size: int, reach: int, device, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin tables the kernels look cache positions up in (``< reach``), checked."""
    if rope is None:
        zero = torch.zeros(1, device=device)
        return zero, zero
    if rope.rotary_dim != head_size:
        raise ValueError(f"quantized {what} needs full rotary (rotary_dim {rope.rotary_dim} != head_size {head_size})")
    if reach > rope.cos_sin_cache.shape[0]:
        raise ValueError(f"cache positions reach {reach}, past the RoPE table ({rope.cos_sin_cache.shape[0]})")
    cos, sin = rope.cos_sin_cache.float().to(device).chunk(2, dim=-1)
    return cos.contiguous(), sin.contiguous()


def write_segments(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, ...]:
    """Split a slot mapping into per-block runs: ``(block, first token, count, first slot)``.
    vLLM's slot mappings hold each block's tokens contiguous and in order."""
    blocks = slots.to(torch.long) // block_size
    change = torch.ones_like(blocks, dtype=torch.bool)
    change[1:] = blocks[1:] != blocks[:-1]
    t0 = torch.nonzero(change).flatten()
    counts = torch.diff(torch.cat((t0, torch.tensor([len(slots)], device=slots.device))))
    return blocks[t0], t0, counts.to(torch.int32), (slots[t0] % block_size).to(torch.int32)


def quant_store(
    key_pre: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    stats: QuantStats,
    layout: QuantLayout,
    *,
    is_neox_style: bool = True,
) -> None:
    """Triton :func:`~vllm_kvstream.kernels.kv_quant.quant_write_ref` for keys already
    rotated back to pre-RoPE (``key_pre``): updates ``stats``, then one program per (written
    block, KV head)."""
    L = layout
    if not L.scaled:  # 16-bit pages: the floats themselves
        D = L.head_size
        if D & (D - 1):
            raise ValueError(f"16-bit pages need a power-of-two head size for the Triton store, got {D}")
        _jit().store16_kernel[(key_pre.shape[0], key_pre.shape[1])](
            key_pre, value, cache, slots.to(torch.int64).contiguous(),
            key_pre.stride(0), key_pre.stride(1), value.stride(0), value.stride(1),
            H=key_pre.shape[1], D=D, BS=L.block_size, K_CODES_OFF=L.k_codes_off, V_CODES_OFF=L.v_codes_off,
            HEAD_BYTES=L.head_bytes, BF16=L.float_dtype == "bfloat16",
        )
        return
    sink = positions < L.sink_tokens
    if bool((~sink).any()):
        stats.update(key_pre[~sink].float())
    blocks, t0, counts, off0 = write_segments(slots, L.block_size)
    heads = key_pre.shape[1]
    grid = (len(blocks), heads)
    _jit().store_kernel[grid](
        key_pre, value, positions.to(torch.int64), cache, stats.ema_absmax, stats.ema_min, stats.ema_max,
        blocks, t0, counts, off0, NF4_EDGES.to(key_pre.device),
        key_pre.stride(0), key_pre.stride(1), value.stride(0), value.stride(1),
        H=heads, HALF=L.head_size // 2, BT=_next_pow2(L.block_size), BS=L.block_size, NEOX=is_neox_style,
        **_layout_args(L),
    )


def quant_decode_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    blocks: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    ranks: torch.Tensor,
    layout: QuantLayout,
    *,
    scale: float,
    rope: Rope | None,
    splits: int | None = None,
) -> torch.Tensor:
    """Triton :func:`~vllm_kvstream.kernels.kv_quant.quant_decode_attention_ref` (same
    arguments); returns ``[B, heads, D]`` float32.

    ``splits``: programs per (request, KV head) along the blocks (split-K), their softmax
    states combined here. Default: enough to give every streaming multiprocessor two
    programs when requests x KV heads are fewer (one on CPU, the interpreter)."""
    L = layout
    B, num_heads, D = query.shape
    kv_heads = cache.shape[1]
    group = num_heads // kv_heads
    M = blocks.shape[1]
    out = torch.empty(B, num_heads, D, dtype=torch.float32, device=query.device)
    reach = int((ranks + (ends - starts).clamp_min(0)).max()) if rope is not None else 0
    cos, sin = _rope_tables(rope, D, reach, query.device, "decode")
    if splits is None:
        splits = 1
        if query.is_cuda:
            sms = torch.cuda.get_device_properties(query.device).multi_processor_count
            splits = -(-2 * sms // (B * kv_heads))
    per_split = -(-M // max(1, min(int(splits), M)))
    splits = -(-M // per_split)
    gp = _next_pow2(group)
    if splits > 1:
        part_m = torch.empty(B, kv_heads, splits, gp, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(B, kv_heads, splits, gp, D, dtype=torch.float32, device=query.device)
    else:
        part_m = part_l = part_acc = out  # unused
    _jit().decode_kernel[(B, kv_heads, splits)](
        query.float().contiguous(), cache, blocks.to(torch.int64).contiguous(), starts.to(torch.int32).contiguous(),
        ends.to(torch.int32).contiguous(), ranks.to(torch.int32).contiguous(), cos, sin, NF4.to(query.device), out,
        part_m, part_l, part_acc,
        M, per_split, scale,
        H=kv_heads, G=group, GP=gp, HALF=D // 2, BT=_next_pow2(L.block_size),
        NEOX=rope.is_neox_style if rope is not None else True, ROPE=rope is not None, SPLIT=splits > 1,
        **_layout_args(L),
    )
    if splits > 1:  # combine the splits' softmax states (a split that saw nothing: max -inf, sum 0)
        m = part_m.amax(dim=2, keepdim=True)
        w = torch.exp(part_m - m)  # [B, H, splits, GP]
        num = (w[..., None] * part_acc).sum(dim=2)  # [B, H, GP, D]
        den = (w * part_l).sum(dim=2)
        out.copy_((num / den[..., None])[:, :, :group].reshape(B, num_heads, D))
    return out


def quant_prefill_attention(
    query_pre: torch.Tensor,
    cache: torch.Tensor,
    block_row: torch.Tensor,
    layout: QuantLayout,
    *,
    seq_len: int,
    sink_tokens: int,
    window_tokens: int | None,
    scale: float,
    rope: Rope | None,
    block_queries: int = 16,
) -> torch.Tensor:
    """A prefill chunk of one request over its quantized pages: the Triton counterpart of
    :func:`~vllm_kvstream.kernels.sink_attention.sink_window_attention_ref` with
    ``rope_applied=False`` on the dequantized pages (same arguments, one request).

    ``query_pre`` ``[n, heads, D]``: the chunk's queries before RoPE, at positions
    ``seq_len - n .. seq_len - 1``; ``block_row``: the request's logical -> physical blocks.
    Only the sink blocks and the blocks of the chunk's windows are listed for the kernel (an
    evicted block's id is never dereferenced). Returns ``[n, heads, D]`` float32."""
    L = layout
    n, num_heads, D = query_pre.shape
    kv_heads = cache.shape[1]
    group = num_heads // kv_heads
    bs = L.block_size
    first = seq_len - n
    S, W, base, lo = _sink_window(first, seq_len, sink_tokens, window_tokens)
    logical = sorted(set(range(-(-S // bs))) | set(range(lo // bs, -(-seq_len // bs))))
    blocks = block_row[torch.tensor(logical, dtype=torch.long)].to(torch.int64).to(query_pre.device)
    out = torch.empty(n, num_heads, D, dtype=torch.float32, device=query_pre.device)
    cos, sin = _rope_tables(rope, D, max(seq_len - base, min(seq_len, sink_tokens + W)), query_pre.device, "prefill")
    bm = min(block_queries, _next_pow2(n))
    _jit().prefill_kernel[(-(-n // bm), kv_heads)](
        query_pre.float().contiguous(), cache, blocks, torch.tensor(logical, dtype=torch.int32, device=query_pre.device),
        cos, sin, NF4.to(query_pre.device), out,
        n, len(logical), first, seq_len, base, sink_tokens, W, scale,
        H=kv_heads, G=group, GP=_next_pow2(group), BM=bm, HALF=D // 2, BT=_next_pow2(bs), BS=bs,
        NEOX=rope.is_neox_style if rope is not None else True, ROPE=rope is not None, **_layout_args(L),
    )
    return out


def decode_entries(seq_len: int, sink_tokens: int, window_tokens: int | None,
                   block_size: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """The sink + window pattern of one decode query (at ``seq_len - 1``) as the decode
    kernel's entries ``(logical block, first slot, end slot, cache position of the first
    slot)``, and the query's cache position. A block holding sinks and the window's start
    (after evicted tokens) appears twice, one entry for each run."""
    p = seq_len - 1
    S, _, ev, lo = _sink_window(p, seq_len, sink_tokens, window_tokens)
    entries = []
    for a, e, shift in ((0, S, 0), (lo, seq_len, ev)):
        t = a
        while t < e:
            lb = t // block_size
            end = min(e, (lb + 1) * block_size)
            entries.append((lb, t - lb * block_size, end - lb * block_size, t - shift))
            t = end
    return entries, p - ev


def quant_sink_window_attention(
    query_pre: torch.Tensor,
    cache: torch.Tensor,
    needed: torch.Tensor,
    table: torch.Tensor,
    requests: list,
    layout: QuantLayout,
    *,
    sink_tokens: int,
    window_tokens: int | None,
    scale: float,
    rope: Rope | None,
    out: torch.Tensor,
    triton: bool | None = None,
) -> torch.Tensor:
    """Dispatcher of a step's sink + window attention over quantized pages (the quantized
    backend's attention): ``query_pre`` ``[T, heads, D]`` before RoPE; ``needed`` ``[m]`` the
    physical blocks the step reads; ``table`` ``[R, blocks]`` each request's logical blocks as
    indices into ``needed`` (meaningful where the sink + window pattern reads);
    ``requests``: ``RequestSlice`` s (``block_row`` indexes ``table``). Writes ``out``.

    On CUDA (``triton=None``: :func:`use_triton`) the Triton kernels: every one-token request in one decode
    launch, each longer chunk through the prefill kernel. Elsewhere the torch path:
    dequantize ``needed`` once (:func:`~vllm_kvstream.kernels.kv_quant.quant_read_cpu`), then
    :func:`~vllm_kvstream.kernels.sink_attention.sink_window_attention_ref`'s contract with
    keys before RoPE."""
    if triton is None:
        triton = use_triton(cache)
    if not triton:
        neox = rope.is_neox_style if rope is not None else True
        k_all, v_all = quant_read_cpu(cache, needed, layout, is_neox_style=neox)
        return sink_window_attention(
            query_pre, k_all, v_all, table, requests, sink_tokens=sink_tokens, window_tokens=window_tokens,
            scale=scale, rope=rope, rope_applied=False, out=out,
        )
    decodes = [r for r in requests if r.q_end - r.q_start == 1]
    if decodes:  # one launch for every one-token request
        rows = torch.tensor([r.q_start for r in decodes], device=query_pre.device)
        plan = [decode_entries(r.seq_len, sink_tokens, window_tokens, layout.block_size) for r in decodes]
        width = max(len(p) for p, _ in plan)
        ent = torch.zeros(len(decodes), width, 4, dtype=torch.long)  # logical block, start, end, rank
        for i, (entries, _) in enumerate(plan):
            ent[i, : len(entries)] = torch.tensor(entries)
        ent = ent.to(cache.device)
        # Each decode's row (logical -> physical where the pattern reads), then its entries' blocks.
        row_idx = table[torch.tensor([r.block_row for r in decodes], device=table.device)]
        phys = torch.gather(needed[row_idx], 1, ent[..., 0])
        q = query_pre.index_select(0, rows).float()
        if rope is not None:  # the query at its cache position
            q = rope.rotate(q, torch.tensor([c for _, c in plan], device=q.device))
        o = quant_decode_attention(q, cache, phys, ent[..., 1], ent[..., 2], ent[..., 3], layout, scale=scale, rope=rope)
        out.index_copy_(0, rows, o.to(out.dtype))
    for req in requests:
        if req.q_end - req.q_start <= 1:
            continue
        row = needed[table[req.block_row]]  # logical -> physical where the pattern reads
        o = quant_prefill_attention(
            query_pre[req.q_start : req.q_end], cache, row, layout, seq_len=req.seq_len,
            sink_tokens=sink_tokens, window_tokens=window_tokens, scale=scale, rope=rope,
        )
        out[req.q_start : req.q_end] = o.to(out.dtype)
    return out


def quant_write(key_pre: torch.Tensor, *args, is_neox_style: bool = True) -> None:
    """Dispatcher of the store, :func:`quant_store`'s arguments: the Triton kernel on CUDA
    (:func:`use_triton`), :func:`~vllm_kvstream.kernels.kv_quant.quant_write_cpu` elsewhere
    (the reference with a step's decode tokens batched: the CPU path; keys already pre-RoPE,
    so no rope)."""
    if use_triton(key_pre):
        quant_store(key_pre, *args, is_neox_style=is_neox_style)
    else:
        quant_write_cpu(key_pre, *args, rope=None, is_neox_style=is_neox_style)
