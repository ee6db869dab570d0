"""Prefill chunks over the sink + window pattern in query tiles (CPU torch path).

The reference scores every query of a chunk against every key the chunk can see: a chunk of
``C`` queries over a cache of ``S + W`` costs ``C x (S + W + C)`` scores, most of them masked
(a query only sees ``S + W``). Here each request's queries are cut into tiles of ``T``
consecutive positions; a tile ending at position ``b`` only needs the sinks and keys
``[a - W + 1, b)``, so the chunk costs ``C x (S + W + T)``: for a 2048-token chunk over
4+252 that is 3x fewer scores, and memory per step is bounded by the tile, not the chunk.

A tile is itself a request slice whose sequence ends at its last query, so each tile runs the
reference unchanged: same semantics, same numerics, nothing new to trust.

    chunk queries  [a ........................................ b)
    tiles          [a    t1)[t1    t2)[t2    t3) ... [tk       b)
    tile [t1, t2) reads  sinks [0, S)  +  keys [t1 - W + 1, t2)
"""

from __future__ import annotations

import torch

from vllm_kvstream.kernels.sink_attention import RequestSlice, sink_window_attention_ref, tile_operands


def flash_tile_tokens(window_tokens: int) -> int:
    """Query tile of the fused path: about a quarter of the window past 1K (keys read per query
    ``W + T``), between 64 and 256 (measured fastest at 4+1020 on this CPU)."""
    return max(64, min(256, window_tokens))


def tile_tokens(window_tokens: int) -> int:
    """Query tile for a window: about the window (cost per query ``S + W + T``), at least 64
    queries so per-tile overhead stays small, at most 512 so score tensors stay small."""
    return max(64, min(512, window_tokens))


def split_requests(requests: list[RequestSlice], tile: int) -> list[RequestSlice]:
    """Cut each request's queries into tiles of at most ``tile`` consecutive positions."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    tiles: list[RequestSlice] = []
    for req in requests:
        first = req.seq_len - (req.q_end - req.q_start)
        for start in range(req.q_start, req.q_end, tile):
            end = min(req.q_end, start + tile)
            tiles.append(
                RequestSlice(q_start=start, q_end=end, seq_len=first + (end - req.q_start), block_row=req.block_row)
            )
    return tiles


def sink_window_attention_tiled(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    requests: list[RequestSlice],
    *,
    sink_tokens: int,
    window_tokens: int | None,
    tile: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Same contract as :func:`sink_window_attention_ref`; ``tile`` defaults to
    :func:`tile_tokens` of the window. Full attention (``window_tokens=None``) is not tiled:
    every query sees every earlier key, so tiles would save nothing."""
    if window_tokens is not None:
        requests = split_requests(requests, tile or tile_tokens(window_tokens))
    return sink_window_attention_ref(
        query, key_cache, value_cache, block_table, requests,
        sink_tokens=sink_tokens, window_tokens=window_tokens, **kwargs,
    )


def _flash_op():
    """torch's fused CPU attention that also returns the log-sum-exp (``None`` where this torch
    lacks it): the window part runs through it, the sinks are merged by their log-sum-exp."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def flash_serves(query: torch.Tensor, *, window_tokens: int | None, softcap: float | None) -> bool:
    """Whether :func:`sink_window_attention_flash` serves this call (else the tiled reference)."""
    return (
        window_tokens is not None and not softcap and query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.bfloat16, torch.float16) and _flash_op() is not None
    )


#: Band masks by ``(queries, keys, first key - first query, window)``: past eviction every full
#: tile of a stream has the same geometry, so a step builds its masks once, not per layer.
_MASKS: dict[tuple[int, int, int, int, int], torch.Tensor] = {}


def _band_mask(nq: int, nk: int, offset: int, window: int, group: int) -> torch.Tensor:
    """Additive mask ``[group * nq, nk]``: query ``t`` (position ``t``) sees key ``j`` (position
    ``offset + j``) iff ``t - window < offset + j <= t``; rows repeat per query head of a group."""
    key = (nq, nk, offset, window, group)
    mask = _MASKS.get(key)
    if mask is None:
        t = torch.arange(nq)[:, None]
        j = torch.arange(nk)[None, :] + offset
        visible = (j <= t) & (j > t - window)
        mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf")).repeat(group, 1)
        if len(_MASKS) >= 64:
            _MASKS.clear()
        _MASKS[key] = mask
    return mask


def sink_window_attention_flash(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    requests: list[RequestSlice],
    *,
    sink_tokens: int,
    window_tokens: int,
    scale: float,
    rope,
    rope_applied: bool = False,
    out: torch.Tensor | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """Same contract as :func:`sink_window_attention_ref` (no soft-capping, a window). Per
    request the operands are the reference's own (:func:`tile_operands`, the cache read once);
    per query tile the window keys it can see go through torch's fused CPU attention with a
    band mask, which returns the log-sum-exp ``lse_w``, and the ``S`` sink keys, met by their
    own query rotation, are merged in by it::

        o = (e^(lse_w - m) o_w + sum_i e^(s_i - m) v_i) / (e^(lse_w - m) + sum_i e^(s_i - m)),
        m = max(lse_w, max_i s_i)

    A tile starting inside the sinks (a stream's first queries, where a query may see no window
    key) runs the reference."""
    flash = _flash_op()
    num_heads = query.shape[1]
    kv_heads = key_cache.shape[1]
    group = num_heads // kv_heads
    tile = tile or flash_tile_tokens(window_tokens)
    if out is None:
        out = torch.empty_like(query)
    ref_tiles = []
    for req in requests:
        n = req.q_end - req.q_start
        if n <= 0:
            continue
        first = req.seq_len - n
        tiles = split_requests([req], tile)
        if first < sink_tokens:
            ref_tiles += [t for t in tiles if t.seq_len - (t.q_end - t.q_start) < sink_tokens]
            tiles = [t for t in tiles if t.seq_len - (t.q_end - t.q_start) >= sink_tokens]
            if not tiles:
                continue
            req = RequestSlice(tiles[0].q_start, req.q_end, req.seq_len, req.block_row)
            n, first = req.q_end - req.q_start, req.seq_len - (req.q_end - req.q_start)
        ops = tile_operands(query, key_cache, value_cache, block_table, req, sink_tokens=sink_tokens,
                            window_tokens=window_tokens, rope=rope, rope_applied=rope_applied)
        rest_lo = int(ops.pos_rest[0]) if ops.pos_rest.numel() else req.seq_len
        q_rest = ops.q_rest.view(n, kv_heads, group, -1).permute(1, 2, 0, 3)  # [Hkv, group, n, D]
        q_sink = ops.q_sink.view(n, kv_heads, group, -1).permute(1, 2, 0, 3)
        k_rest, v_rest = ops.k_rest.permute(1, 0, 2), ops.v_rest.permute(1, 0, 2)  # [Hkv, K, D]
        k_sink, v_sink = ops.k_sink.permute(1, 2, 0), ops.v_sink.permute(1, 0, 2)  # [Hkv, D, S], [Hkv, S, D]
        for t in tiles:
            a, b = t.q_start - req.q_start, t.q_end - req.q_start  # the tile's rows in the request
            nt = b - a
            lo = max(rest_lo, first + a - window_tokens + 1)  # its first visible window key
            ks, ke = lo - rest_lo, first + b - rest_lo
            qt = q_rest[:, :, a:b].reshape(1, kv_heads, group * nt, -1)
            o, lse = flash(qt, k_rest[None, :, ks:ke], v_rest[None, :, ks:ke], 0.0, False,
                           attn_mask=_band_mask(nt, ke - ks, lo - (first + a), window_tokens, group), scale=scale)
            o, lse = o[0], lse[0]  # [Hkv, group * nt, D], [Hkv, group * nt]
            if k_sink.shape[-1]:
                s = torch.bmm(q_sink[:, :, a:b].reshape(kv_heads, group * nt, -1), k_sink) * scale
                m = torch.maximum(lse, s.amax(dim=-1))
                w_win = torch.exp(lse - m)
                w_sink = torch.exp(s - m[..., None])
                o = (w_win[..., None] * o + torch.bmm(w_sink, v_sink)) / (w_win + w_sink.sum(dim=-1))[..., None]
            out[t.q_start : t.q_end] = o.view(kv_heads, group, nt, -1).permute(2, 0, 1, 3).reshape(nt, num_heads, -1)
    if ref_tiles:
        sink_window_attention_ref(query, key_cache, value_cache, block_table, ref_tiles, sink_tokens=sink_tokens,
                                  window_tokens=window_tokens, scale=scale, rope=rope, rope_applied=rope_applied,
                                  out=out)
    return out


def sink_window_attention(*args, **kwargs) -> torch.Tensor:
    """Dispatcher for prefill chunks: on CPU with a window and no soft-capping, the fused path
    (:func:`sink_window_attention_flash`); otherwise the tiled reference (Triton kernels serve
    the plugin's own pages on CUDA, ``kv_quant_triton``)."""
    query = args[0] if args else kwargs["query"]
    if flash_serves(query, window_tokens=kwargs.get("window_tokens"), softcap=kwargs.get("softcap")):
        kwargs.pop("softcap", None)
        return sink_window_attention_flash(*args, **kwargs)
    return sink_window_attention_tiled(*args, **kwargs)
