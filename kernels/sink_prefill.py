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

from vllm_kvstream.kernels.sink_attention import RequestSlice, sink_window_attention_ref


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


def sink_window_attention(*args, **kwargs) -> torch.Tensor:
    """Dispatcher for prefill chunks: the tiled reference everywhere until a Triton kernel is
    registered for CUDA."""
    return sink_window_attention_tiled(*args, **kwargs)
