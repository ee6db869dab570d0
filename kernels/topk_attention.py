"""Attention over a selection of whole blocks (``topk-importance``), with the attention mass
each block receives (reference implementation).

Semantics, for queries at positions ``first_pos + i`` of one request: the request keeps the
logical blocks ``logical`` (ascending; block ``b`` holds tokens ``[b * bs, (b + 1) * bs)``),
stored in the physical blocks ``blocks``. A query at ``p`` attends to every cached token
(``< num_tokens``) of every kept block that is not after ``p``. Positions are counted inside
the cache, as StreamingLLM does: the kept tokens, in order, sit at positions 0, 1, 2, ...

    logical:   [0]  [3]  [4]  [9] [10] [11 <- queries]
    gap after:  8    5    5    0    0    0      (evicted blocks between it and the queries)

Keys are cached after RoPE at their absolute positions (``rope_applied``), so only distances
need fixing: a key of block ``b`` is rotated forward by ``bs x`` (blocks evicted between
``b`` and the queries), which puts it at exactly its cache-relative distance from every query
(the queries sit in the last, contiguous run of blocks, as the recent window guarantees).

The mass of block ``k`` is ``sum_i w_i sum_heads sum_{t in block k} softmax_i(t)`` with
``w_i = decay ** (n - 1 - i)``: H2O's accumulated attention, decayed per query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvstream.kernels import cpu_ext
from vllm_kvstream.kernels.rope import Rope


def evicted_after(logical: torch.Tensor) -> torch.Tensor:
    """For ascending kept block indices, how many blocks were evicted between each one and
    the last kept block."""
    m = logical.numel()
    return (logical[-1] - logical) - (m - 1 - torch.arange(m, device=logical.device))


def selected_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    blocks: torch.Tensor,
    logical: torch.Tensor,
    *,
    num_tokens: int,
    first_pos: int,
    scale: float,
    rope: Rope | None,
    out: torch.Tensor,
    decay: float = 1.0,
) -> torch.Tensor:
    """Naive float32 reference. ``query`` ``[n, heads, head_size]`` (rotated at its absolute
    positions); caches ``[num_blocks, kv_heads, block_size, head_size]``; ``blocks`` and
    ``logical`` ``[m]``. Writes the output into ``out`` (``query``'s shape) and returns the
    mass ``[m]`` (float32)."""
    n, num_heads, _ = query.shape
    kv_heads, bs = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // kv_heads
    m = logical.numel()
    blocks = blocks.to(torch.long)
    logical = logical.to(torch.long)
    k = key_cache.index_select(0, blocks).permute(0, 2, 1, 3).reshape(m * bs, kv_heads, -1).float()
    v = value_cache.index_select(0, blocks).permute(0, 2, 1, 3).reshape(m * bs, kv_heads, -1).float()
    pos = (logical[:, None] * bs + torch.arange(bs)[None, :]).reshape(-1)
    if rope is not None:
        shift = (evicted_after(logical) * bs).repeat_interleave(bs)
        if bool((shift > 0).any()):
            k = rope.rotate(k, shift)
    # Slots past the cached tokens (the tail of the last block) hold stale data: never read.
    v = v.masked_fill((pos >= num_tokens)[:, None, None], 0.0)
    pos_q = torch.arange(first_pos, first_pos + n)
    visible = (pos[None, :] <= pos_q[:, None]) & (pos[None, :] < num_tokens)  # [n, m * bs]
    q = query.float().view(n, kv_heads, group, -1).permute(1, 2, 0, 3).reshape(kv_heads, group * n, -1)
    s = torch.bmm(q, k.permute(1, 2, 0)) * scale  # [Hkv, group * n, m * bs]
    s = s.masked_fill(~visible.repeat(group, 1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.bmm(p, v.permute(1, 0, 2))  # [Hkv, group * n, D]
    out.copy_(o.view(kv_heads, group, n, -1).permute(2, 0, 1, 3).reshape(n, num_heads, -1).to(out.dtype))
    per_query = p.view(kv_heads, group, n, m, bs).sum(dim=(0, 1, 4))  # [n, m]
    weights = decay ** torch.arange(n - 1, -1, -1, dtype=torch.float64)
    return (weights.float()[:, None] * per_query).sum(dim=0)


def selected_attention_cpu(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    blocks: torch.Tensor,
    logical: torch.Tensor,
    *,
    num_tokens: int,
    first_pos: int,
    scale: float,
    rope: Rope | None,
    out: torch.Tensor,
    decay: float = 1.0,
) -> torch.Tensor:
    """:func:`selected_attention_ref`'s contract on vLLM's raw CPU cache layout
    (``[num_blocks, kv_heads, block_size, 2 * head_size]``, keys transposed per block and head,
    see ``sink_decode.split_cpu_kv_cache``), fast enough to decode with:

    * one gather of the raw blocks, and scores against the stored transposed keys per block
      (no copy into token-major order);
    * the RoPE fix applied to whichever side is smaller: for a decode step the query is
      rotated back by each block's shift (``m x heads`` vectors) instead of rotating every
      kept key forward (``m x block_size x kv_heads``); the same distances either way;
    * one softmax across all blocks through a shared log-sum-exp.
    """
    n, num_heads, head_size = query.shape
    num_blocks, kv_heads, bs, _ = kv_cache.shape
    group = num_heads // kv_heads
    m = logical.numel()
    logical = logical.to(torch.long)
    raw = kv_cache.view(num_blocks, kv_heads, 2, head_size * bs).index_select(0, blocks.to(torch.long))
    keys_t = raw[:, :, 0].reshape(m, kv_heads, head_size, bs).float()  # [m, Hkv, D, bs]
    values = raw[:, :, 1].reshape(m, kv_heads, bs, head_size).float()  # [m, Hkv, bs, D]
    q = query.float().view(n, kv_heads, group, head_size).permute(1, 2, 0, 3).reshape(kv_heads, group * n, head_size)
    q = q.unsqueeze(0)  # [1, Hkv, G * n, D]
    shift = evicted_after(logical) * bs
    if rope is not None and bool((shift > 0).any()):
        if n * num_heads <= bs * kv_heads:
            flat = q.reshape(1, kv_heads * group * n, head_size).expand(m, -1, -1)
            q = rope.rotate(flat, -shift).view(m, kv_heads, group * n, head_size)
        else:
            tokens = keys_t.permute(0, 3, 1, 2).reshape(m * bs, kv_heads, head_size)
            tokens = rope.rotate(tokens, shift.repeat_interleave(bs))
            keys_t = tokens.view(m, bs, kv_heads, head_size).permute(0, 2, 3, 1)
    s = torch.matmul(q, keys_t).mul_(scale).view(m, kv_heads, group, n, bs)
    # Only blocks reaching past the first query hold hidden slots (later tokens, or the stale
    # tail of the last block): mask those few blocks in place, not the whole score tensor.
    j0 = int(torch.searchsorted(logical, first_pos // bs))
    pos = logical[j0:, None] * bs + torch.arange(bs)[None, :]  # [m - j0, bs]
    pos_q = torch.arange(first_pos, first_pos + n)
    hidden = (pos[None] > pos_q[:, None, None]) | (pos[None] >= num_tokens)  # [n, m - j0, bs]
    s[j0:].masked_fill_(hidden.permute(1, 0, 2)[:, None, None], float("-inf"))
    lse = torch.logsumexp(s.permute(1, 2, 3, 0, 4).reshape(kv_heads, group, n, m * bs), dim=-1)
    p = torch.exp(s - lse[None, ..., None])  # [m, Hkv, G, n, bs]
    tail = num_tokens - int(logical[-1]) * bs
    if tail < bs:  # the stale tail of the last block (gathered copy): zero it, 0 x NaN is NaN
        values[-1, :, tail:] = 0.0
    o = torch.matmul(p.view(m, kv_heads, group * n, bs), values).sum(dim=0)  # [Hkv, G * n, D]
    out.copy_(o.view(kv_heads, group, n, head_size).permute(2, 0, 1, 3).reshape(n, num_heads, head_size).to(out.dtype))
    per_query = p.sum(dim=(1, 2, 4))  # [m, n]
    weights = (decay ** torch.arange(n - 1, -1, -1, dtype=torch.float64)).float()
    return per_query @ weights


@dataclass(frozen=True, eq=False)
class SelectedDecodePlan:
    """What a steady decode step shares across layers (built by :func:`plan_selected_decode`):
    every layer keeps as many blocks as the others and its last kept block is the query's own,
    so only the physical blocks and their shifts differ per layer."""

    rows: torch.Tensor  # [B] long: query rows in the packed batch
    counts: torch.Tensor  # [B] long: kept blocks
    tails: torch.Tensor  # [B] long: cached slots of the last kept block, the query's own included
    hidden: torch.Tensor  # [B, M, 1, 1, bs] bool: padding, and slots of the last block after the query


def plan_selected_decode(rows: torch.Tensor, counts: torch.Tensor, tails: torch.Tensor, *, width: int,
                         block_size: int) -> SelectedDecodePlan:
    """``counts`` [B]: kept blocks per request; ``tails`` [B]: cached tokens in its last kept
    block, the query's own included (``1..block_size``); ``width``: padded row width M."""
    counts = counts.to(torch.long)
    tails = tails.to(torch.long)
    idx = torch.arange(width)[None, :]
    last = counts - 1
    slot = torch.arange(block_size)[None, None, :]
    visible = (idx < last[:, None])[:, :, None] | ((idx == last[:, None])[:, :, None] & (slot < tails[:, None, None]))
    return SelectedDecodePlan(rows.to(torch.long), counts, tails, ~visible[:, :, None, None, :])


def selected_decode_cpu(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    plan: SelectedDecodePlan,
    blocks: torch.Tensor,
    shift: torch.Tensor,
    *,
    scale: float,
    rope: Rope | None,
    out: torch.Tensor,
    shift_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """One decode query for each of B requests, each over its own selection, in one batch of
    ops (the per-request :func:`selected_attention_cpu` pays ~20 small ops per request and layer).

    ``blocks`` [B, M]: the physical blocks of each request's kept logical blocks in ascending
    order, padded on the right with a block the request holds (the adapter repeats its first
    kept block); ``shift`` [B, M]: ``bs x`` blocks evicted between each kept block and the last
    (:func:`evicted_after`), 0 on padding. Padding and the slots of the last block after the
    query score ``-inf`` (``masked_fill``: whatever the keys hold). Their values get weight 0,
    so, as in :func:`~vllm_kvstream.kernels.sink_decode.sink_window_decode`, they must be
    finite: they are slots of blocks the request holds, which vLLM zero-fills and only the
    model writes. The general path, :func:`selected_attention_cpu`, zeroes them instead.

    ``shift_cos_sin``: ``rope.cos_sin(-shift)`` as ``[B, M, rotary_dim // 2]`` each, when the
    caller keeps them across steps (the shifts change only when the selection does).

    Writes rows ``plan.rows`` of ``out``; returns the mass [B, M] (float32, 0 on padding): what
    :func:`selected_attention_cpu` returns for ``n = 1``, request by request.

    With ``compiled`` and the C helper built (``cpu_ext.selected_decode``), one C pass reads
    the kept blocks in place instead (no gather); padding blocks are never dereferenced and
    the slots after the query never enter the result, so those may hold anything. The torch ops below are its reference.
    """
    if compiled and cpu_ext.can_stage(kv_cache):
        cos = sin = None
        if rope is not None and bool((shift > 0).any()):
            if shift_cos_sin is None:
                cos, sin = rope.cos_sin(-shift.reshape(-1).to(torch.long))
                cos, sin = cos.view(*shift.shape, -1), sin.view(*shift.shape, -1)
            else:
                cos, sin = shift_cos_sin
        return cpu_ext.selected_decode(
            query, kv_cache, plan.rows, blocks, plan.counts, plan.tails, cos, sin, out,
            rotary_dim=rope.rotary_dim if rope is not None else 0,
            neox=rope.is_neox_style if rope is not None else True, scale=scale,
        )
    num_blocks, kv_heads, bs, two_d = kv_cache.shape
    head_size = two_d // 2
    num_heads = query.shape[1]
    group = num_heads // kv_heads
    batch, m = blocks.shape
    raw = kv_cache.index_select(0, blocks.reshape(-1).to(torch.long)).float()
    raw = raw.view(batch, m, kv_heads, 2, head_size * bs)
    keys_t = raw[:, :, :, 0].view(batch, m, kv_heads, head_size, bs)
    values = raw[:, :, :, 1].view(batch, m, kv_heads, bs, head_size)
    q = query.index_select(0, plan.rows).float()  # [B, Hq, D]
    if rope is not None and bool((shift > 0).any()):
        # Rotate the query back by each block's shift: <R(-s) q, k> = <q, R(s) k>.
        flat = q[:, None].expand(batch, m, num_heads, head_size).reshape(batch * m, num_heads, head_size)
        if shift_cos_sin is None:
            q = rope.rotate(flat, -shift.reshape(-1).to(torch.long))
        else:
            cos, sin = shift_cos_sin
            q = rope.apply(flat, cos.reshape(batch * m, -1), sin.reshape(batch * m, -1))
        q = q.view(batch, m, kv_heads, group, head_size)
    else:
        q = q.view(batch, 1, kv_heads, group, head_size)
    s = torch.matmul(q, keys_t).mul_(scale).masked_fill_(plan.hidden, float("-inf"))  # [B, M, Hkv, G, bs]
    s = s.sub_(s.amax(dim=(1, 4), keepdim=True)).exp_()
    s = s.div_(s.sum(dim=(1, 4), keepdim=True))
    o = torch.matmul(s, values).sum(dim=1)  # [B, Hkv, G, D]
    out.index_copy_(0, plan.rows, o.reshape(batch, num_heads, head_size).to(out.dtype))
    return s.sum(dim=(2, 3, 4))


def block_key_norms(key_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm of the keys of each block (all heads, all ``block_size`` tokens): the
    static ``key-norm`` score is its negative. RoPE keeps norms, so cached keys do."""
    k = key_cache.index_select(0, blocks.to(torch.long)).float()  # [m, H, bs, D]
    return k.norm(dim=-1).mean(dim=(1, 2))


def selected_attention(*args, **kwargs) -> torch.Tensor:
    """Dispatcher over vLLM's CPU cache layout: :func:`selected_attention_cpu` until a Triton
    kernel is registered for CUDA."""
    return selected_attention_cpu(*args, **kwargs)
