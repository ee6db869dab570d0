"""Batched decode over a sink + window pattern: one query token per request, all requests of a
step at once, reading vLLM's CPU cache layout (:func:`split_cpu_kv_cache`) whose keys were
rotated at their absolute positions (``rope_applied=True`` in
:func:`~vllm_kvstream.kernels.sink_attention.sink_window_attention_ref`, which is its oracle).

The reference loops over requests and slices exact token ranges; a decode step of a 30-layer
model would pay that Python loop and its small ops 30 times. Here the per-step work that does
not depend on the layer (which blocks to read, which token slots inside them are attended,
the sink rotation) is planned once by :func:`plan_decode`; each layer then runs a fixed
handful of batched ops in :func:`sink_window_decode`: one block gather of K|V (the only copy
of the cache), a rotation of the gathered sink keys, two matmuls batched over (request,
block, head) in the cache's own per-block layout, and a softmax across blocks.

Sinks: StreamingLLM scores a sink key ``i`` at distance ``p - e(p) - i``; the cached key is
rotated at ``i`` and the query at ``p``, so the gathered copy of the sink keys is rotated forward by
``e(p)`` (``<R(-e) q, k> = <q, R(e) k>``): one matmul then serves sinks and window alike.

Which blocks are read: for a request whose window has left the sinks behind, the sink blocks
``[0, ceil(S / bs))`` and the window blocks ``[lo // bs, p // bs]``; otherwise the blocks
``[0, p // bs]``. Nothing else: a block the scheduler freed is never dereferenced. Rows are
padded to the batch's longest with the null block (id ``pad_block``, zero-initialised by vLLM)
and every slot that is not an attended token gets a ``-inf`` score. Those slots are inside
blocks the request holds or the null block, so they hold finite values (vLLM zero-fills the
cache and only the model writes it), and a zero weight times them is zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvstream.kernels.rope import Rope


@dataclass(frozen=True, eq=False)
class DecodePlan:
    """Per-step plan shared by all layers (built by :func:`plan_decode`)."""

    rows: torch.Tensor  # [B] long: each request's query row in the packed batch
    blocks: torch.Tensor  # [B, nb] long: physical blocks to read; the first ``sink_blocks`` are sink blocks
    bias: torch.Tensor  # [B, nb, 1, 1, block_size] float32: 0 where attended, -inf elsewhere
    sink_blocks: int
    sink_tokens: int
    block_size: int
    sink_cos: torch.Tensor | None  # [B, 1, 1, rotary_dim // 2, 1]: rotation of the sink keys by +e(p)
    sink_sin: torch.Tensor | None
    #: [B, nb, block_size] long: the absolute position each gathered slot's key is met at (the
    #: sinks' shifted forward by e(p)); what a reader of keys cached before RoPE rotates them at.
    key_positions: torch.Tensor | None = None
    #: [B, nb, block_size] bool: the attended slots (``bias == 0``).
    attended: torch.Tensor | None = None
    #: Buffers reused by every layer of the step (layers run one after another).
    workspace: dict = field(default_factory=dict)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self.workspace.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self.workspace[name] = torch.empty(shape, dtype=dtype)
        return buf


def split_cpu_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views ``[num_blocks, kv_heads, block_size, head_size]`` of one layer's
    cache in vLLM's CPU attention layout (``vec``/``vec16`` ISAs, written by
    ``cpu_attn_reshape_and_cache``): the tensor is ``[num_blocks, kv_heads, block_size,
    2 * head_size]`` and each (block, head) holds the keys transposed, ``[head_size,
    block_size]``, followed by the values, ``[block_size, head_size]``."""
    num_blocks, kv_heads, block_size, two_d = kv_cache.shape
    head_size = two_d // 2
    raw = kv_cache.view(num_blocks, kv_heads, 2, head_size * block_size)
    keys = raw[:, :, 0].view(num_blocks, kv_heads, head_size, block_size).transpose(-1, -2)
    values = raw[:, :, 1].view(num_blocks, kv_heads, block_size, head_size)
    return keys, values


def plan_decode(
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    tables: torch.Tensor,
    *,
    sink_tokens: int,
    window_tokens: int | None,
    block_size: int,
    rope: Rope | None,
    pad_block: int | None = 0,
) -> DecodePlan:
    """Plan a decode step for B requests. ``rows`` [B]: each request's query row in the packed
    batch; ``seq_lens`` [B]: its tokens including the one being decoded; ``tables`` [B, max_blocks]:
    its block-table row (logical block -> physical block). ``pad_block``: the block padded
    entries read (vLLM's null block, zero-filled, by default); ``None``: the row's own first
    block, for pages whose unwritten bytes may decode to anything."""
    rows = rows.to(torch.long)
    seq = seq_lens.to(torch.long)
    p = seq - 1
    if window_tokens is None:
        evicted = torch.zeros_like(p)
    else:
        evicted = (p - window_tokens + 1 - sink_tokens).clamp_min(0)
    evicting = evicted > 0
    lo = torch.where(evicting, p - (window_tokens or 0) + 1, torch.zeros_like(p))
    first = lo // block_size
    count = p // block_size - first + 1
    n_win = int(count.max())
    slot = torch.arange(block_size)

    win_logical = first[:, None] + torch.arange(n_win)[None, :]  # [B, n_win]
    win_ok = torch.arange(n_win)[None, :] < count[:, None]
    win_tok = win_logical[:, :, None] * block_size + slot  # [B, n_win, bs]
    win_mask = (win_tok >= lo[:, None, None]) & (win_tok < seq[:, None, None]) & win_ok[:, :, None]

    sink_blocks = -(-sink_tokens // block_size) if bool(evicting.any()) else 0
    sink_logical = torch.arange(sink_blocks).expand(len(rows), sink_blocks)
    sink_tok = sink_logical[:, :, None] * block_size + slot
    sink_mask = (sink_tok < sink_tokens) & evicting[:, None, None]
    sink_ok = evicting[:, None].expand(len(rows), sink_blocks)

    logical = torch.cat((sink_logical, win_logical), dim=1)
    ok = torch.cat((sink_ok, win_ok), dim=1)
    table = tables.to(torch.long)
    logical = torch.where(ok, logical, torch.zeros_like(logical)).clamp_max(table.shape[1] - 1)
    read = table.gather(1, logical)
    if pad_block is None:  # pad with a block the row reads anyway (its first)
        pad = read.gather(1, ok.to(torch.int8).argmax(dim=1, keepdim=True)).expand_as(read)
    else:
        pad = torch.full_like(logical, pad_block)
    blocks = torch.where(ok, read, pad)
    mask = torch.cat((sink_mask, win_mask), dim=1)[:, :, None, None, :]
    bias = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
    shift = torch.cat((evicted[:, None].expand(len(rows), sink_blocks), torch.zeros_like(win_logical)), dim=1)
    key_positions = logical[:, :, None] * block_size + slot + shift[:, :, None]

    cos = sin = None
    if sink_blocks and rope is not None:
        cos, sin = rope.cos_sin(evicted)
        cos, sin = cos[:, None, None, :, None], sin[:, None, None, :, None]
    return DecodePlan(rows, blocks, bias, sink_blocks, sink_tokens, block_size, cos, sin, key_positions,
                      mask[:, :, 0, 0, :])


def _rotate_keys_(keys_t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: Rope) -> None:
    """Rotate transposed keys ``[B, n, H, head_size, bs]`` in place (cos/sin ``[B, 1, 1, rd // 2, 1]``)."""
    rd = rope.rotary_dim
    if rope.is_neox_style:
        x1, x2 = keys_t[..., : rd // 2, :], keys_t[..., rd // 2 : rd, :]
    else:
        x1, x2 = keys_t[..., 0:rd:2, :], keys_t[..., 1:rd:2, :]
    new1 = x1 * cos - x2 * sin
    x2.mul_(cos).add_(x1 * sin)
    x1.copy_(new1)


def sink_window_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    plan: DecodePlan,
    *,
    scale: float,
    rope: Rope | None,
    out: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """``query`` [T, heads, D] (rotated at absolute positions); ``kv_cache`` one layer's cache
    in vLLM's CPU layout (:func:`split_cpu_kv_cache`). Writes rows ``plan.rows`` of ``out``.
    ``softcap``: Gemma-2's logit soft-capping, ``softcap * tanh(score / softcap)``."""
    _, kv_heads, block_size, two_d = kv_cache.shape
    if block_size != plan.block_size:
        raise ValueError(f"cache block size {block_size} != planned block size {plan.block_size}")
    head_size = two_d // 2
    num_heads = query.shape[1]
    group = num_heads // kv_heads
    batch, nb = plan.blocks.shape
    raw = plan.buffer("raw", (batch * nb, kv_heads, block_size, two_d), kv_cache.dtype)
    torch.index_select(kv_cache, 0, plan.blocks.reshape(-1), out=raw)
    if raw.dtype != torch.float32:
        raw = raw.float()
    raw = raw.view(batch, nb, kv_heads, 2, head_size * block_size)
    keys_t = raw[:, :, :, 0].view(batch, nb, kv_heads, head_size, block_size)  # per block: [D, bs]
    values = raw[:, :, :, 1].view(batch, nb, kv_heads, block_size, head_size)
    if plan.sink_blocks and plan.sink_cos is not None and rope is not None:
        if plan.sink_tokens <= block_size:  # the usual case: rotate just the sink slots
            _rotate_keys_(keys_t[:, :1, :, :, : plan.sink_tokens], plan.sink_cos, plan.sink_sin, rope)
        else:
            _rotate_keys_(keys_t[:, : plan.sink_blocks], plan.sink_cos, plan.sink_sin, rope)
    q = query.index_select(0, plan.rows).float().view(batch, 1, kv_heads, group, head_size)
    # Scores block by block [B, nb, H, group, bs]; softmax over (nb, bs) jointly.
    scores = (q @ keys_t).mul_(scale)
    if softcap:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    scores = scores.add_(plan.bias)
    scores = scores.sub_(scores.amax(dim=(1, 4), keepdim=True)).exp_()
    o = (scores @ values).sum(dim=1).div_(scores.sum(dim=(1, 4)).unsqueeze(-1))  # [B, H, group, D]
    out.index_copy_(0, plan.rows, o.reshape(batch, num_heads, head_size).to(out.dtype))
    return out
