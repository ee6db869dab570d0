"""Decode past eviction read *in place*, by a stock paged kernel with a sliding window: the
plan that lays a sink + window request out so that vLLM's own CPU attention kernel (one query
per request, a block table, a sequence length and a sliding window of ``w`` tokens: it attends
the last ``w`` positions of the sequence) reads exactly the tokens the policy keeps, at
StreamingLLM's distances, without gathering the window.

The trick: a decoding request past eviction holds its window's blocks ``F .. L`` in place.
The first one, ``F``, starts with ``u`` dead slots (tokens the window has left; no later query
of this request reads them) and the last one, ``L``, ends with ``B - t`` free slots (not
written yet; the cache write of a later token overwrites them before anyone reads them). The
plan copies the ``S`` sink tokens, keys rotated forward by the evicted count ``e`` (so that the
query at ``p`` meets sink ``i`` at distance ``S + W - 1 - i``, see ``sink_decode.py``), into those
slots, and hands the kernel the window's blocks as the request's block table:

    request's blocks:  [sink] ... evicted ... [F: dead u | window] [window] [L: window t | free]
    case A (S <= B - t):                      [F: masked | window] [window] [L: window t | sinks S]
                         seq_len = (c - 1) B + t + S, sliding window S + W masks F's u dead slots
    case B (otherwise, F private):   [F: masked | sinks k | window] [window] [L: window t | sinks]
                         seq_len = c B; the sinks fill L's free slots, the other k go just before
                         F's window tokens, and the sliding window S + W masks what is left;
                         slot s of L or F holds sink B - 1 - s (+ u - t in F), the same sink
                         every step, so value copies made once stay valid (see plan_in_place)

Attention does not depend on the order of the keys, so every query attends exactly the
``S + W`` tokens of the policy. Only slots that no reader can need are written:

* ``L``'s free slots belong to a block that is not full, hence not in the prefix cache and not
  shared; the token written there next step overwrites the copy (which the next step writes
  again, one slot further on).
* ``F``'s dead slots may be read by another request that shares ``F`` through the prefix
  cache (same prompt, behind in the stream), so case B is planned only where the caller says
  blocks are private (``private_blocks``: prefix caching off).

A request with no room (case B not allowed or ``k > u``, e.g. at the one step in ``B`` where
the window is block aligned) is left to the gathering path, as is anything the plan does
not cover. Requests that have evicted nothing are read from block 0 as they are.

Pure torch, no vLLM: the adapter runs the kernel; :func:`in_place_decode_ref` emulates it
(the test oracle of the layout), and :func:`stage_sinks_` writes the sink copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvstream.kernels import cpu_ext
from vllm_kvstream.kernels.rope import Rope
from vllm_kvstream.kernels.sink_decode import _rotate_keys_, split_cpu_kv_cache


@dataclass(frozen=True, eq=False)
class InPlacePlan:
    """One decode step's in-place layout (built by :func:`plan_in_place`)."""

    rows: torch.Tensor  # [R] long: the query rows it serves
    rest: torch.Tensor  # [X] long: indices (into the planned requests) it leaves to the gathering path
    block_table: torch.Tensor  # [R, nb] int32: per request, the blocks the kernel reads
    seq_lens: torch.Tensor  # [R] int32: the kernel's sequence length per request
    query_start_loc: torch.Tensor  # [R + 1] int32: 0, 1, ..., R (one query per request)
    window: int  # the kernel's sliding window, S + W tokens
    sink_blocks: torch.Tensor  # [E, ceil(S / B)] long: the sink blocks of the E evicting requests
    sink_dst: torch.Tensor  # [E * S] long: physical slot (block * B + offset) each sink is copied to
    sink_cos: torch.Tensor | None  # [E, rotary_dim // 2]: each evicting request's rotation by e(p)
    sink_sin: torch.Tensor | None
    block_size: int
    #: [E * S] bool, or ``None`` (all): the sinks whose *values* must be written this step; the
    #: others' value copies are already in place from the previous step (see :func:`plan_in_place`).
    value_mask: torch.Tensor | None = None
    #: ``(sink block, F, L) -> p`` of this step's case B requests: the next step's ``previous``.
    staged: dict | None = None
    #: Filled by the adapter: the kernel's scheduler metadata, shared by every layer.
    metadata: object = None


def plan_in_place(
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    tables: torch.Tensor,
    *,
    sink_tokens: int,
    window_tokens: int,
    block_size: int,
    rope: Rope | None,
    private_blocks: bool,
    previous: dict | None = None,
) -> InPlacePlan:
    """Plan decode requests (``rows`` [X], ``seq_lens`` [X] including the token decoded,
    ``tables`` [X, max_blocks] their block-table rows) of one sink + window pattern. Every
    request either is served (``plan.rows``) or listed in ``plan.rest``.

    Sink ``i`` goes to slot ``B - 1 - i`` of ``L`` while ``i < B - t``, the rest to ``F``'s dead
    slots counting down from ``u - 1`` (case B; case A puts them right after the window, slot
    ``t + i``, where the kernel's sequence ends): a slot keeps the same sink from one step to
    the next (``t`` and ``u`` both move on by one), so its *value* copy stays valid, and only
    the keys (rotated by an ``e`` that grows every step) must be rewritten. ``previous``: the
    last step's ``plan.staged`` (its case B requests); a case B request found there at
    ``p - 1`` with the same sink, ``F`` and ``L`` blocks (so none of them was freed in
    between: it held them) needs the value of one sink only, the one for ``F``'s newly dead
    slot (``plan.value_mask``)."""
    S, W, B = int(sink_tokens), int(window_tokens), int(block_size)
    rows = rows.to(torch.long)
    seq = seq_lens.to(torch.long)
    table = tables.to(torch.long)
    p = seq - 1
    e = p - W + 1 - S
    evicting = e > 0
    lo = p - W + 1
    F = torch.where(evicting, lo // B, torch.zeros_like(p))
    L = p // B
    c = L - F + 1
    u = torch.where(evicting, lo - F * B, torch.zeros_like(p))
    t = p - L * B + 1
    case_a = evicting & (S <= B - t)
    k = S - (B - t)  # sinks left for F in case B
    case_b = evicting & ~case_a & (c >= 2) & (F * B >= S) & (k <= u) & private_blocks
    served = ~evicting | case_a | case_b
    idx = torch.nonzero(served).flatten()
    rest = torch.nonzero(~served).flatten()

    F, L, c, u, t, e, k, seq = F[idx], L[idx], c[idx], u[idx], t[idx], e[idx], k[idx], seq[idx]
    case_a, case_b, evicting, table = case_a[idx], case_b[idx], evicting[idx], table[idx]
    n = len(idx)
    nb = int(c.max()) if n else 1
    logical = (F[:, None] + torch.arange(nb)[None, :]).clamp_max(table.shape[1] - 1)
    logical = torch.minimum(logical, L[:, None])  # past the request's last block: repeat it (never read)
    virtual = table.gather(1, logical)
    virtual_seq = torch.where(case_a, (c - 1) * B + t + S, torch.where(case_b, c * B, seq))

    # Sink copies: request r's sink i goes to L's free slot t + i, or (case B, past L's free
    # slots) to F's slot u - k + (i - (B - t)).
    ev = torch.nonzero(evicting).flatten()
    if S and len(ev):
        i = torch.arange(S)[None, :]
        t_e, u_e, k_e, F_e, L_e = t[ev, None], u[ev, None], k[ev, None], F[ev, None], L[ev, None]
        in_l = i < (B - t_e)
        mirrored = torch.where(in_l, L_e * B + B - 1 - i, F_e * B + u_e - 1 - (i - (B - t_e)))
        b_e = case_b[ev, None]
        dst_logical = torch.where(b_e, mirrored, L_e * B + t_e + i)  # case A: right after the window
        tab = table[ev]
        sink_blocks = tab[:, : -(-S // B)]
        sink_dst = (tab.gather(1, dst_logical // B) * B + dst_logical % B).reshape(-1)
        cos = sin = None
        if rope is not None:
            cos, sin = rope.cos_sin(e[ev])
        ids = torch.stack((tab[:, 0], tab.gather(1, F_e).flatten(), tab.gather(1, L_e).flatten(), seq[ev] - 1), 1)
        ids_b = [(a, f, l, p_, bool(b)) for (a, f, l, p_), b in zip(ids.tolist(), b_e.flatten().tolist())]
        staged = {(a, f, l): p_ for a, f, l, p_, b in ids_b if b}
        value_mask = None
        if previous:
            kept = torch.tensor([b and previous.get((a, f, l)) == p_ - 1 for a, f, l, p_, b in ids_b])
            if kept.any():  # those need F's newly dead slot u - 1 only: sink B - t (if k >= 1)
                fresh = (i == (B - t_e)) & (k_e >= 1)
                value_mask = torch.where(kept[:, None], fresh, torch.ones_like(fresh)).reshape(-1)
    else:
        sink_blocks = torch.zeros(0, max(1, -(-S // B)), dtype=torch.long)
        sink_dst = torch.zeros(0, dtype=torch.long)
        cos = sin = None
        staged, value_mask = {}, None
    return InPlacePlan(
        rows=rows[idx],
        rest=rest,
        block_table=virtual.to(torch.int32),
        seq_lens=virtual_seq.to(torch.int32),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        window=S + W,
        sink_blocks=sink_blocks,
        sink_dst=sink_dst,
        sink_cos=cos,
        sink_sin=sin,
        block_size=B,
        value_mask=value_mask,
        staged=staged,
    )


def sink_copies(kv_cache: torch.Tensor, plan: InPlacePlan, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's sink copies read from one layer's cache in vLLM's CPU layout: keys rotated
    by ``e(p)`` and values, each ``[E * S, kv_heads, head_size]`` in ``plan.sink_dst``'s order.
    One block gather (the sink blocks, whole), then a transpose of the keys to token rows."""
    E, sb = plan.sink_blocks.shape
    _, kv_heads, B, two_d = kv_cache.shape
    D = two_d // 2
    S = plan.sink_dst.numel() // max(E, 1)
    raw = kv_cache.index_select(0, plan.sink_blocks.reshape(-1)).view(E, sb, kv_heads, 2, D * B)
    kt = raw[:, :, :, 0].view(E, sb, kv_heads, D, B)  # keys transposed per block: [D, B]
    if plan.sink_cos is not None and rope is not None:  # in place on the gathered copy
        c = plan.sink_cos.to(kt.dtype)[:, None, None, :, None]
        s = plan.sink_sin.to(kt.dtype)[:, None, None, :, None]
        _rotate_keys_(kt if S > B else kt[..., :S], c, s, rope)
    k = kt.permute(0, 1, 4, 2, 3).reshape(E, sb * B, kv_heads, D)
    v = raw[:, :, :, 1].view(E, sb, kv_heads, B, D).permute(0, 1, 3, 2, 4).reshape(E, sb * B, kv_heads, D)
    # contiguous: the reshapes are views when one request has one sink block, and vLLM's
    # cache writer wants unit stride in head_size.
    k = k[:, :S].reshape(E * S, kv_heads, D).contiguous()
    v = v[:, :S].reshape(E * S, kv_heads, D).contiguous()
    return k, v


def stage_sinks_(kv_cache: torch.Tensor, plan: InPlacePlan, rope: Rope | None, write=None, *,
                 compiled: bool = True) -> None:
    """Write the plan's sink copies (:func:`sink_copies`) into their slots of one layer's cache
    (vLLM's CPU layout). With ``compiled`` and a cache the compiled helper serves
    (``cpu_ext.can_stage``: float32 or bfloat16), one pass in C (``csrc/stage_sinks.c``) that
    skips the value copies still in place (``plan.value_mask``). Otherwise torch writes every
    copy: ``write(keys, values, slots)`` is the cache writer (the adapter passes vLLM's),
    default torch indexing through :func:`split_cpu_kv_cache`. Every source is read before
    any destination is written (sources and destinations are distinct blocks)."""
    if plan.sink_dst.numel() == 0:
        return
    if compiled and cpu_ext.can_stage(kv_cache):
        rotate = plan.sink_cos is not None and rope is not None
        cpu_ext.stage_sinks(kv_cache, plan.sink_blocks, plan.sink_dst, plan.sink_cos if rotate else None,
                            plan.sink_sin if rotate else None, rotary_dim=rope.rotary_dim if rotate else 0,
                            neox=bool(rope.is_neox_style) if rotate else True, value_mask=plan.value_mask)
        return
    k, v = sink_copies(kv_cache, plan, rope)
    if write is not None:
        write(k, v, plan.sink_dst)
        return
    keys, values = split_cpu_kv_cache(kv_cache)
    B = plan.block_size
    db, do = plan.sink_dst // B, plan.sink_dst % B
    keys[db, :, do] = k
    values[db, :, do] = v


def in_place_decode_ref(
    query: torch.Tensor, kv_cache: torch.Tensor, plan: InPlacePlan, *, scale: float, out: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """What the stock kernel computes on the plan's layout (after :func:`stage_sinks_`): each
    served request's query attends the last ``plan.window`` of its ``plan.seq_lens`` virtual
    positions, read through ``plan.block_table``. float32, one request at a time (the oracle)."""
    keys, values = split_cpu_kv_cache(kv_cache)
    B = plan.block_size
    kv_heads = keys.shape[1]
    for r, row in enumerate(plan.rows.tolist()):
        n = int(plan.seq_lens[r])
        pos = torch.arange(max(0, n - plan.window), n)
        blk = plan.block_table[r].long()[pos // B]
        k = keys[blk, :, pos % B].float()  # [n, kv_heads, D]
        v = values[blk, :, pos % B].float()
        q = query[row].float().view(kv_heads, -1, query.shape[-1])  # [kv_heads, group, D]
        s = torch.einsum("hgd,nhd->hgn", q, k) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        o = torch.einsum("hgn,nhd->hgd", s.softmax(-1), v)
        out[row] = o.reshape(out.shape[1:]).to(out.dtype)
    return out
