"""The Triton JIT functions of ``kv_quant_triton`` (imported on first use, so that
``TRITON_INTERPRET`` set by a test before that takes effect: Triton reads it when a function
is decorated)."""

import triton
import triton.language as tl


@triton.jit
def _load_f16(base, idx, mask):
    return tl.load(base.to(tl.pointer_type(tl.float16)) + idx, mask=mask, other=0.0).to(tl.float32)

@triton.jit
def _chan(i, NEOX: tl.constexpr, HALF: tl.constexpr):
    if NEOX:
        return i, i + HALF
    else:
        return 2 * i, 2 * i + 1

@triton.jit
def _encode(x, absmax, QMAX: tl.constexpr):
    scale = tl.where(absmax > 0, absmax / QMAX, 1.0)
    q = tl.floor(x / scale + 0.5)
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    return (q + QMAX + 1).to(tl.int32)

@triton.jit
def _encode_range(x, lo, hi, TOP: tl.constexpr):
    step = tl.where(hi > lo, (hi - lo) / TOP, 1.0)
    q = tl.floor((x - lo) / step + 0.5)
    return tl.minimum(tl.maximum(q, 0.0), TOP).to(tl.int32)

@triton.jit
def _dequant(c1, c2, lo1, lo2, hi1, hi2, BITS: tl.constexpr, KZP: tl.constexpr):
    """Main key codes (signed, from ``_load_main``) back to values with the channel range
    (``[lo, hi]`` with a zero point; ``+-hi`` otherwise, ``lo`` unused)."""
    QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
    TOP: tl.constexpr = 2 ** BITS - 1
    if KZP:  # codes 0..TOP across the channel's [min, max]
        k1 = lo1[None, :] + (c1 + (QMAX + 1)) * ((hi1 - lo1)[None, :] / TOP)
        k2 = lo2[None, :] + (c2 + (QMAX + 1)) * ((hi2 - lo2)[None, :] / TOP)
    else:
        k1 = c1 * (hi1[None, :] / QMAX)
        k2 = c2 * (hi2[None, :] / QMAX)
    return k1, k2

@triton.jit
def _at(ch1, ch2, cho, x1, x2):
    """Channel ``cho``'s entry of a per-channel vector held as its two halves ``x1``, ``x2``
    (channels ``ch1``, ``ch2``), as a scalar."""
    return tl.sum(tl.where(ch1 == cho, x1, 0.0), axis=0) + tl.sum(tl.where(ch2 == cho, x2, 0.0), axis=0)

@triton.jit
def _load_floats(page, rows, rmask, ch, CODES_OFF: tl.constexpr, D: tl.constexpr, BF16: tl.constexpr):
    """16-bit pages: channels ``ch`` of ``rows`` as float32 (channels stored in order)."""
    if BF16:
        base = page.to(tl.pointer_type(tl.bfloat16))
    else:
        base = page.to(tl.pointer_type(tl.float16))
    return tl.load(base + CODES_OFF // 2 + rows[:, None] * D + ch[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)

@triton.jit
def _load_main(page, rows, rmask, i, CODES_OFF: tl.constexpr, BITS: tl.constexpr, HALF: tl.constexpr):
    """Main codes of ``rows`` as two halves of signed integers (float32)."""
    if BITS == 8:
        base = page + CODES_OFF + rows[:, None] * (2 * HALF) + i[None, :]
        c1 = tl.load(base, mask=rmask[:, None], other=128).to(tl.float32) - 128.0
        c2 = tl.load(base + HALF, mask=rmask[:, None], other=128).to(tl.float32) - 128.0
    else:
        byte = tl.load(page + CODES_OFF + rows[:, None] * HALF + i[None, :], mask=rmask[:, None], other=0x88)
        byte = byte.to(tl.int32)
        c1 = (byte & 0xF).to(tl.float32) - 8.0
        c2 = (byte >> 4).to(tl.float32) - 8.0
    return c1, c2

@triton.jit
def _block_keys(page, s, rows, i, ch1, ch2, HALF: tl.constexpr, BITS: tl.constexpr, S: tl.constexpr,
                NOUT: tl.constexpr, KZP: tl.constexpr, K_ZERO_OFF: tl.constexpr, K_SCALE_OFF: tl.constexpr,
                K_CODES_OFF: tl.constexpr, SINK_SCALE_OFF: tl.constexpr, SINK_K_OFF: tl.constexpr,
                OUT_IDX_OFF: tl.constexpr, OUT_K_OFF: tl.constexpr, BF16: tl.constexpr):
    """Pre-RoPE keys of slots ``rows`` of one page, as the two channel halves ``[BT, HALF]``:
    main codes, then outlier channels and sink slots from their own sections."""
    D: tl.constexpr = 2 * HALF
    f16 = page.to(tl.pointer_type(tl.float16))
    if BITS == 16:
        k1 = _load_floats(page, s, rows, ch1, K_CODES_OFF, D, BF16)
        k2 = _load_floats(page, s, rows, ch2, K_CODES_OFF, D, BF16)
    else:
        kab1 = tl.load(f16 + K_SCALE_OFF // 2 + ch1).to(tl.float32)
        kab2 = tl.load(f16 + K_SCALE_OFF // 2 + ch2).to(tl.float32)
        c1, c2 = _load_main(page, s, rows, i, K_CODES_OFF, BITS, HALF)
        if KZP:
            klo1 = tl.load(f16 + K_ZERO_OFF // 2 + ch1).to(tl.float32)
            klo2 = tl.load(f16 + K_ZERO_OFF // 2 + ch2).to(tl.float32)
        else:
            klo1 = -kab1
            klo2 = -kab2
        k1, k2 = _dequant(c1, c2, klo1, klo2, kab1, kab2, BITS, KZP)
        oab1 = tl.maximum(kab1, -klo1)  # outlier channels: 8 bits against the channel's absmax
        oab2 = tl.maximum(kab2, -klo2)
        # Outlier channels and sink slots: taken from their own sections.
        for o in tl.static_range(NOUT):
            cho = tl.load(page + OUT_IDX_OFF + o).to(tl.int32)
            abs_o = _at(ch1, ch2, cho, oab1, oab2)
            vo = (tl.load(page + OUT_K_OFF + s * NOUT + o, mask=rows, other=128).to(tl.float32) - 128.0) * (abs_o / 127.0)
            k1 = tl.where(ch1[None, :] == cho, vo[:, None], k1)
            k2 = tl.where(ch2[None, :] == cho, vo[:, None], k2)
        if S > 0:
            srows = rows & (s < S)
            ss = tl.load(f16 + SINK_SCALE_OFF // 2 + s, mask=srows, other=0.0).to(tl.float32) / 127.0
            srows = srows & (ss > 0)
            sbase = page + SINK_K_OFF + s[:, None] * D
            sk1 = (tl.load(sbase + ch1[None, :], mask=srows[:, None], other=128).to(tl.float32) - 128.0) * ss[:, None]
            sk2 = (tl.load(sbase + ch2[None, :], mask=srows[:, None], other=128).to(tl.float32) - 128.0) * ss[:, None]
            k1 = tl.where(srows[:, None], sk1, k1)
            k2 = tl.where(srows[:, None], sk2, k2)
    return k1, k2


@triton.jit
def _block_values(page, s, rows, i, ch1, ch2, HALF: tl.constexpr, BITS: tl.constexpr, VNF4: tl.constexpr,
                  V_SCALE_OFF: tl.constexpr, V_CODES_OFF: tl.constexpr, levels_ptr, BF16: tl.constexpr):
    """Values of slots ``rows`` of one page, as two channel halves."""
    QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
    f16 = page.to(tl.pointer_type(tl.float16))
    if BITS == 16:
        v1 = _load_floats(page, s, rows, ch1, V_CODES_OFF, 2 * HALF, BF16)
        v2 = _load_floats(page, s, rows, ch2, V_CODES_OFF, 2 * HALF, BF16)
    else:
        vab = tl.load(f16 + V_SCALE_OFF // 2 + s, mask=rows, other=0.0).to(tl.float32)
        d1, d2 = _load_main(page, s, rows, i, V_CODES_OFF, BITS, HALF)
        if VNF4:  # codes index the NF4 levels, scaled by the token's absmax
            v1 = tl.load(levels_ptr + (d1 + 8.0).to(tl.int32)) * vab[:, None]
            v2 = tl.load(levels_ptr + (d2 + 8.0).to(tl.int32)) * vab[:, None]
        else:
            v1 = d1 * (vab / QMAX)[:, None]
            v2 = d2 * (vab / QMAX)[:, None]
    return v1, v2


@triton.jit
def store_kernel(
    key_ptr, value_ptr, pos_ptr, cache_ptr, ema_ptr, emin_ptr, emax_ptr,
    wblock_ptr, wt0_ptr, wn_ptr, woff_ptr, edges_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    H: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
    BITS: tl.constexpr, S: tl.constexpr, NOUT: tl.constexpr, NEOX: tl.constexpr, VNF4: tl.constexpr,
    KZP: tl.constexpr, K_ZERO_OFF: tl.constexpr, BF16: tl.constexpr,
    K_SCALE_OFF: tl.constexpr, V_SCALE_OFF: tl.constexpr, SINK_SCALE_OFF: tl.constexpr,
    K_CODES_OFF: tl.constexpr, V_CODES_OFF: tl.constexpr, SINK_K_OFF: tl.constexpr,
    OUT_IDX_OFF: tl.constexpr, OUT_K_OFF: tl.constexpr, HEAD_BYTES: tl.constexpr,
):
    QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
    ZERO: tl.constexpr = QMAX + 1
    TOP: tl.constexpr = 2 ** BITS - 1
    BIG: tl.constexpr = 3.0e38
    # Main code of sink slots and outlier channels (readers take those from their sections).
    FILL: tl.constexpr = 0 if KZP else QMAX + 1
    D: tl.constexpr = 2 * HALF
    CODE_BYTES: tl.constexpr = D * BITS // 8
    w = tl.program_id(0)
    h = tl.program_id(1)
    blk = tl.load(wblock_ptr + w).to(tl.int64)
    t0 = tl.load(wt0_ptr + w).to(tl.int64)
    n = tl.load(wn_ptr + w)
    off0 = tl.load(woff_ptr + w)
    page = cache_ptr + (blk * H + h) * HEAD_BYTES
    i = tl.arange(0, HALF)
    ch1, ch2 = _chan(i, NEOX, HALF)
    s = tl.arange(0, BT)  # slot in the block
    new = (s >= off0) & (s < off0 + n)
    tok = t0 + (s - off0)
    pos = tl.load(pos_ptr + tok, mask=new, other=0)
    sink = new & (pos < S)
    nonsink = new & (pos >= S)
    kbase = key_ptr + tok[:, None] * stride_kn + h * stride_kh
    k1 = tl.load(kbase + ch1[None, :], mask=new[:, None], other=0.0).to(tl.float32)
    k2 = tl.load(kbase + ch2[None, :], mask=new[:, None], other=0.0).to(tl.float32)
    a1 = tl.max(tl.where(nonsink[:, None], tl.abs(k1), 0.0), axis=0)
    a2 = tl.max(tl.where(nonsink[:, None], tl.abs(k2), 0.0), axis=0)
    start = off0 == 0
    f16 = page.to(tl.pointer_type(tl.float16))
    hasold = (i * 0 + off0) > 0  # [HALF]: the block was started by an earlier write
    old1 = tl.load(f16 + K_SCALE_OFF // 2 + ch1, mask=hasold, other=0.0).to(tl.float32)
    old2 = tl.load(f16 + K_SCALE_OFF // 2 + ch2, mask=hasold, other=0.0).to(tl.float32)
    e1 = tl.load(ema_ptr + h * D + ch1)
    e2 = tl.load(ema_ptr + h * D + ch2)
    # A block written whole takes its own absmax; one started by a partial write, max(EMA, it).
    whole = start & (n == BS) & (tl.max(nonsink.to(tl.int32), axis=0) > 0)
    e1 = tl.where(whole, 0.0, e1)
    e2 = tl.where(whole, 0.0, e2)
    if KZP:  # a channel's range is its min and max (a zero point), not +-absmax
        n1 = tl.min(tl.where(nonsink[:, None], k1, BIG), axis=0)
        n2 = tl.min(tl.where(nonsink[:, None], k2, BIG), axis=0)
        x1 = tl.max(tl.where(nonsink[:, None], k1, -BIG), axis=0)
        x2 = tl.max(tl.where(nonsink[:, None], k2, -BIG), axis=0)
        oldlo1 = tl.load(f16 + K_ZERO_OFF // 2 + ch1, mask=hasold, other=0.0).to(tl.float32)
        oldlo2 = tl.load(f16 + K_ZERO_OFF // 2 + ch2, mask=hasold, other=0.0).to(tl.float32)
        lo1 = tl.where(start, tl.where(whole, BIG, tl.load(emin_ptr + h * D + ch1)), oldlo1)
        lo2 = tl.where(start, tl.where(whole, BIG, tl.load(emin_ptr + h * D + ch2)), oldlo2)
        hi1 = tl.where(start, tl.where(whole, -BIG, tl.load(emax_ptr + h * D + ch1)), old1)
        hi2 = tl.where(start, tl.where(whole, -BIG, tl.load(emax_ptr + h * D + ch2)), old2)
        lo1 = tl.minimum(lo1, n1).to(tl.float16).to(tl.float32)
        lo2 = tl.minimum(lo2, n2).to(tl.float16).to(tl.float32)
        hi1 = tl.maximum(hi1, x1).to(tl.float16).to(tl.float32)
        hi2 = tl.maximum(hi2, x2).to(tl.float16).to(tl.float32)
        grown = (tl.max((hi1 > old1).to(tl.int32), axis=0) + tl.max((hi2 > old2).to(tl.int32), axis=0)
                 + tl.max((lo1 < oldlo1).to(tl.int32), axis=0) + tl.max((lo2 < oldlo2).to(tl.int32), axis=0))
    else:
        hi1 = tl.maximum(tl.where(start, e1, old1), a1).to(tl.float16).to(tl.float32)
        hi2 = tl.maximum(tl.where(start, e2, old2), a2).to(tl.float16).to(tl.float32)
        lo1 = -hi1
        lo2 = -hi2
        oldlo1 = -old1
        oldlo2 = -old2
        grown = tl.max((hi1 > old1).to(tl.int32), axis=0) + tl.max((hi2 > old2).to(tl.int32), axis=0)
    # Earlier tokens of a block whose range grew: decode with the old range, re-encode below.
    prev = (s < off0) & ((s * 0 + grown) > 0)
    p1, p2 = _load_main(page, s, prev, i, K_CODES_OFF, BITS, HALF)
    p1, p2 = _dequant(p1, p2, oldlo1, oldlo2, old1, old2, BITS, KZP)
    for o in tl.static_range(NOUT):
        cho = tl.load(page + OUT_IDX_OFF + o).to(tl.int32)
        old_o = _at(ch1, ch2, cho, tl.maximum(old1, -oldlo1), tl.maximum(old2, -oldlo2))
        co = tl.load(page + OUT_K_OFF + s * NOUT + o, mask=prev, other=128).to(tl.float32) - 128.0
        vo = co * (old_o / 127.0)
        p1 = tl.where(ch1[None, :] == cho, vo[:, None], p1)
        p2 = tl.where(ch2[None, :] == cho, vo[:, None], p2)
    k1 = tl.where(prev[:, None], p1, k1)
    k2 = tl.where(prev[:, None], p2, k2)
    tl.debug_barrier()
    enc = new | prev
    if KZP:
        m1 = tl.where(sink[:, None], FILL, _encode_range(k1, lo1[None, :], hi1[None, :], TOP))
        m2 = tl.where(sink[:, None], FILL, _encode_range(k2, lo2[None, :], hi2[None, :], TOP))
        w1 = hi1 - lo1
        w2 = hi2 - lo2
    else:
        m1 = tl.where(sink[:, None], FILL, _encode(k1, hi1[None, :], QMAX))
        m2 = tl.where(sink[:, None], FILL, _encode(k2, hi2[None, :], QMAX))
        w1 = hi1
        w2 = hi2
    # Outlier channels: this block's NOUT widest channels (chosen when it starts), 8 bits
    # against the channel's absmax.
    abs1 = tl.maximum(hi1, -lo1)
    abs2 = tl.maximum(hi2, -lo2)
    for o in tl.static_range(NOUT):
        j1 = tl.argmax(w1, axis=0)
        j2 = tl.argmax(w2, axis=0)
        b1 = tl.max(w1, axis=0)
        b2 = tl.max(w2, axis=0)
        if NEOX:
            cand1 = j1
            cand2 = j2 + HALF
        else:
            cand1 = 2 * j1
            cand2 = 2 * j2 + 1
        top = tl.where(b1 >= b2, cand1, cand2)
        loaded = tl.load(page + OUT_IDX_OFF + o).to(tl.int32)  # stale when the block starts: unused then
        cho = tl.where(start, top, loaded)
        w1 = tl.where(ch1 == cho, -1.0, w1)
        w2 = tl.where(ch2 == cho, -1.0, w2)
        if off0 == 0:
            tl.store(page + OUT_IDX_OFF + o, cho.to(tl.uint8))
        abs_o = _at(ch1, ch2, cho, abs1, abs2)
        col = tl.sum(tl.where(ch1[None, :] == cho, k1, 0.0), axis=1) + tl.sum(tl.where(ch2[None, :] == cho, k2, 0.0), axis=1)
        oc = tl.where(sink, 128, _encode(col, abs_o, 127))
        tl.store(page + OUT_K_OFF + s * NOUT + o, oc.to(tl.uint8), mask=enc)
        m1 = tl.where(ch1[None, :] == cho, FILL, m1)
        m2 = tl.where(ch2[None, :] == cho, FILL, m2)
    if BITS == 8:
        base = page + K_CODES_OFF + s[:, None] * CODE_BYTES + i[None, :]
        tl.store(base, m1.to(tl.uint8), mask=enc[:, None])
        tl.store(base + HALF, m2.to(tl.uint8), mask=enc[:, None])
    else:
        tl.store(page + K_CODES_OFF + s[:, None] * CODE_BYTES + i[None, :], (m1 | (m2 << 4)).to(tl.uint8), mask=enc[:, None])
    tl.store(f16 + K_SCALE_OFF // 2 + ch1, hi1.to(tl.float16))
    tl.store(f16 + K_SCALE_OFF // 2 + ch2, hi2.to(tl.float16))
    if KZP:
        tl.store(f16 + K_ZERO_OFF // 2 + ch1, lo1.to(tl.float16))
        tl.store(f16 + K_ZERO_OFF // 2 + ch2, lo2.to(tl.float16))
    # Values: per token.
    vbase = value_ptr + tok[:, None] * stride_vn + h * stride_vh
    v1 = tl.load(vbase + ch1[None, :], mask=new[:, None], other=0.0).to(tl.float32)
    v2 = tl.load(vbase + ch2[None, :], mask=new[:, None], other=0.0).to(tl.float32)
    vabs = tl.maximum(tl.max(tl.abs(v1), axis=1), tl.max(tl.abs(v2), axis=1)).to(tl.float16).to(tl.float32)
    tl.store(f16 + V_SCALE_OFF // 2 + s, vabs.to(tl.float16), mask=new)
    if VNF4:  # the nearest NF4 level: how many decision thresholds the scaled value reaches
        vsc = tl.where(vabs > 0, vabs, 1.0)
        y1 = v1 / vsc[:, None]
        y2 = v2 / vsc[:, None]
        n1 = tl.zeros((BT, HALF), tl.int32)
        n2 = tl.zeros((BT, HALF), tl.int32)
        for e in tl.static_range(15):
            edge = tl.load(edges_ptr + e)
            n1 += (y1 >= edge).to(tl.int32)
            n2 += (y2 >= edge).to(tl.int32)
    else:
        n1 = _encode(v1, vabs[:, None], QMAX)
        n2 = _encode(v2, vabs[:, None], QMAX)
    if BITS == 8:
        base = page + V_CODES_OFF + s[:, None] * CODE_BYTES + i[None, :]
        tl.store(base, n1.to(tl.uint8), mask=new[:, None])
        tl.store(base + HALF, n2.to(tl.uint8), mask=new[:, None])
    else:
        tl.store(page + V_CODES_OFF + s[:, None] * CODE_BYTES + i[None, :], (n1 | (n2 << 4)).to(tl.uint8), mask=new[:, None])
    # Sink keys: 8 bits per token; a starting block clears the slots no sink fills.
    if S > 0:
        sabs = tl.maximum(tl.max(tl.abs(k1), axis=1), tl.max(tl.abs(k2), axis=1)).to(tl.float16).to(tl.float32)
        sabs = tl.where(sink, tl.maximum(sabs, 5.960464477539063e-08), 0.0)  # > 0 marks a sink slot
        area = (s < S) & (sink | ((s * 0 + off0) == 0))
        tl.store(f16 + SINK_SCALE_OFF // 2 + s, sabs.to(tl.float16), mask=area)
        q1 = tl.where(sink[:, None], _encode(k1, sabs[:, None], 127), 128)
        q2 = tl.where(sink[:, None], _encode(k2, sabs[:, None], 127), 128)
        sbase = page + SINK_K_OFF + s[:, None] * D
        tl.store(sbase + ch1[None, :], q1.to(tl.uint8), mask=area[:, None])
        tl.store(sbase + ch2[None, :], q2.to(tl.uint8), mask=area[:, None])

@triton.jit
def decode_kernel(
    q_ptr, cache_ptr, blocks_ptr, starts_ptr, ends_ptr, ranks_ptr, cos_ptr, sin_ptr, levels_ptr, out_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    M, per_split, scale,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr,
    BITS: tl.constexpr, S: tl.constexpr, NOUT: tl.constexpr, NEOX: tl.constexpr, ROPE: tl.constexpr,
    VNF4: tl.constexpr, KZP: tl.constexpr, K_ZERO_OFF: tl.constexpr, BF16: tl.constexpr,
    K_SCALE_OFF: tl.constexpr, V_SCALE_OFF: tl.constexpr, SINK_SCALE_OFF: tl.constexpr,
    K_CODES_OFF: tl.constexpr, V_CODES_OFF: tl.constexpr, SINK_K_OFF: tl.constexpr,
    OUT_IDX_OFF: tl.constexpr, OUT_K_OFF: tl.constexpr, HEAD_BYTES: tl.constexpr, SPLIT: tl.constexpr,
):
    """One decode query per request (all ``G`` query heads of KV head ``h``). With ``SPLIT``
    (split-K, for few requests over long caches) program ``sp`` covers blocks
    ``[sp * per_split, (sp + 1) * per_split)`` and writes its softmax state (max, sum,
    unnormalized output) for the host to combine; otherwise it writes the output."""
    QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
    TOP: tl.constexpr = 2 ** BITS - 1
    D: tl.constexpr = 2 * HALF
    r = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    i = tl.arange(0, HALF)
    ch1, ch2 = _chan(i, NEOX, HALF)
    g = tl.arange(0, GP)
    gm = g < G
    qrow = q_ptr + (r * H * G + h * G + g)[:, None] * D
    q1 = tl.load(qrow + ch1[None, :], mask=gm[:, None], other=0.0).to(tl.float32) * scale
    q2 = tl.load(qrow + ch2[None, :], mask=gm[:, None], other=0.0).to(tl.float32) * scale
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc1 = tl.zeros((GP, HALF), tl.float32)
    acc2 = tl.zeros((GP, HALF), tl.float32)
    s = tl.arange(0, BT)
    j0 = sp * per_split
    j1 = tl.minimum(j0 + per_split, M)
    for j in range(j0, j1):
        a = tl.load(starts_ptr + r * M + j)
        e = tl.load(ends_ptr + r * M + j)
        if e > a:
            blk = tl.load(blocks_ptr + r * M + j).to(tl.int64)
            rk = tl.load(ranks_ptr + r * M + j)
            page = cache_ptr + (blk * H + h) * HEAD_BYTES
            rows = (s >= a) & (s < e)
            k1, k2 = _block_keys(page, s, rows, i, ch1, ch2, HALF, BITS, S, NOUT, KZP, K_ZERO_OFF, K_SCALE_OFF,
                                 K_CODES_OFF, SINK_SCALE_OFF, SINK_K_OFF, OUT_IDX_OFF, OUT_K_OFF, BF16)
            if ROPE:
                p = rk + s - a
                cs = tl.load(cos_ptr + p[:, None] * HALF + i[None, :], mask=rows[:, None], other=1.0)
                sn = tl.load(sin_ptr + p[:, None] * HALF + i[None, :], mask=rows[:, None], other=0.0)
                k1, k2 = k1 * cs - k2 * sn, k2 * cs + k1 * sn
            sc = tl.sum(q1[:, None, :] * k1[None, :, :], axis=2) + tl.sum(q2[:, None, :] * k2[None, :, :], axis=2)
            sc = tl.where(rows[None, :], sc, float("-inf"))  # [GP, BT]
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            pr = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            v1, v2 = _block_values(page, s, rows, i, ch1, ch2, HALF, BITS, VNF4, V_SCALE_OFF, V_CODES_OFF, levels_ptr, BF16)
            acc1 = acc1 * alpha[:, None] + tl.sum(pr[:, :, None] * v1[None, :, :], axis=1)
            acc2 = acc2 * alpha[:, None] + tl.sum(pr[:, :, None] * v2[None, :, :], axis=1)
            m_i = m_new
    if SPLIT:
        nsp = tl.num_programs(2)
        prow = ((r * H + h) * nsp + sp) * GP + g  # [GP]
        tl.store(part_m_ptr + prow, m_i)
        tl.store(part_l_ptr + prow, l_i)
        tl.store(part_acc_ptr + prow[:, None] * D + ch1[None, :], acc1)
        tl.store(part_acc_ptr + prow[:, None] * D + ch2[None, :], acc2)
    else:
        o1 = acc1 / l_i[:, None]
        o2 = acc2 / l_i[:, None]
        orow = out_ptr + (r * H * G + h * G + g)[:, None] * D
        tl.store(orow + ch1[None, :], o1, mask=gm[:, None])
        tl.store(orow + ch2[None, :], o2, mask=gm[:, None])


@triton.jit
def _rotate(x1, x2, cos_ptr, sin_ptr, p, mask, i, HALF: tl.constexpr):
    """Rotate the halves ``x1``, ``x2`` ``[R, HALF]`` at positions ``p`` ``[R]`` (table lookups)."""
    cs = tl.load(cos_ptr + p[:, None] * HALF + i[None, :], mask=mask[:, None], other=1.0)
    sn = tl.load(sin_ptr + p[:, None] * HALF + i[None, :], mask=mask[:, None], other=0.0)
    return x1 * cs - x2 * sn, x2 * cs + x1 * sn


@triton.jit
def prefill_kernel(
    q_ptr, cache_ptr, blocks_ptr, logical_ptr, cos_ptr, sin_ptr, levels_ptr, out_ptr,
    n, M, first, seq_len, base, sinks, window, scale,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr, HALF: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr,
    BITS: tl.constexpr, S: tl.constexpr, NOUT: tl.constexpr, NEOX: tl.constexpr, ROPE: tl.constexpr,
    VNF4: tl.constexpr, KZP: tl.constexpr, K_ZERO_OFF: tl.constexpr, BF16: tl.constexpr,
    K_SCALE_OFF: tl.constexpr, V_SCALE_OFF: tl.constexpr, SINK_SCALE_OFF: tl.constexpr,
    K_CODES_OFF: tl.constexpr, V_CODES_OFF: tl.constexpr, SINK_K_OFF: tl.constexpr,
    OUT_IDX_OFF: tl.constexpr, OUT_K_OFF: tl.constexpr, HEAD_BYTES: tl.constexpr,
):
    """A prefill chunk of one request (queries at ``first + t``, pre-RoPE) over its quantized
    pages with the sink + window pattern: ``BM`` queries x ``G`` heads of one KV head per
    program. Cache-relative positions as ``sink_window_attention_ref(rope_applied=False)``:
    against a sink key (rotated at its slot ``a``) the query sits at ``p - e(p)``; against a
    window key (rotated at ``a - base``) at ``p - base``."""
    D: tl.constexpr = 2 * HALF
    R: tl.constexpr = BM * GP
    t = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, HALF)
    ch1, ch2 = _chan(i, NEOX, HALF)
    rr = tl.arange(0, R)
    qi = t * BM + rr // GP
    g = rr % GP
    valid = (qi < n) & (g < G)
    qrow = q_ptr + (qi * (H * G) + h * G + g)[:, None] * D
    q1 = tl.load(qrow + ch1[None, :], mask=valid[:, None], other=0.0).to(tl.float32) * scale
    q2 = tl.load(qrow + ch2[None, :], mask=valid[:, None], other=0.0).to(tl.float32) * scale
    pos = first + qi
    ev = tl.maximum(pos - window + 1 - sinks, 0)
    if ROPE:
        w1, w2 = _rotate(q1, q2, cos_ptr, sin_ptr, pos - base, valid, i, HALF)
        s1, s2 = _rotate(q1, q2, cos_ptr, sin_ptr, pos - ev, valid, i, HALF)
    else:
        w1, w2, s1, s2 = q1, q2, q1, q2
    m_i = tl.full((R,), float("-inf"), tl.float32)
    l_i = tl.zeros((R,), tl.float32)
    acc1 = tl.zeros((R, HALF), tl.float32)
    acc2 = tl.zeros((R, HALF), tl.float32)
    s = tl.arange(0, BT)
    for j in range(M):
        blk = tl.load(blocks_ptr + j).to(tl.int64)
        lb = tl.load(logical_ptr + j)
        a = lb * BS + s
        rows = (s < BS) & (a < seq_len)
        page = cache_ptr + (blk * H + h) * HEAD_BYTES
        k1, k2 = _block_keys(page, s, rows, i, ch1, ch2, HALF, BITS, S, NOUT, KZP, K_ZERO_OFF, K_SCALE_OFF,
                             K_CODES_OFF, SINK_SCALE_OFF, SINK_K_OFF, OUT_IDX_OFF, OUT_K_OFF, BF16)
        is_sink = a < sinks
        if ROPE:
            kw1, kw2 = _rotate(k1, k2, cos_ptr, sin_ptr, tl.maximum(a - base, 0), rows & ~is_sink, i, HALF)
            ks1, ks2 = _rotate(k1, k2, cos_ptr, sin_ptr, a, rows & is_sink, i, HALF)
        else:
            kw1, kw2, ks1, ks2 = k1, k2, k1, k2
        sc_w = tl.sum(w1[:, None, :] * kw1[None, :, :], axis=2) + tl.sum(w2[:, None, :] * kw2[None, :, :], axis=2)
        sc_s = tl.sum(s1[:, None, :] * ks1[None, :, :], axis=2) + tl.sum(s2[:, None, :] * ks2[None, :, :], axis=2)
        sc = tl.where(is_sink[None, :], sc_s, sc_w)  # [R, BT]
        seen = (rows[None, :] & valid[:, None] & (a[None, :] <= pos[:, None])
                & (is_sink[None, :] | (a[None, :] >= pos[:, None] - window + 1)))
        sc = tl.where(seen, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        alpha = tl.exp(m_i - m_use)
        pr = tl.exp(sc - m_use[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        v1, v2 = _block_values(page, s, rows, i, ch1, ch2, HALF, BITS, VNF4, V_SCALE_OFF, V_CODES_OFF, levels_ptr, BF16)
        v1 = tl.where(rows[:, None], v1, 0.0)
        v2 = tl.where(rows[:, None], v2, 0.0)
        acc1 = acc1 * alpha[:, None] + tl.sum(pr[:, :, None] * v1[None, :, :], axis=1)
        acc2 = acc2 * alpha[:, None] + tl.sum(pr[:, :, None] * v2[None, :, :], axis=1)
        m_i = m_new
    den = tl.where(l_i > 0, l_i, 1.0)
    orow = out_ptr + (qi * (H * G) + h * G + g)[:, None] * D
    tl.store(orow + ch1[None, :], acc1 / den[:, None], mask=valid[:, None])
    tl.store(orow + ch2[None, :], acc2 / den[:, None], mask=valid[:, None])


@triton.jit
def store16_kernel(key_ptr, value_ptr, cache_ptr, slot_ptr, stride_kn, stride_kh, stride_vn, stride_vh,
                   H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, K_CODES_OFF: tl.constexpr,
                   V_CODES_OFF: tl.constexpr, HEAD_BYTES: tl.constexpr, BF16: tl.constexpr):
    """16-bit pages: one program per (token, KV head) stores its key (before RoPE) and value."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    page = cache_ptr + ((slot // BS) * H + h) * HEAD_BYTES
    if BF16:
        base = page.to(tl.pointer_type(tl.bfloat16))
        dt = tl.bfloat16
    else:
        base = page.to(tl.pointer_type(tl.float16))
        dt = tl.float16
    c = tl.arange(0, D)
    off = (slot % BS) * D + c
    k = tl.load(key_ptr + t * stride_kn + h * stride_kh + c).to(tl.float32)
    v = tl.load(value_ptr + t * stride_vn + h * stride_vh + c).to(tl.float32)
    tl.store(base + K_CODES_OFF // 2 + off, k.to(dt, fp_downcast_rounding="rtne"))
    tl.store(base + V_CODES_OFF // 2 + off, v.to(dt, fp_downcast_rounding="rtne"))
