"""Microbenchmark: the CPU helpers (``kernels/csrc``) against the torch ops they replace, per
layer and decode step at a batch of 8 streams past eviction (SmolLM2's shapes: 3 KV heads,
group 3, head 64, block 128; streaming-sink 128+896 as ``align="block"`` runs 4+1020).

Prints, per op, the best of 3 rounds of the mean time over ``--iters`` calls, torch then C,
and the ratio:

* ``stage sinks``: the in-place decode's sink copies (``kernels/sink_in_place.py``), float32;
* ``topk decode``: ``topk-importance``'s steady decode over each request's kept blocks
  (``selected_decode_cpu``), float32;
* ``INT4 decode``: one query per request over the quantized pages (``quant_sink_window_decode_cpu``);
* ``INT4 store``: 8 decode tokens, one per block, with and without channel ranges growing;
* ``INT4 prefill store``: a 2048-token chunk, the reference's block loop against the store's
  whole-block path (both torch: the row's "C" column is the batched torch form).

    python examples/bench_cpu_helpers.py [--iters 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time


def best(f, iters: int) -> float:
    f()
    out = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(iters):
            f()
        out.append((time.perf_counter() - t) / iters * 1e3)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="torch (and OpenMP) threads")
    args = ap.parse_args()
    import torch

    from vllm_kvstream.kernels import cpu_ext
    from vllm_kvstream.kernels.kv_quant import (
        PageView,
        QuantLayout,
        QuantStats,
        quant_sink_window_decode_cpu,
        quant_write_cpu,
        quant_write_ref,
    )
    from vllm_kvstream.kernels.rope import Rope
    from vllm_kvstream.kernels.sink_decode import plan_decode
    from vllm_kvstream.kernels.sink_in_place import plan_in_place, stage_sinks_
    from vllm_kvstream.kernels.topk_attention import evicted_after, plan_selected_decode, selected_decode_cpu

    if cpu_ext.library() is None:
        raise SystemExit("no C compiler (or VLLM_KVSTREAM_CPU_EXT=0): nothing to compare")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    H, G, D, B, S, W, E = 3, 3, 64, 128, 128, 896, 8
    rope = Rope.from_base(D, 100000.0, 8192)
    rows = [("op", "torch ms", "C ms", "C / torch")]

    # Stage sinks: float32 cache of 4000 blocks, 8 evicting requests at ~4K tokens.
    nb = 4000
    kv = torch.randn(nb, H, B, 2 * D, generator=gen)
    tables = torch.randperm(nb, generator=gen)[: E * 40].view(E, 40)
    seq = torch.tensor([4096 + 37 * i for i in range(E)])
    plan = plan_in_place(torch.arange(E), seq, tables, sink_tokens=S, window_tokens=W, block_size=B, rope=rope,
                         private_blocks=True)
    t_torch = best(lambda: stage_sinks_(kv, plan, rope, compiled=False), args.iters)
    t_c = best(lambda: stage_sinks_(kv, plan, rope, compiled=True), args.iters)
    rows.append(("stage sinks (all values)", t_torch, t_c, t_c / t_torch))

    # topk-importance's steady decode: 8 requests keeping 8 blocks each (sink block, 3 chosen
    # blocks with gaps between them, 4 recent blocks), float32 cache, queries rotated back per block.
    kept = torch.tensor([0, 3, 7, 12, 20, 21, 22, 23])
    shift = (evicted_after(kept) * B).expand(E, -1).contiguous()
    sel_blocks = torch.randperm(nb, generator=gen)[: E * 8].view(E, 8)
    sel_plan = plan_selected_decode(torch.arange(E), torch.full((E,), 8), torch.full((E,), 37), width=8, block_size=B)
    cs = rope.cos_sin(-shift.reshape(-1))
    cs = (cs[0].view(E, 8, -1), cs[1].view(E, 8, -1))
    sq = torch.randn(E, H * G, D, generator=gen)
    sout = torch.zeros(E, H * G, D)

    def selected(compiled):
        return lambda: selected_decode_cpu(sq, kv, sel_plan, sel_blocks, shift, scale=0.125, rope=rope, out=sout,
                                           shift_cos_sin=cs, compiled=compiled)

    t_torch, t_c = best(selected(False), args.iters), best(selected(True), args.iters)
    rows.append(("topk decode, 8 x 8 blocks", t_torch, t_c, t_c / t_torch))

    # INT4 pages (zero point, NF4 values), 8 requests x 9 pages.
    L = QuantLayout(bits=4, head_size=D, block_size=B, key_zero_point=True, value_levels="nf4")
    pages = torch.randint(0, 256, (200, H, L.head_bytes), dtype=torch.uint8, generator=gen)
    view = PageView(pages, L)
    view.k_scale.copy_(torch.rand(view.k_scale.shape, generator=gen).half() + 0.5)
    view.k_zero.copy_(-torch.rand(view.k_zero.shape, generator=gen).half() - 0.5)
    view.v_scale.copy_(torch.rand(view.v_scale.shape, generator=gen).half())
    view.sink_scale.zero_()
    view.out_idx.copy_(torch.randint(0, D, view.out_idx.shape, dtype=torch.uint8, generator=gen))
    qtables = torch.randperm(200, generator=gen)[: E * 24].view(E, 24)
    dplan = plan_decode(torch.arange(E), seq, qtables, sink_tokens=S, window_tokens=W, block_size=B, rope=None,
                        pad_block=None)
    q = torch.randn(E, H * G, D, generator=gen)
    out = torch.zeros(E, H * G, D)

    def decode(compiled):
        return lambda: quant_sink_window_decode_cpu(q, pages, dplan, L, scale=0.125, rope=rope, out=out,
                                                    compiled=compiled)

    t_torch, t_c = best(decode(False), args.iters), best(decode(True), args.iters)
    rows.append(("INT4 decode, 8 x 1024 tokens", t_torch, t_c, t_c / t_torch))

    # INT4 store: 8 streams prefilled with 100 tokens, then 20 decode steps of one token each.
    srows = torch.randperm(64, generator=gen).view(E, -1)
    base = torch.zeros(64, H, L.head_bytes, dtype=torch.uint8)
    stats = QuantStats.empty(H, D)
    for r in range(E):
        pos = torch.arange(100)
        quant_write_cpu(rope.rotate(torch.randn(100, H, D, generator=gen), pos), torch.randn(100, H, D, generator=gen),
                        base, srows[r][pos // B] * B + pos % B, pos, stats, L, rope=rope)
    for label, mult in (("INT4 store, ranges kept", 0.1), ("INT4 store, ranges grow", 1.0)):
        ks = [rope.rotate(torch.randn(E, H, D, generator=gen) * mult, torch.full((E,), 100 + i)) for i in range(20)]
        vs = [torch.randn(E, H, D, generator=gen) for _ in range(20)]
        times = []
        for compiled in (False, True):
            cache, st = base.clone(), QuantStats.empty(H, D)
            for a, b in ((st.ema_absmax, stats.ema_absmax), (st.ema_min, stats.ema_min), (st.ema_max, stats.ema_max)):
                a.copy_(b)
            t = time.perf_counter()
            for i in range(20):
                pos = torch.full((E,), 100 + i)
                quant_write_cpu(ks[i], vs[i], cache, srows[:, 0] * B + pos % B, pos, st, L, rope=rope, compiled=compiled)
            times.append((time.perf_counter() - t) / 20 * 1e3)
        rows.append((label, times[0], times[1], times[1] / times[0]))

    # INT4 prefill store: one 2048-token chunk past the sinks (16 whole blocks), the reference's
    # block-by-block loop against quant_write_cpu (whole blocks encoded together; torch both).
    T, first = 2048, 8192
    ppos = torch.arange(first, first + T)
    pk = rope.rotate(torch.randn(T, H, D, generator=gen), ppos)
    pv = torch.randn(T, H, D, generator=gen)
    prow = torch.randperm(400, generator=gen)[:100]
    pslots = prow[ppos // B] * B + ppos % B
    pcache = torch.zeros(400, H, L.head_bytes, dtype=torch.uint8)
    t_loop = best(lambda: quant_write_ref(pk, pv, pcache, pslots, ppos, QuantStats.empty(H, D), L, rope=rope),
                  max(1, args.iters // 10))
    t_whole = best(lambda: quant_write_cpu(pk, pv, pcache, pslots, ppos, QuantStats.empty(H, D), L, rope=rope),
                   max(1, args.iters // 10))
    rows.append(("INT4 prefill store, 2048 tokens (loop -> whole blocks, torch)", t_loop, t_whole, t_whole / t_loop))

    lines = [f"| {rows[0][0]} | {rows[0][1]} | {rows[0][2]} | {rows[0][3]} |", "|---|---|---|---|"]
    lines += [f"| {op} | {a:.3f} | {b:.3f} | {r:.2f} |" for op, a, b, r in rows[1:]]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
