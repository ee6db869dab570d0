"""Bandwidth of the quantized-KV Triton kernels, beside their torch reference and a bf16 baseline.

Runs standalone (torch + triton, no vLLM): the GPU machine lent by the ``device`` tool has no
vLLM, so the kernels package is loaded from this checkout's ``kernels/`` folder when the
plugin is not installed. Prints, per bit width:

* store: GB/s of quantize-and-store (bytes read: the bf16 keys and values; bytes written: the
  pages), the ratio to the float32 torch reference, and the fraction of ``--peak-gbps``;
* decode attention at ``--tokens`` cached tokens per request: GB/s of pages read, time, and
  the speed ratio to bf16 decode attention over the same tokens (torch SDPA on a contiguous
  bf16 cache: the fastest bf16 read there is, no paging), to the same kernel over 16-bit
  (bf16) pages (row ``16``), and to the torch reference. The kernel splits long caches
  across programs (split-K) when requests x KV heads leave SMs idle.

    python examples/bench_kv_quant_kernels.py [--tokens 32768] [--requests 8] [--peak-gbps 3350]

On CPU (no CUDA) only the torch references run, at small sizes, and the Triton columns read
"-": Triton has no CPU backend.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch


def _load_kernels():
    try:
        import vllm_kvstream.kernels as k

        return k
    except ImportError:  # the device machine: no plugin install, load kernels/ from the checkout
        import types

        root = Path(__file__).resolve().parents[1]
        pkg = types.ModuleType("vllm_kvstream")
        pkg.__path__ = []
        sys.modules["vllm_kvstream"] = pkg
        spec = importlib.util.spec_from_file_location(
            "vllm_kvstream.kernels", root / "kernels" / "__init__.py", submodule_search_locations=[str(root / "kernels")]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["vllm_kvstream.kernels"] = mod
        spec.loader.exec_module(mod)
        return mod


def _time(fn, device, repeats: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=None, help="cached tokens per request (default 32768, CPU 512)")
    ap.add_argument("--requests", type=int, default=None, help="decode batch (default 8, CPU 2)")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--peak-gbps", type=float, default=None, help="the GPU's memory bandwidth (H100 SXM: 3350)")
    args = ap.parse_args()
    k = _load_kernels()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = args.tokens or (32768 if device == "cuda" else 512)
    reqs = args.requests or (8 if device == "cuda" else 2)
    H, G, D, bs = args.kv_heads, args.group, args.head_size, args.block_size
    nblk = tokens // bs
    rope = k.Rope.from_base(D, 10000.0, tokens + 1)
    rope_dev = k.Rope(rope.rotary_dim, rope.is_neox_style, rope.cos_sin_cache.to(device), rope.inv_freq.to(device))
    rows = []
    for bits in (16, 8, 4):
        # The plugin's default layouts: INT4 with per-channel key zero points and NF4 values;
        # 16: unquantized bf16 pages through the same kernels (the baseline they must beat).
        if bits == 16:
            L = k.QuantLayout(16, D, bs, align=bs, sink_tokens=0, float_dtype="bfloat16")
        else:
            L = k.QuantLayout(bits, D, bs, align=bs, key_zero_point=bits == 4,
                              value_levels="nf4" if bits == 4 else "uniform")
        cache = torch.zeros(reqs * nblk, H, L.head_bytes, dtype=torch.uint8, device=device)
        n_store = reqs * tokens if device == "cuda" else tokens
        key = torch.randn(n_store, H, D, device=device, dtype=torch.bfloat16)
        val = torch.randn(n_store, H, D, device=device, dtype=torch.bfloat16)
        pos = torch.arange(n_store, device=device) % tokens
        slots = torch.arange(n_store, device=device)
        stats = k.QuantStats.empty(H, D, device=device)
        store_bytes = 2 * key.numel() * 2 + (n_store // bs) * L.page_bytes(H)
        t_store = t_store_ref = None
        if device == "cuda":
            t_store = _time(lambda: k.quant_store(key, val, cache, slots, pos, stats, L), device, args.repeats)
        n_ref = min(n_store, 8 * bs)  # the reference loops over blocks in Python: time a slice, scale up
        t_ref_part = _time(
            lambda: k.quant_write_ref(key[:n_ref], val[:n_ref], cache, slots[:n_ref], pos[:n_ref], stats, L, rope=None),
            device, 2,
        )
        t_store_ref = t_ref_part * n_store / n_ref
        if device != "cuda":  # fill the pages for the attention run
            k.quant_write_ref(key, val, cache, slots, pos, stats, L, rope=None)
        # Decode: one query per request over all its blocks.
        q = torch.randn(reqs, H * G, D, device=device)
        blocks = torch.arange(reqs * nblk, device=device).view(reqs, nblk)
        starts = torch.zeros(reqs, nblk, dtype=torch.int32, device=device)
        ends = torch.full((reqs, nblk), bs, dtype=torch.int32, device=device)
        ranks = (torch.arange(nblk, device=device, dtype=torch.int32) * bs)[None].expand(reqs, -1).contiguous()
        scale = 1 / math.sqrt(D)
        read_bytes = reqs * nblk * L.page_bytes(H)
        t_dec = None
        if device == "cuda":
            t_dec = _time(
                lambda: k.quant_decode_attention(q, cache, blocks, starts, ends, ranks, L, scale=scale, rope=rope_dev),
                device, args.repeats,
            )
        t_dec_ref = _time(
            lambda: k.quant_decode_attention_ref(q[:1].cpu(), cache.cpu(), blocks[:1].cpu(), starts[:1].cpu(),
                                                 ends[:1].cpu(), ranks[:1].cpu(), L, scale=scale, rope=rope),
            "cpu", 1,
        ) * reqs
        kb = torch.randn(reqs, H * G, tokens, D, device=device, dtype=torch.bfloat16)
        vb = torch.randn_like(kb)
        qb = torch.randn(reqs, H * G, 1, D, device=device, dtype=torch.bfloat16)
        kb, vb = kb[:, ::G].contiguous(), vb[:, ::G].contiguous()  # the KV heads, shared by G query heads
        sdpa = torch.nn.functional.scaled_dot_product_attention
        t_bf16 = _time(lambda: sdpa(qb, kb.repeat_interleave(G, 1), vb.repeat_interleave(G, 1)) if device != "cuda"
                       else sdpa(qb, kb, vb, enable_gqa=True), device, args.repeats)
        rows.append((bits, store_bytes, t_store, t_store_ref, read_bytes, t_dec, t_dec_ref, t_bf16))

    peak = args.peak_gbps
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (torch references only)'}; "
          f"{reqs} requests x {tokens} tokens, {H} KV heads x {G}, head {D}, block {bs}")
    print("| bits | store GB/s | of peak | vs torch ref | decode ms | decode GB/s | of peak | vs bf16 SDPA "
          "| vs 16-bit pages | vs torch ref |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    t16 = rows[0][5]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for bits, sb, ts, tsr, rb, td, tdr, tb in rows:
        gbs_s = sb / ts / 1e9 if ts else None
        gbs_d = rb / td / 1e9 if td else None
        print(
            f"| {bits} | {f(gbs_s, '.0f')} | {f(gbs_s / peak if gbs_s and peak else None, '.0%')} | "
            f"{f(tsr / ts if ts else None, '.0f')}x | {f(td * 1e3 if td else None, '.3f')} | {f(gbs_d, '.0f')} | "
            f"{f(gbs_d / peak if gbs_d and peak else None, '.0%')} | {f(tb / td if td else None, '.2f')}x | "
            f"{f(t16 / td if td and t16 else None, '.2f')}x | {f(tdr / td if td else None, '.0f')}x |"
        )


if __name__ == "__main__":
    main()
