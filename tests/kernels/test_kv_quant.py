"""Quantized KV pages: the layout, the float32 reference (error bounded as the bit width
predicts), and the Triton kernels against it under ``TRITON_INTERPRET=1`` (conftest sets it)."""

import math
import os

import pytest
import torch

from vllm_kvstream.kernels.kv_quant import (
    NF4,
    PageView,
    QuantLayout,
    QuantStats,
    quant_decode_attention_ref,
    quant_read_ref,
    quant_write_ref,
)
from vllm_kvstream.kernels.rope import Rope


@pytest.fixture(autouse=True)
def _triton_interpret():
    """Triton has no CPU backend: the kernels run in its interpreter, which must be chosen
    before Triton is first imported (``tests/conftest.py`` sets it at collection)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("TRITON_INTERPRET=1 must be set before Triton is imported (tests/conftest.py)")


def test_layout_capacity_and_sections():
    for bits, ratio in ((8, 1.9), (4, 3.5)):
        L = QuantLayout(bits, 64, 128)
        assert L.ratio_to(2) >= ratio  # against bf16, metadata counted
        ends = [
            (L.k_scale_off, 2 * 64), (L.v_scale_off, 2 * 128), (L.sink_scale_off, 2 * 4),
            (L.k_codes_off, 128 * L.code_bytes), (L.v_codes_off, 128 * L.code_bytes),
            (L.sink_k_off, 4 * 64), (L.out_idx_off, L.n_out), (L.out_k_off, 128 * L.n_out),
        ]
        for (a, n), (b, _) in zip(ends, ends[1:]):
            assert a + n == b  # contiguous, no overlap
        assert ends[-1][0] + ends[-1][1] <= L.head_bytes and L.head_bytes % 16 == 0


@pytest.mark.parametrize("bad", [{"bits": 3}, {"bits": 32}, {"head_size": 63}, {"sink_tokens": 200}])
def test_layout_rejects_bad_values(bad):
    args = {"bits": 4, "head_size": 64, "block_size": 128, **bad}
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        QuantLayout(**args)


def _stream(bits, *, D=32, H=2, bs=8, n=45, chunks=(13, 1, 1, 7, 1, 20, 1, 1, 1), seed=0, neox=True, nb=16,
            writer=None, outlier_scale=8.0, offset=0.0, **layout):
    """Write ``n`` tokens in the given chunk sizes into shuffled physical blocks (the rest of
    the cache is garbage). Returns the cache, the pre-RoPE keys, values, the block row.
    ``offset``: added to key channel 7 (a channel off zero, as pre-RoPE keys have)."""
    gen = torch.Generator().manual_seed(seed)
    L = QuantLayout(bits, D, bs, **{"sink_tokens": 3, "outlier_channels": 2, **layout})
    cache = torch.randint(0, 256, (nb, H, L.head_bytes), dtype=torch.uint8, generator=gen)
    rope = Rope.from_base(D, 10000.0, 1024, is_neox_style=neox)
    k_pre = torch.randn(n, H, D, generator=gen)
    k_pre[:, :, 5] *= outlier_scale  # an outlier channel
    k_pre[:, :, 7] += offset
    k_pre[:3] *= 6.0  # sinks: outsized keys
    v = torch.randn(n, H, D, generator=gen)
    row = torch.randperm(nb, generator=gen)[: -(-n // bs)]
    pos = torch.arange(n)
    slots = row[pos // bs] * bs + pos % bs
    k_abs = rope.rotate(k_pre, pos)  # as the model hands keys over
    stats = QuantStats.empty(H, D)
    t = 0
    sizes = list(chunks)
    while t < n:
        c = min(sizes.pop(0) if sizes else 1, n - t)
        sl = slice(t, t + c)
        if writer is None:
            quant_write_ref(k_abs[sl], v[sl], cache, slots[sl], pos[sl], stats, L, rope=rope)
        else:
            writer(k_pre[sl], v[sl], cache, slots[sl], pos[sl], stats, L, neox)
        t += c
    return L, cache, k_pre, v, row, rope


def _tokens(x, n):  # [m, H, bs, D] -> [n, H, D]
    return x.permute(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3])[:n]


@pytest.mark.parametrize("neox", [True, False])
def test_reference_error_bounded_by_bit_width(neox):
    errs = {}
    for bits in (8, 4):
        L, cache, k_pre, v, row, _ = _stream(bits, neox=neox)
        n = k_pre.shape[0]
        k, vv = quant_read_ref(cache, row, L, is_neox_style=neox)
        k, vv = _tokens(k, n), _tokens(vv, n)
        view = PageView(cache, L)
        # Keys: within one step of the block's channel scale (a grown scale re-encodes once:
        # at most two roundings), outlier channel at 8 bits, sinks at 8 bits per token.
        step = view.k_scale[row].float()[:, :, None, :] / L.qmax  # [m, H, 1, D]
        step = _tokens(step.expand(-1, -1, L.block_size, -1), n)
        out_ch = 5
        main = torch.ones(L.head_size, dtype=torch.bool)
        if L.n_out:
            main[out_ch] = False
        err = (k - k_pre).abs()
        assert (err[3:, :, main] <= step[3:, :, main] * 1.01 + 1e-6).all()
        assert (err[3:, :, out_ch] <= step[3:, :, out_ch] * L.qmax / 127 * 1.01 + 1e-6).all()
        sink_step = k_pre[:3].abs().amax(dim=-1, keepdim=True) / 127
        assert (err[:3] <= sink_step * 0.51 + 1e-3).all()
        v_step = v.abs().amax(dim=-1, keepdim=True) / L.qmax
        assert ((vv - v).abs() <= v_step * 0.51 + 1e-3).all()
        errs[bits] = float((k - k_pre)[3:, :, main].norm() / k_pre[3:, :, main].norm())
    assert errs[8] < errs[4] / 8  # 127 / 7 levels: ~18x finer


def test_outlier_and_sink_handling_pay_off():
    """The same stream at INT4 with outlier channels and sinks against without them."""
    with_extras = _stream(4)
    L, cache, k_pre, v, row, _ = with_extras
    k, _ = quant_read_ref(cache, row, L)
    err = float((_tokens(k, 45) - k_pre).norm() / k_pre.norm())
    gen = torch.Generator().manual_seed(0)
    plain = QuantLayout(4, 32, 8, sink_tokens=0, outlier_channels=0)
    cache2 = torch.randint(0, 256, (16, 2, plain.head_bytes), dtype=torch.uint8, generator=gen)
    pos = torch.arange(45)
    quant_write_ref(k_pre, v, cache2, row[pos // 8] * 8 + pos % 8, pos, QuantStats.empty(2, 32), plain, rope=None)
    k2, _ = quant_read_ref(cache2, row, plain)
    err2 = float((_tokens(k2, 45) - k_pre).norm() / k_pre.norm())
    assert err < err2 / 2


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_key_scales_naive_foil(bits):
    """``key_scale="token"`` (the ablation's naive keys): each key within half a step of its
    own per-token scale, sinks apart, and a channel outlier costs the other channels of the
    token their precision (what per-channel scales avoid)."""
    gen = torch.Generator().manual_seed(bits)
    D, H, bs, n = 32, 2, 8, 29
    L = QuantLayout(bits, D, bs, sink_tokens=2, outlier_channels=2, key_scale="token")
    assert L.n_out == 0 and L.k_scale_len == bs
    cache = torch.randint(0, 256, (8, H, L.head_bytes), dtype=torch.uint8, generator=gen)
    k_pre = torch.randn(n, H, D, generator=gen)
    k_pre[:, :, 5] *= 8.0
    v = torch.randn(n, H, D, generator=gen)
    row = torch.randperm(8, generator=gen)[: -(-n // bs)]
    pos = torch.arange(n)
    slots = row[pos // bs] * bs + pos % bs
    stats = QuantStats.empty(H, D)
    for sl in (slice(0, 11), slice(11, 12), slice(12, n)):
        quant_write_ref(k_pre[sl], v[sl], cache, slots[sl], pos[sl], stats, L, rope=None)
    k, vv = quant_read_ref(cache, row, L)
    k, vv = _tokens(k, n), _tokens(vv, n)
    step = k_pre.abs().amax(dim=-1, keepdim=True) / L.qmax
    assert ((k - k_pre)[2:].abs() <= step[2:] * 0.51 + 1e-3).all()
    assert ((k - k_pre)[:2].abs() <= k_pre[:2].abs().amax(-1, keepdim=True) / 127 * 0.51 + 1e-3).all()
    assert ((vv - v).abs() <= v.abs().amax(dim=-1, keepdim=True) / L.qmax * 0.51 + 1e-3).all()
    channel = _stream(bits, D=D, H=H, bs=bs, n=n, seed=bits)
    kc, _ = quant_read_ref(channel[1], channel[4], channel[0])
    rest = [c for c in range(D) if c != 5]
    err_token = float((k - k_pre)[2:, :, rest].norm() / k_pre[2:, :, rest].norm())
    err_channel = float((_tokens(kc, n) - channel[2])[3:, :, rest].norm() / channel[2][3:, :, rest].norm())
    assert err_channel < err_token


def test_stats_ema_and_outlier_rate():
    st = QuantStats.empty(1, 4, decay=0.5)
    st.update(torch.tensor([[1.0, 1.0, 1.0, 10.0]]))
    st.update(torch.tensor([[3.0, 1.0, 1.0, 10.0]]))
    torch.testing.assert_close(st.ema_absmax, torch.tensor([[2.0, 1.0, 1.0, 10.0]]))
    assert st.outlier_rate() == 0.25


def _triton_writer(k_pre, v, cache, slots, pos, stats, L, neox):
    from vllm_kvstream.kernels.kv_quant_triton import quant_store

    quant_store(k_pre, v, cache, slots, pos, stats, L, is_neox_style=neox)


def _ref_writer(k_pre, v, cache, slots, pos, stats, L, neox):
    quant_write_ref(k_pre, v, cache, slots, pos, stats, L, rope=None, is_neox_style=neox)


#: Layouts the kernels are tested on: INT8; INT4 symmetric uniform; INT4 with the zero point
#: and NF4 values (the default); the two INT4 refinements alone.
LAYOUTS = [
    (8, {}), (4, {}), (4, {"key_zero_point": True, "value_levels": "nf4"}),
    (4, {"key_zero_point": True}), (4, {"value_levels": "nf4"}),
    # Unquantized pages in the same byte layout (keys before RoPE): one kernel for every page.
    (16, {"sink_tokens": 0}), (16, {"sink_tokens": 0, "float_dtype": "bfloat16"}),
]


@pytest.mark.parametrize(("bits", "layout"), LAYOUTS)
@pytest.mark.parametrize(("D", "H", "bs", "neox"), [(32, 2, 8, True), (16, 3, 5, False), (64, 1, 16, True)])
def test_store_kernel_matches_reference(bits, layout, D, H, bs, neox):
    n = 3 * bs + 2
    kw = dict(D=D, H=H, bs=bs, n=n, neox=neox, seed=bits + D, offset=3.0, **layout)
    L, ref, k_pre, v, row, _ = _stream(bits, writer=_ref_writer, **kw)
    _, got, _, _, _, _ = _stream(bits, writer=_triton_writer, **kw)
    k_ref, v_ref = quant_read_ref(ref, row, L, is_neox_style=neox)
    k_got, v_got = quant_read_ref(got, row, L, is_neox_style=neox)
    view = PageView(ref, L)
    if not L.scaled:  # 16-bit pages: the same floats (Triton's interpreter truncates to bf16: 1 ulp)
        rtol = 2.0**-7 if L.float_dtype == "bfloat16" and not torch.cuda.is_available() else 0.0
        live = _tokens(k_ref, n), _tokens(k_got, n), _tokens(v_ref, n), _tokens(v_got, n)
        torch.testing.assert_close(live[1], live[0], rtol=rtol, atol=0)
        torch.testing.assert_close(live[3], live[2], rtol=rtol, atol=0)
        return
    step = ((view.k_scale[row].float() - view.k_zero[row].float()).amax() / 15 if L.key_zero_point
            else view.k_scale[row].float().amax() / L.qmax)
    torch.testing.assert_close(_tokens(k_got, n), _tokens(k_ref, n), atol=float(step) * 1.01, rtol=0)
    torch.testing.assert_close(_tokens(v_got, n), _tokens(v_ref, n), atol=float(v.abs().max()) / L.qmax, rtol=0)
    # Scales and outlier channels agree exactly; codes differ only on rounding ties.
    a, b = PageView(ref, L), PageView(got, L)
    torch.testing.assert_close(a.k_scale[row], b.k_scale[row], atol=0, rtol=0)
    torch.testing.assert_close(a.k_zero[row], b.k_zero[row], atol=0, rtol=0)
    assert (a.v_codes[row] == b.v_codes[row]).float().mean() > 0.99
    if L.n_out:
        assert torch.equal(a.out_idx[row].sort(-1).values, b.out_idx[row].sort(-1).values)
    same = (a.k_codes[row] == b.k_codes[row]).float().mean()
    assert same > 0.99


def _decode_case(bits, D, H, G, bs, neox, seed, **layout):
    L, cache, k_pre, v, row, rope = _stream(bits, D=D, H=H, bs=bs, n=6 * bs - 1, neox=neox, seed=seed, nb=24, **layout)
    nb = cache.shape[0]
    garbage = torch.tensor([b for b in range(nb) if b not in row.tolist()])
    cache[garbage] = 255  # fp16 0xFFFF is NaN: a read of a skipped block would poison the output
    gen = torch.Generator().manual_seed(seed)
    # Three requests over the same blocks with different patterns: everything; sinks + a
    # window starting mid-block with evicted blocks between; a selection with a gap.
    L6 = 6 * bs - 1
    pats = []
    ends_all = [min(bs, L6 - j * bs) for j in range(6)]
    pats.append([(0, e) for e in ends_all])
    lo = 3 * bs + 2
    pats.append([(0, 3), (0, 0), (0, 0), (2, bs), (0, bs), (0, ends_all[5])])
    pats.append([(0, bs), (0, 0), (0, bs), (0, 0), (0, bs), (0, ends_all[5])])
    B, M = len(pats), 6
    blocks = torch.empty(B, M, dtype=torch.long)
    starts = torch.zeros(B, M, dtype=torch.int32)
    ends = torch.zeros(B, M, dtype=torch.int32)
    ranks = torch.zeros(B, M, dtype=torch.int32)
    q_rank = []
    for r, pat in enumerate(pats):
        rank = 0
        for j, (a, e) in enumerate(pat):
            blocks[r, j] = row[j] if e > a else int(garbage[0])
            starts[r, j], ends[r, j], ranks[r, j] = a, e, rank
            rank += max(0, e - a)
        q_rank.append(rank - 1)
    del lo
    q_pre = torch.randn(B, H * G, D, generator=gen)
    query = rope.rotate(q_pre, torch.tensor(q_rank))
    return L, cache, query, blocks, starts, ends, ranks, rope


@pytest.mark.parametrize(("bits", "layout"), LAYOUTS)
@pytest.mark.parametrize(("D", "H", "G", "bs", "neox"), [(32, 2, 3, 8, True), (16, 1, 2, 5, False), (64, 3, 1, 16, True)])
def test_decode_kernel_matches_reference(bits, layout, D, H, G, bs, neox):
    from vllm_kvstream.kernels.kv_quant_triton import quant_decode_attention

    L, cache, query, blocks, starts, ends, ranks, rope = _decode_case(bits, D, H, G, bs, neox, seed=D + bs, **layout)
    scale = 1 / math.sqrt(D)
    expected = quant_decode_attention_ref(query, cache, blocks, starts, ends, ranks, L, scale=scale, rope=rope)
    got = quant_decode_attention(query, cache, blocks, starts, ends, ranks, L, scale=scale, rope=rope)
    assert not torch.isnan(expected).any()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    # Split-K over the 6 blocks: 3 splits of 2, and 6 of 1 (then some splits see only
    # evicted blocks: max -inf, sum 0, weight 0 when combined).
    for splits in (3, 6):
        split = quant_decode_attention(query, cache, blocks, starts, ends, ranks, L, scale=scale, rope=rope, splits=splits)
        torch.testing.assert_close(split, expected, atol=2e-5, rtol=2e-5)


def test_reference_attention_close_to_unquantized():
    """INT8 attention output stays close to float attention over the original keys."""
    L, cache, k_pre, v, row, rope = _stream(8, D=32, H=2, bs=8, n=40, nb=16)
    q = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1))
    blocks = row[None]
    ends = torch.tensor([[8, 8, 8, 8, 8]], dtype=torch.int32)
    starts = torch.zeros_like(ends)
    ranks = torch.arange(0, 40, 8, dtype=torch.int32)[None]
    query = rope.rotate(q, torch.tensor([39]))
    got = quant_decode_attention_ref(query, cache, blocks, starts, ends, ranks, L, scale=0.2, rope=rope)
    k = rope.rotate(k_pre, torch.arange(40))
    exp = torch.empty(4, 32)
    for h in range(4):
        p = torch.softmax((k[:, h // 2] @ query[0, h]) * 0.2, dim=0)
        exp[h] = p @ v[:, h // 2]
    err = float((got[0] - exp).norm() / exp.norm())
    assert err < 0.02, err


@pytest.mark.parametrize(("bits", "layout"), [(8, {}), (4, {}), (4, {"key_zero_point": True, "value_levels": "nf4"})])
@pytest.mark.parametrize(("D", "H", "G", "bs", "neox"), [(32, 2, 3, 8, True), (16, 1, 2, 5, False)])
@pytest.mark.parametrize(("sinks", "window"), [(3, 13), (3, 4), (8, 9), (3, None)])
@pytest.mark.parametrize("compiled", [True, False], ids=["C", "torch"])
def test_cpu_batched_decode_matches_the_step_reference(bits, layout, D, H, G, bs, neox, sinks, window, compiled):
    """The CPU decode path over quantized pages (one plan per step, keys rotated at the plan's
    positions) against the torch step reference (keys before RoPE at cache positions), for
    four decodes of different lengths in one batch: evicting, not yet evicting, a window that
    starts in the sink block after evicted tokens (3+4 at length 9). Every evicted logical
    block's id is past the cache (a read raises), every unwritten page is NaN bytes, and the
    slots past a stream's end in its last page are garbage. Both CPU forms: the fused C helper
    (``csrc/quant_decode.c``) and the torch ops."""
    from vllm_kvstream.adapter.quant_attention import plan_quant_step
    from vllm_kvstream.kernels import cpu_ext
    from vllm_kvstream.kernels.kv_quant import quant_sink_window_decode_cpu
    from vllm_kvstream.kernels.kv_quant_triton import quant_sink_window_attention
    from vllm_kvstream.kernels.sink_decode import plan_decode
    from vllm_kvstream.policies import AttentionPattern

    L, cache, _, _, row, rope = _stream(bits, D=D, H=H, bs=bs, n=45, seed=D + bs, nb=24, neox=neox, **layout)
    garbage = torch.tensor([b for b in range(cache.shape[0]) if b not in row.tolist()])
    cache[garbage] = 255  # fp16 0xFFFF is NaN
    lens = torch.tensor([45, 30, 9, 12])
    pattern = AttentionPattern(sink_tokens=sinks, window_tokens=window)
    table = torch.stack([row] * len(lens))
    for i, n in enumerate(lens.tolist()):
        lo = 0 if window is None else n - window  # the window [lo, n); sinks [0, sinks)
        for j in range(table.shape[1]):
            if not any(t < n and (t < sinks or t >= lo) for t in range(j * bs, (j + 1) * bs)):
                table[i, j] = 10_000  # evicted (or past the stream): an id past the cache
    qsl = torch.arange(len(lens) + 1)
    positions = lens - 1
    q_abs = rope.rotate(torch.randn(len(lens), H * G, D, generator=torch.Generator().manual_seed(5)), positions)
    scale = 1 / math.sqrt(D)
    plan = plan_decode(qsl[:-1], lens, table, sink_tokens=sinks, window_tokens=window, block_size=bs, rope=None,
                       pad_block=None)
    if compiled and not cpu_ext.can_quant_decode(cache, L):
        # Justified: the C form exists only where a compiler does; the torch form runs regardless.
        pytest.skip("no C compiler: the torch form serves")
    got = torch.zeros(len(lens), H * G, D)
    quant_sink_window_decode_cpu(q_abs, cache, plan, L, scale=scale, rope=rope, out=got, compiled=compiled)
    _, requests, needed, idx = plan_quant_step(qsl, lens, table, pattern, bs)
    expected = torch.zeros_like(got)
    quant_sink_window_attention(rope.rotate(q_abs, -positions), cache, needed, idx, requests, L, sink_tokens=sinks,
                                window_tokens=window, scale=scale, rope=rope, out=expected, triton=False)
    assert not torch.isnan(expected).any() and expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=3e-5)
    # The same plan serves every layer: a second layer's call reuses the step's rotation.
    again = torch.zeros_like(got)
    quant_sink_window_decode_cpu(q_abs, cache, plan, L, scale=scale, rope=rope, out=again, compiled=compiled)
    torch.testing.assert_close(again, got, atol=0, rtol=0)


@pytest.mark.parametrize("neox", [True, False])
def test_zero_point_keys_and_nf4_values_bounded(neox):
    """INT4 with a per-channel zero point and NF4 values: each key within one step of its
    block's channel range (a grown range re-encodes once), outlier channel and sinks at 8 bits,
    each value within half the widest NF4 gap of its token's absmax."""
    L, cache, k_pre, v, row, _ = _stream(4, neox=neox, offset=5.0, key_zero_point=True, value_levels="nf4")
    n = k_pre.shape[0]
    k, vv = quant_read_ref(cache, row, L, is_neox_style=neox)
    k, vv = _tokens(k, n), _tokens(vv, n)
    view = PageView(cache, L)
    hi, lo = view.k_scale[row].float(), view.k_zero[row].float()  # [m, H, D]
    step = _tokens(((hi - lo) / 15)[:, :, None, :].expand(-1, -1, L.block_size, -1), n)
    main = torch.ones(L.head_size, dtype=torch.bool)
    main[5] = False
    err = (k - k_pre).abs()
    assert (err[3:, :, main] <= step[3:, :, main] * 1.01 + 1e-3).all()
    assert (lo[..., 7] > 0).any()  # the offset channel's range does not straddle zero
    assert (err[3:, :, 5] <= k_pre[3:, :, 5].abs().amax() / 127 + 1e-3).all()
    assert (err[:3] <= k_pre[:3].abs().amax(dim=-1, keepdim=True) / 127 * 0.51 + 1e-3).all()
    half_gap = float((NF4[1:] - NF4[:-1]).max()) / 2
    assert ((vv - v).abs() <= v.abs().amax(dim=-1, keepdim=True) * half_gap * 1.01 + 1e-3).all()


def test_zero_point_and_nf4_beat_symmetric_uniform_int4():
    """What each INT4 refinement buys on its own kind of data: an offset key channel (pre-RoPE
    keys have them) and bell-shaped values."""
    sym = _stream(4, offset=6.0, n=64, chunks=(64,), bs=16, outlier_scale=1.0)
    zp = _stream(4, offset=6.0, n=64, chunks=(64,), bs=16, outlier_scale=1.0, key_zero_point=True, value_levels="nf4")
    errs = {}
    for name, (L, cache, k_pre, v, row, _) in (("sym", sym), ("zp", zp)):
        k, vv = quant_read_ref(cache, row, L)
        errs[name] = (float((_tokens(k, 64) - k_pre)[3:].norm() / k_pre[3:].norm()),
                      float((_tokens(vv, 64) - v).norm() / v.norm()))
    assert errs["zp"][0] < errs["sym"][0] * 0.8
    assert errs["zp"][1] < errs["sym"][1] * 0.95  # Gaussian values: 0.088 against 0.095


def test_layout_options_validated_and_counted():
    L = QuantLayout(4, 64, 128, key_zero_point=True, value_levels="nf4", align=128)
    assert L.v_scale_off == L.k_zero_off + 2 * 64 and L.ratio_to(2) >= 3.5
    with pytest.raises(ValueError, match="value_levels='nf4' needs bits=4"):
        QuantLayout(8, 64, 128, value_levels="nf4")
    with pytest.raises(ValueError, match="value_levels='mu-law'; allowed: uniform, nf4"):
        QuantLayout(4, 64, 128, value_levels="mu-law")
    with pytest.raises(ValueError, match="key_zero_point needs key_scale='channel'"):
        QuantLayout(4, 64, 128, key_zero_point=True, key_scale="token")
    plain = QuantLayout(16, 64, 128, sink_tokens=0)
    assert plain.head_bytes == 2 * 128 * 64 * 2 and plain.ratio_to(2) == 1.0  # no metadata at all
    with pytest.raises(ValueError, match="16-bit pages hold plain floats: sink_tokens=4"):
        QuantLayout(16, 64, 128)
    with pytest.raises(ValueError, match="float_dtype='float8'; allowed: float16, bfloat16"):
        QuantLayout(16, 64, 128, sink_tokens=0, float_dtype="float8")


@pytest.mark.parametrize(
    ("bits", "layout"), [(8, {}), (4, {"key_zero_point": True, "value_levels": "nf4"}), (16, {"sink_tokens": 0})]
)
@pytest.mark.parametrize(
    ("D", "H", "G", "bs", "neox", "n", "sinks", "window"),
    [
        (32, 2, 3, 8, True, 11, 3, 13),  # chunk past the window: evicted blocks in the row
        (16, 1, 2, 5, False, 7, 2, 9),  # odd block size, GPT-J pairing
        (32, 1, 1, 8, True, 9, 3, None),  # full causal attention
    ],
)
def test_prefill_kernel_matches_reference(bits, layout, D, H, G, bs, neox, n, sinks, window):
    """A prefill chunk over quantized pages (Triton) against the sink-window reference on the
    same pages dequantized (what the CPU path runs): keys before RoPE, cache-relative
    positions, evicted blocks garbage (NaN scales) and never read."""
    from vllm_kvstream.kernels.kv_quant_triton import quant_prefill_attention
    from vllm_kvstream.kernels.sink_attention import RequestSlice, sink_window_attention_ref

    total = 45
    L, cache, _, _, row, rope = _stream(bits, D=D, H=H, bs=bs, n=total, neox=neox, seed=D + n, nb=24, **layout)
    first = total - n
    lo = 0 if window is None else max(0, first - window + 1)
    live = set(range(-(-sinks // bs))) | set(range(max(sinks, lo) // bs, len(row)))
    for lb in range(len(row)):
        if lb not in live:
            cache[row[lb]] = 255  # evicted and reused: fp16 0xFFFF is NaN
    live_ids = row[sorted(live)]
    k = torch.full((cache.shape[0], H, bs, D), float("nan"))
    v = torch.full_like(k, float("nan"))
    k[live_ids], v[live_ids] = quant_read_ref(cache, live_ids, L, is_neox_style=neox)
    q_pre = torch.randn(n, H * G, D, generator=torch.Generator().manual_seed(n))
    scale = 1 / math.sqrt(D)
    expected = sink_window_attention_ref(
        q_pre, k, v, row[None], [RequestSlice(0, n, total, 0)], sink_tokens=sinks, window_tokens=window,
        scale=scale, rope=rope, rope_applied=False,
    )
    got = quant_prefill_attention(q_pre, cache, row, L, seq_len=total, sink_tokens=sinks, window_tokens=window,
                                  scale=scale, rope=rope, block_queries=4)
    assert not torch.isnan(expected).any()
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize(("sinks", "window", "lens"), [(3, 13, (45, 30, 12)), (3, 4, (45, 9, 12)), (3, None, (45, 30, 12))])
@pytest.mark.parametrize(("bits", "layout"), [(8, {}), (4, {"key_zero_point": True, "value_levels": "nf4"})])
def test_step_dispatcher_triton_equals_torch_path(bits, layout, sinks, window, lens):
    """The quantized backend's attention for a whole step (a prefill chunk and two decodes of
    three requests, planned as the backend plans them): the Triton path (what CUDA runs)
    equals the torch path (what the CPU runs)."""
    from vllm_kvstream.adapter.quant_attention import plan_quant_step
    from vllm_kvstream.kernels.kv_quant_triton import quant_sink_window_attention
    from vllm_kvstream.policies import AttentionPattern

    D, H, G, bs = 32, 2, 2, 8
    L, cache, _, _, row, rope = _stream(bits, D=D, H=H, bs=bs, n=45, seed=11, nb=24, **layout)
    # Three requests sharing the written blocks (rows of the same pages), lengths 45, 30, 12.
    table = torch.stack([row, row, row])
    lens = torch.tensor(lens)
    qsl = torch.tensor([0, 9, 10, 11])  # a 9-token chunk, then two decode tokens
    # (3, 4) with length 9: the decode's window starts in block 0 after evicted tokens.
    pattern = AttentionPattern(sink_tokens=sinks, window_tokens=window)
    positions, requests, needed, idx = plan_quant_step(qsl, lens, table, pattern, bs)
    q_pre = torch.randn(11, H * G, D, generator=torch.Generator().manual_seed(3))
    outs = []
    for triton in (False, True):
        out = torch.zeros(11, H * G, D)
        quant_sink_window_attention(q_pre, cache, needed, idx, requests, L, sink_tokens=sinks, window_tokens=window,
                                    scale=1 / math.sqrt(D), rope=rope, out=out, triton=triton)
        outs.append(out)
    assert outs[0].abs().sum() > 0
    torch.testing.assert_close(outs[1], outs[0], atol=3e-5, rtol=3e-5)


def test_decode_entries_split_a_block_holding_sinks_and_the_window_start():
    from vllm_kvstream.kernels.kv_quant_triton import decode_entries

    # block 8, sinks 3, window 4, query at 8: evicted 2 (tokens 3, 4); the window 5..8.
    entries, pos = decode_entries(9, 3, 4, 8)
    assert entries == [(0, 0, 3, 0), (0, 5, 8, 3), (1, 0, 1, 6)] and pos == 6
    # Nothing evicted yet: one run, positions unchanged.
    assert decode_entries(6, 3, 4, 8) == ([(0, 0, 3, 0), (0, 3, 6, 3)], 5)
    assert decode_entries(20, 0, None, 8) == ([(0, 0, 8, 0), (1, 0, 8, 8), (2, 0, 4, 16)], 19)


def test_kernel_choice_is_validated_and_needs_the_interpreter_off_cuda(monkeypatch):
    from vllm_kvstream.errors import KVStreamConfigError
    from vllm_kvstream.kernels.kv_quant_triton import use_triton

    t = torch.zeros(1)
    monkeypatch.delenv("VLLM_KVSTREAM_KERNELS", raising=False)
    assert use_triton(t) is False  # auto: Triton for CUDA tensors only
    monkeypatch.setenv("VLLM_KVSTREAM_KERNELS", "torch")
    assert use_triton(t) is False
    monkeypatch.setenv("VLLM_KVSTREAM_KERNELS", "triton")
    assert use_triton(t) is True  # TRITON_INTERPRET=1 here (conftest)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KVStreamConfigError, match="VLLM_KVSTREAM_KERNELS=triton on cpu tensors needs TRITON_INTERPRET=1"):
        use_triton(t)
    monkeypatch.setenv("VLLM_KVSTREAM_KERNELS", "cuda")
    with pytest.raises(KVStreamConfigError, match=r"VLLM_KVSTREAM_KERNELS='cuda'; allowed: auto, triton, torch"):
        use_triton(t)


@pytest.mark.parametrize(("bits", "layout"), [*LAYOUTS, (8, {"key_scale": "token"}), (4, {"outlier_channels": 0}),
                                              (4, {"sink_tokens": 0, "key_zero_point": True})])
@pytest.mark.parametrize(("D", "H", "bs", "neox"), [(32, 2, 8, True), (16, 3, 5, False)])
def test_fast_cpu_read_equals_the_reference(bits, layout, D, H, bs, neox):
    from vllm_kvstream.kernels.kv_quant import quant_read_cpu

    if layout.get("key_scale") == "token":
        layout = {**layout, "outlier_channels": 0}
    L, cache, _, _, row, _ = _stream(bits, D=D, H=H, bs=bs, neox=neox, **layout)
    blocks = row[torch.randperm(len(row), generator=torch.Generator().manual_seed(D))]  # written, shuffled
    k_ref, v_ref = quant_read_ref(cache, blocks, L, is_neox_style=neox)
    k, v = quant_read_cpu(cache, blocks, L, is_neox_style=neox)
    # The last block is partly written: its other slots decode garbage bytes, on both alike.
    torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=1e-6, equal_nan=True)
    torch.testing.assert_close(v, v_ref, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize(("bits", "layout"), [*LAYOUTS, (8, {"key_scale": "token", "outlier_channels": 0}),
                                              (4, {"outlier_channels": 0})])
@pytest.mark.parametrize(("D", "H", "bs", "neox"), [(32, 2, 8, True), (16, 3, 5, False)])
@pytest.mark.parametrize("compiled", [True, False], ids=["C", "torch"])
def test_batched_cpu_store_writes_the_reference_bytes(bits, layout, D, H, bs, neox, compiled):
    """A batch of streams: each prefilled by a chunk, then decode steps of one token per stream
    in a shuffled order (blocks started, sinks and channel ranges outgrown among them), then
    one token per call: the
    batched store (the torch ops, and the C helper ``csrc/quant_store.c``) leaves the cache
    and the EMAs byte for byte as the reference does."""
    from vllm_kvstream.kernels import cpu_ext
    from vllm_kvstream.kernels.kv_quant import quant_write_cpu

    if compiled and cpu_ext.library() is None:
        # Justified: the C form exists only where a compiler does; the torch ops run regardless.
        pytest.skip("no C compiler: the torch ops serve")

    gen = torch.Generator().manual_seed(bits + D + bs)
    L = QuantLayout(bits, D, bs, **{"sink_tokens": 3, "outlier_channels": 2, **layout})
    streams, nb, steps = 5, 60, 3 * bs
    rope = Rope.from_base(D, 10000.0, 1024, is_neox_style=neox)
    cache = torch.randint(0, 256, (nb, H, L.head_bytes), dtype=torch.uint8, generator=gen)
    rows = torch.randperm(nb, generator=gen).view(streams, -1)  # each stream's blocks, shuffled
    lens = [1, 2, bs - 1, bs, 2 * bs + 1]  # the first decode token: inside the sinks, a block's first slot, ...
    writes = []  # (stream, positions) per call
    writes.append([(r, torch.arange(n)) for r, n in enumerate(lens)])
    for i in range(steps):
        order = torch.randperm(streams, generator=gen).tolist()
        writes.append([(r, torch.tensor([lens[r] + i])) for r in order])
    for i in range(steps, steps + bs):  # then one token per call (a single stream's decode)
        writes += [[(r, torch.tensor([lens[r] + i]))] for r in range(streams)]
    # Then a prefill chunk per stream, all in one call: a block's end, whole blocks, a block's start.
    start = [n + steps + bs for n in lens]
    writes.append([(r, torch.arange(start[r], start[r] + 3 * bs + 2)) for r in range(streams)])
    ref, got = cache.clone(), cache.clone()
    s_ref, s_got = QuantStats.empty(H, D), QuantStats.empty(H, D)
    grown = batched = 0
    for call in writes:
        pos = torch.cat([p for _, p in call])
        slots = torch.cat([rows[r][p // bs] * bs + p % bs for r, p in call])
        k_pre = torch.randn(len(pos), H, D, generator=gen)
        k_pre[:, :, 5] *= 8.0
        k_pre *= 1.0 + 2.0 * (torch.rand(len(pos), 1, 1, generator=gen) < 0.2)  # some keys outgrow their block
        k = rope.rotate(k_pre, pos)
        v = torch.randn(len(pos), H, D, generator=gen)
        alone = (pos >= L.sink_tokens) & (pos % bs > 0) & torch.tensor([len(p) == 1 for _, p in call for _ in p])
        before = PageView(got, L).k_scale[slots // bs].clone() if L.scaled else None
        quant_write_ref(k, v, ref, slots, pos, s_ref, L, rope=rope, is_neox_style=neox)
        quant_write_cpu(k, v, got, slots, pos, s_got, L, rope=rope, is_neox_style=neox, compiled=compiled)
        assert torch.equal(got, ref), "the batched store wrote other bytes than the reference"
        for a, b in ((s_got.ema_absmax, s_ref.ema_absmax), (s_got.ema_min, s_ref.ema_min), (s_got.ema_max, s_ref.ema_max)):
            assert torch.equal(a, b)
        if L.scaled and L.key_scale == "channel" and len(call) > 1:
            after = PageView(got, L).k_scale[slots // bs]
            batched += int(alone.sum())
            grown += int(((after != before).flatten(1).any(dim=1) & alone).sum())
    if L.scaled and L.key_scale == "channel":  # the case ran, and re-encoded blocks too
        assert batched >= streams * (steps - 4) and 0 < grown < batched, (batched, grown)
