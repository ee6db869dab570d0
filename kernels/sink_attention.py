"""Paged attention over a sink + window pattern (reference implementation).

Semantics (exact, per query token at absolute position ``p``): attend to the tokens
``[0, S) ∪ [max(S, p - W + 1), p]`` (``S`` sink tokens, ``W`` window tokens, ``W = None``
for full causal attention). Positions are counted inside the cache as in StreamingLLM:
with ``e(p) = max(0, p - W + 1 - S)`` tokens evicted before ``p``'s window, the query
scores a sink key ``i`` at distance ``p - e(p) - i`` and a window key ``j`` at ``p - j``.
RoPE only sees distances, so the query meets the sinks rotated ``e(p)`` positions back.

Two cache layouts, both exact:

* ``rope_applied=True`` (what the plugin runs unquantized): the model rotated ``q`` at ``p``
  and each key at its absolute position ``j`` before it was cached (angles beyond the model's
  table computed in float64, see ``adapter/rope.py``). Window scores need nothing more; the
  sink scores use ``q`` rotated by ``-e(p)``. No cached key is ever re-rotated.
* ``rope_applied=False`` (keys cached before RoPE, as KVQuant quantizes them): the query is
  rotated at ``p - e(p)`` against the sinks (rotated at ``i``) and at ``p - base`` against the
  window keys (rotated at ``j - base``), ``base`` being the chunk's first query's ``e``, so
  every angle stays below S + W + chunk.

Paged layout: ``key_cache`` and ``value_cache`` are ``[num_blocks, kv_heads, block_size,
head_size]`` views; ``block_table[r, b]`` is the physical block of request ``r``'s logical
block ``b``. Only blocks holding attended tokens are read: a block the scheduler freed may
already belong to another request, and its id is never dereferenced here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvstream.kernels.rope import Rope


@dataclass(frozen=True)
class RequestSlice:
    """One request's part of a batch: query tokens ``[q_start, q_end)`` of the packed batch,
    which sit at absolute positions ``[seq_len - (q_end - q_start), seq_len)``."""

    q_start: int
    q_end: int
    seq_len: int
    block_row: int


def write_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` ``[T, kv_heads, head_size]`` at flat slots ``block * bs + off``.
    Negative slots (padding) are skipped."""
    block_size = key_cache.shape[2]
    slots = slot_mapping[: key.shape[0]].to(torch.long)
    valid = slots >= 0
    if not bool(valid.all()):
        key, value, slots = key[valid], value[valid], slots[valid]
    blocks = slots // block_size
    offsets = slots % block_size
    key_cache[blocks, :, offsets, :] = key.to(key_cache.dtype)
    value_cache[blocks, :, offsets, :] = value.to(value_cache.dtype)


def _gather_range(cache: torch.Tensor, block_row: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Tokens ``[lo, hi)`` of one request as ``[hi - lo, kv_heads, head_size]``, reading only the
    blocks that hold them."""
    block_size = cache.shape[2]
    if hi <= lo:
        return cache.new_empty((0, cache.shape[1], cache.shape[3]))
    first = lo // block_size
    last = -(-hi // block_size)
    blocks = cache.index_select(0, block_row[first:last].to(torch.long))  # [m, H, bs, D]
    tokens = blocks.permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])
    start = lo - first * block_size
    return tokens[start : start + (hi - lo)]


@dataclass(frozen=True)
class TileOperands:
    """One request slice's attention operands in float32, as the reference defines them:
    queries as they meet the sinks and the rest (rotated per the layout, see the module
    docstring), the sink keys/values ``[0, n_sink)`` and the rest ``[rest_lo, seq_len)``."""

    pos_q: torch.Tensor
    pos_sink: torch.Tensor
    pos_rest: torch.Tensor
    q_sink: torch.Tensor  # [n, heads, D]
    q_rest: torch.Tensor
    k_sink: torch.Tensor  # [n_sink, kv_heads, D]
    k_rest: torch.Tensor  # [seq_len - rest_lo, kv_heads, D]
    v_sink: torch.Tensor
    v_rest: torch.Tensor


def tile_operands(query, key_cache, value_cache, block_table, req: RequestSlice, *, sink_tokens: int,
                  window_tokens: int | None, rope: Rope | None, rope_applied: bool) -> TileOperands:
    """The operands of ``req`` (see :class:`TileOperands`), reading only the blocks that hold
    attended tokens."""
    n = req.q_end - req.q_start
    seq_len = req.seq_len
    first = seq_len - n
    device = query.device
    pos_q = torch.arange(first, seq_len, device=device)
    if window_tokens is None:
        evicted = torch.zeros_like(pos_q)
        lo = 0
    else:
        evicted = (pos_q - window_tokens + 1 - sink_tokens).clamp_min(0)
        lo = max(0, first - window_tokens + 1)
    base = int(evicted[0])
    n_sink = min(sink_tokens, seq_len)
    rest_lo = max(n_sink, lo)
    pos_sink = torch.arange(0, n_sink, device=device)
    pos_rest = torch.arange(rest_lo, seq_len, device=device)
    blocks = block_table[req.block_row]

    q = query[req.q_start : req.q_end].float()
    k_sink = _gather_range(key_cache, blocks, 0, n_sink).float()
    k_rest = _gather_range(key_cache, blocks, rest_lo, seq_len).float()
    v_sink = _gather_range(value_cache, blocks, 0, n_sink).float()
    v_rest = _gather_range(value_cache, blocks, rest_lo, seq_len).float()
    if rope is not None and rope_applied:
        q_sink = rope.rotate(q, -evicted) if n_sink and int(evicted[-1]) > 0 else q
        q_rest = q
    elif rope is not None:
        q_sink = rope.rotate(q, pos_q - evicted) if n_sink else q
        q_rest = rope.rotate(q, pos_q - base)
        k_sink = rope.rotate(k_sink, pos_sink)
        k_rest = rope.rotate(k_rest, pos_rest - base)
    else:
        q_sink = q_rest = q
    return TileOperands(pos_q, pos_sink, pos_rest, q_sink, q_rest, k_sink, k_rest, v_sink, v_rest)


def sink_window_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    requests: list[RequestSlice],
    *,
    sink_tokens: int,
    window_tokens: int | None,
    scale: float,
    rope: Rope | None,
    rope_applied: bool = False,
    out: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Naive float32 reference. ``query`` is ``[T, heads, head_size]``, rotated at its absolute
    position when ``rope_applied`` and unrotated otherwise (``rope=None``: keys and queries are
    used as stored, for models without RoPE). Returns ``[T, heads, head_size]`` in ``query``'s
    dtype (written into ``out`` when given). ``softcap``: scores become ``softcap *
    tanh(score / softcap)`` (Gemma-2's attention logit soft-capping), as vLLM's kernels do."""
    num_heads = query.shape[1]
    kv_heads = key_cache.shape[1]
    group = num_heads // kv_heads
    if out is None:
        out = torch.empty_like(query)
    for req in requests:
        n = req.q_end - req.q_start
        if n <= 0:
            continue
        ops = tile_operands(query, key_cache, value_cache, block_table, req, sink_tokens=sink_tokens,
                            window_tokens=window_tokens, rope=rope, rope_applied=rope_applied)
        pos_q, pos_sink, pos_rest = ops.pos_q, ops.pos_sink, ops.pos_rest
        q_sink, q_rest, k_sink, k_rest = ops.q_sink, ops.q_rest, ops.k_sink, ops.k_rest
        v = torch.cat((ops.v_sink, ops.v_rest))

        def scores(qx: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:
            # [n, Hq, D] -> [Hkv, group * n, D];  [K, Hkv, D] -> [Hkv, D, K]
            qx = qx.view(n, kv_heads, group, -1).permute(1, 2, 0, 3).reshape(kv_heads, group * n, -1)
            return torch.bmm(qx, kx.permute(1, 2, 0)) * scale  # [Hkv, group * n, K]

        s = torch.cat((scores(q_sink, k_sink), scores(q_rest, k_rest)), dim=-1)
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        visible_sink = pos_sink[None, :] <= pos_q[:, None]
        visible_rest = pos_rest[None, :] <= pos_q[:, None]
        if window_tokens is not None:
            visible_rest &= pos_rest[None, :] > (pos_q[:, None] - window_tokens)
        visible = torch.cat((visible_sink, visible_rest), dim=-1).repeat(group, 1)  # [group * n, K]
        s = s.masked_fill(~visible, float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = torch.bmm(p, v.permute(1, 0, 2))  # [Hkv, group * n, D]
        o = o.view(kv_heads, group, n, -1).permute(2, 0, 1, 3).reshape(n, num_heads, -1)
        out[req.q_start : req.q_end] = o.to(out.dtype)
    return out
