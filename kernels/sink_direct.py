"""Decode past eviction read *directly*: each request's sink and window slots scored where
they lie in vLLM's CPU cache, by the compiled pass topk-importance's steady decode uses
(``csrc/selected_decode.c``), with no gather, no sink copies and no second kernel.

The pass reads, per request, a list of entries, each a block and a slot range of it, and
rotates the query back by each entry's shift (``<R(-e) q, k> = <q, R(e) k>``: the sinks met at
StreamingLLM's cache-relative distance, see ``sink_decode.py``). A request past eviction at
position ``p`` (``e = p - W + 1 - S > 0`` tokens evicted, window ``[lo, p]``, ``lo = p - W + 1``):

    entries:   [sink block 0: slots 0..S) ... | F: slots u..B) | F+1: 0..B) ... | L: 0..t)
    shift:      e                        e    | 0              | 0              | 0
    (u = lo - F B dead slots of the window's first block, t = p - L B + 1 cached slots of
    the last; sinks past one block take several entries; one block may be two entries, the
    sinks' and the window's, when the window starts in the sink block)

A request that has evicted nothing reads blocks ``0 .. L`` (``[0, B)``, the last ``[0, t)``),
shift 0. Rows are padded to the batch's widest with empty entries (``lo = hi = 0``) on a block
the request holds; the pass reads nothing of them. Nothing else is dereferenced: dead slots,
free slots past ``t`` and blocks the scheduler freed never reach a score or a value, so they
may hold anything (a block's row is only loaded from ``lo`` on; lanes past ``hi`` inside the
row are loaded and dropped). Unlike the in-place layout (``sink_in_place.py``) nothing is
written, so blocks shared through the prefix cache are read the same way.

The plan (:func:`plan_direct`) is built once per step for every layer; :func:`sink_direct_decode`
is one compiled call per layer. The oracle is :func:`~vllm_kvstream.kernels.sink_attention.
sink_window_attention_ref` (tested beside :func:`~vllm_kvstream.kernels.sink_decode.sink_window_decode`,
the torch path that serves caches the pass does not: float16, or no compiler).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvstream.kernels import cpu_ext
from vllm_kvstream.kernels.rope import Rope


@dataclass(frozen=True, eq=False)
class DirectPlan:
    """One decode step's entries (built by :func:`plan_direct`), shared by all layers."""

    rows: torch.Tensor  # [R] long: each request's query row in the packed batch
    blocks: torch.Tensor  # [R, M] long: the block of each entry (padding: a block the request holds)
    lo: torch.Tensor  # [R, M] long: first slot of each entry
    hi: torch.Tensor  # [R, M] long: end slot (``lo == hi``: an empty entry)
    cos: torch.Tensor | None  # [R, M, rotary_dim // 2]: each entry's rotation by -shift (None: none)
    sin: torch.Tensor | None
    block_size: int
    rotary_dim: int
    neox: bool
    #: The compiled pass's arguments, bound on the first call per (scale, cache dtype, block
    #: shape): every layer of a step shares them.
    calls: dict


def plan_direct(
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    tables: torch.Tensor,
    *,
    sink_tokens: int,
    window_tokens: int | None,
    block_size: int,
    rope: Rope | None,
) -> DirectPlan:
    """Plan a decode step for R requests: ``rows`` [R] query rows; ``seq_lens`` [R] tokens
    including the one decoded; ``tables`` [R, max_blocks] block-table rows. ``window_tokens``
    ``None``: nothing is evicted (``full``)."""
    S, B = int(sink_tokens), int(block_size)
    rows = rows.to(torch.long)
    p = seq_lens.to(torch.long) - 1
    R = len(p)
    if window_tokens is None:
        e = torch.zeros_like(p)
    else:
        e = (p - int(window_tokens) + 1 - S).clamp_min(0)
    evicting = e > 0
    lo_tok = torch.where(evicting, p - (int(window_tokens or 0)) + 1, torch.zeros_like(p))
    F, L = lo_tok // B, p // B
    c = L - F + 1
    sb = -(-S // B) if bool(evicting.any()) else 0
    n_win = int(c.max()) if R else 1
    j = torch.arange(n_win)[None, :]
    win_logical = torch.minimum(F[:, None] + j, L[:, None])  # past L: L again, an empty entry
    win_lo = torch.where(j == 0, (lo_tok - F * B)[:, None], torch.zeros_like(win_logical))
    win_hi = torch.where(j < (c - 1)[:, None], B, torch.where(j == (c - 1)[:, None], (p - L * B + 1)[:, None], 0))
    win_lo = torch.where(j < c[:, None], win_lo, 0)
    if sb:
        i = torch.arange(sb)[None, :]
        sink_hi = torch.where(evicting[:, None], (S - i * B).clamp(max=B), 0).expand(R, sb)
        logical = torch.cat((torch.minimum(i, L[:, None]), win_logical), 1)  # short rows: blocks they hold
        lo = torch.cat((torch.zeros(R, sb, dtype=torch.long), win_lo), 1)
        hi = torch.cat((sink_hi, win_hi), 1)
    else:
        logical, lo, hi = win_logical, win_lo, win_hi
    blocks = tables.to(torch.long).gather(1, logical.clamp_max(tables.shape[1] - 1))
    cos = sin = None
    rotary_dim, neox = 0, True
    if sb and rope is not None:
        rotary_dim, neox = rope.rotary_dim, bool(rope.is_neox_style)
        ce, se = rope.cos_sin(-e)  # [R, rd / 2]
        half = ce.shape[-1]
        cos = torch.ones(R, lo.shape[1], half, dtype=torch.float32)
        sin = torch.zeros(R, lo.shape[1], half, dtype=torch.float32)
        cos[:, :sb] = ce.float()[:, None]
        sin[:, :sb] = se.float()[:, None]
    return DirectPlan(rows, blocks, lo, hi, cos, sin, B, rotary_dim, neox, {})


def can_read_direct(kv_cache_dtype: torch.dtype) -> bool:
    """Whether the compiled pass serves caches of this dtype here (float32 or bfloat16, and
    the helpers built); callers use :func:`~vllm_kvstream.kernels.sink_decode.sink_window_decode`
    otherwise."""
    return kv_cache_dtype in (torch.float32, torch.bfloat16) and cpu_ext.library() is not None


def sink_direct_decode(query: torch.Tensor, kv_cache: torch.Tensor, plan: DirectPlan, *, scale: float,
                       out: torch.Tensor) -> torch.Tensor:
    """``query`` [T, heads, D] (rotated at absolute positions); ``kv_cache`` one layer's cache
    in vLLM's CPU layout (``split_cpu_kv_cache``), float32 or bfloat16 with each block's heads
    dense (``cpu_ext.can_stage``). Writes rows ``plan.rows`` of ``out``."""
    if kv_cache.shape[2] != plan.block_size:
        raise ValueError(f"cache block size {kv_cache.shape[2]} != planned block size {plan.block_size}")
    key = (float(scale), kv_cache.dtype, tuple(kv_cache.shape[1:]))
    call = plan.calls.get(key)
    if call is None:  # checked once per step and key: every layer's cache has the same layout
        if not cpu_ext.can_stage(kv_cache):
            raise ValueError(f"vllm-kvstream: the direct decode reads float32 or bfloat16 caches in vLLM's CPU "
                             f"layout with the compiled helpers built; got {kv_cache.dtype} (can_read_direct says where)")
        counts = torch.full((len(plan.rows),), plan.blocks.shape[1], dtype=torch.long)
        call = plan.calls[key] = cpu_ext.SelectedCall(
            kv_cache, plan.rows, plan.blocks, counts, None, plan.cos, plan.sin, rotary_dim=plan.rotary_dim,
            neox=plan.neox, scale=scale, los=plan.lo, his=plan.hi,
        )
    call(query, kv_cache, out)
    return out
