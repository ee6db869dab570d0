"""Attention over a block selection against a dense per-query oracle written from the
definition: explicit kept-token lists, cache-relative RoPE positions, plain softmax, and the
attention mass summed per block by hand."""

import math

import pytest
import torch

from vllm_kvstream.kernels import (
    Rope,
    block_key_norms,
    selected_attention_cpu,
    selected_attention_ref,
    split_cpu_kv_cache,
    write_kv_ref,
)
from vllm_kvstream.kernels.topk_attention import evicted_after


def dense_oracle(q, k, v, kept_blocks, bs, num_tokens, first_pos, scale, rope, decay):
    n, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty(n, hq, d, dtype=torch.float64)
    mass = torch.zeros(len(kept_blocks), dtype=torch.float64)
    for i in range(n):
        p = first_pos + i
        toks = [t for b in kept_blocks for t in range(b * bs, (b + 1) * bs) if t < num_tokens and t <= p]
        kk = rope.rotate(k[toks].float(), torch.arange(len(toks))).double()
        qq = rope.rotate(q[i : i + 1].float(), torch.tensor([len(toks) - 1])).double()[0]
        w = decay ** (n - 1 - i)
        for h in range(hq):
            kh = h // (hq // hkv)
            prob = torch.softmax((kk[:, kh] @ qq[h]) * scale, dim=0)
            out[i, h] = prob @ v[toks, kh].double()
            for t, pr in zip(toks, prob):
                mass[kept_blocks.index(t // bs)] += w * pr
    return out, mass


@pytest.mark.parametrize(
    ("kept", "num_tokens", "n_query"),
    [
        ([0, 1, 2], 11, 11),  # nothing evicted, prefill from 0
        ([0, 3, 4, 9, 10, 11], 47, 1),  # decode after gaps
        ([0, 3, 4, 9, 10, 11], 46, 5),  # a tile inside the last blocks
        ([0, 1, 7, 8], 36, 4),
    ],
)
@pytest.mark.parametrize(("hq", "hkv", "d", "bs"), [(4, 2, 16, 4), (3, 3, 24, 4)])
@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_matches_dense_oracle(kept, num_tokens, n_query, hq, hkv, d, bs, decay):
    gen = torch.Generator().manual_seed(num_tokens * 7 + n_query)
    L = num_tokens
    k = torch.randn(L, hkv, d, generator=gen)
    v = torch.randn(L, hkv, d, generator=gen)
    q = torch.randn(n_query, hq, d, generator=gen)
    first_pos = L - n_query
    rope = Rope.from_base(d, 10000.0, 256)
    # Cache keys after RoPE at absolute positions, as the model writes them; queries too.
    k_abs = rope.rotate(k, torch.arange(L))
    q_abs = rope.rotate(q, torch.arange(first_pos, L))
    nblk = -(-L // bs)
    kv = torch.full((64, hkv, bs, 2 * d), float("nan"))  # evicted and foreign blocks: NaN
    kc, vc = kv[..., :d], kv[..., d:]
    phys = torch.randperm(63, generator=gen)[:nblk]
    for b in kept:
        t = torch.arange(b * bs, min(L, (b + 1) * bs))
        write_kv_ref(k_abs[t], v[t], kc, vc, phys[b] * bs + t % bs)
    scale = 1 / math.sqrt(d)
    out = torch.empty_like(q)
    mass = selected_attention_ref(
        q_abs, kc, vc, phys[kept], torch.tensor(kept), num_tokens=L, first_pos=first_pos,
        scale=scale, rope=rope, decay=decay, out=out,
    )
    expected, expected_mass = dense_oracle(q, k, v, kept, bs, L, first_pos, scale, rope, decay)
    torch.testing.assert_close(out.double(), expected, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(mass.double(), expected_mass, atol=3e-5, rtol=3e-5)
    # Every query's mass sums to the number of query heads.
    assert math.isclose(float(mass.sum()), hq * sum(decay**i for i in range(n_query)), rel_tol=1e-5)


@pytest.mark.parametrize("n_query", [1, 3, 16, 40])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("decay", [1.0, 0.8])
def test_cpu_layout_path_matches_reference(n_query, dtype, tol, decay):
    """The fast path on vLLM's raw CPU layout (queries or keys rotated, whichever is smaller)
    against the reference on split views of the same cache; freed blocks and the stale tail
    of the last block hold NaN."""
    gen = torch.Generator().manual_seed(n_query)
    hq, hkv, d, bs = 6, 2, 16, 8
    kv = torch.full((40, hkv, bs, 2 * d), float("nan"), dtype=dtype)
    kc, vc = split_cpu_kv_cache(kv)
    kept = [0, 4, 5, 11, 12, 13]
    num_tokens = 13 * bs + 5
    phys = torch.randperm(39, generator=gen)[: len(kept)]
    for b, p in zip(kept, phys):
        t = torch.arange(b * bs, min(num_tokens, (b + 1) * bs))
        k = torch.randn(len(t), hkv, d, generator=gen)
        v = torch.randn(len(t), hkv, d, generator=gen)
        write_kv_ref(k, v, kc, vc, p * bs + t % bs)
    q = torch.randn(n_query, hq, d, generator=gen).to(dtype)
    kw = dict(num_tokens=num_tokens, first_pos=num_tokens - n_query, scale=0.25,
              rope=Rope.from_base(d, 10000.0, 64), decay=decay)
    out_ref, out_cpu = torch.empty_like(q), torch.empty_like(q)
    mass_ref = selected_attention_ref(q, kc, vc, phys, torch.tensor(kept), out=out_ref, **kw)
    mass_cpu = selected_attention_cpu(q, kv, phys, torch.tensor(kept), out=out_cpu, **kw)
    assert not torch.isnan(out_cpu).any()
    torch.testing.assert_close(out_cpu.float(), out_ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(mass_cpu, mass_ref, atol=1e-4, rtol=1e-4)


def test_evicted_after_and_key_norms():
    assert evicted_after(torch.tensor([0, 3, 4, 9, 10])).tolist() == [6, 4, 4, 0, 0]
    kc = torch.zeros(3, 2, 4, 8)
    kc[1, :, :, 0] = 3.0
    kc[2, 0, :, 1] = 4.0
    assert block_key_norms(kc, torch.tensor([2, 1])).tolist() == [2.0, 3.0]


def _compiled_param():
    from vllm_kvstream.kernels import cpu_ext

    # Justified: the C form exists only where a compiler does; the torch variant runs regardless.
    return pytest.param(True, marks=pytest.mark.skipif(cpu_ext.library() is None,
                                                       reason="no C compiler: the torch ops serve"))


@pytest.mark.parametrize(("hq", "hkv", "d", "bs"), [(4, 2, 16, 4), (3, 3, 24, 8), (6, 2, 8, 5)])
@pytest.mark.parametrize("rope_kind", ["neox", "gptj", "partial", None])
@pytest.mark.parametrize("compiled", [False, _compiled_param()], ids=["torch", "C"])
def test_batched_decode_matches_reference_per_request(hq, hkv, d, bs, rope_kind, compiled):
    """B requests with different selections (gaps, no gaps, one block, a full last block),
    shuffled physical blocks, NaN in every block no request keeps, garbage in the unwritten
    tails of kept blocks (what a reused block holds: finite for the torch ops, which weight
    it 0; NaN for the C pass, which never reads it): one batched call equals the reference run
    request by request."""
    from vllm_kvstream.kernels import plan_selected_decode, selected_decode_cpu

    gen = torch.Generator().manual_seed(hq * 100 + bs)
    rope = {
        "neox": lambda: Rope.from_base(d, 10000.0, 512),
        "gptj": lambda: Rope.from_base(d, 10000.0, 512, is_neox_style=False),
        "partial": lambda: Rope.from_base(d // 2, 10000.0, 512),
        None: lambda: None,
    }[rope_kind]()
    cases = [  # (kept logical blocks, cached tokens incl. the query)
        ([0, 3, 4, 9, 10, 11], 11 * bs + 2),
        ([0, 1, 2], 2 * bs + 1),
        ([0], 3),
        ([0, 2, 5, 6], 7 * bs),  # the query fills its block
        ([0, 1, 7, 8, 9, 12], 12 * bs + bs - 1),
    ]
    kv = torch.full((80, hkv, bs, 2 * d), float("nan"))
    kc, vc = split_cpu_kv_cache(kv)
    free = torch.randperm(79, generator=gen).tolist()
    total = len(cases) + 3
    query = torch.randn(total, hq, d, generator=gen)
    rows = [2, 0, 5, 7, 4]  # scattered query rows; the rest belong to other requests
    expected = torch.full_like(query, 7.0)
    out = expected.clone()
    phys_all, shifts, counts, tails, masses = [], [], [], [], []
    for (kept, L), row in zip(cases, rows):
        phys = torch.tensor([free.pop() for _ in kept])
        stale = 1e3 * torch.randn(len(kept), hkv, bs, 2 * d, generator=gen)
        kv[phys] = stale.fill_(float("nan")) if compiled else stale
        for j, b in enumerate(kept):
            t = torch.arange(b * bs, min(L, (b + 1) * bs))
            write_kv_ref(torch.randn(len(t), hkv, d, generator=gen), torch.randn(len(t), hkv, d, generator=gen),
                         kc, vc, phys[j] * bs + t % bs)
        mass = selected_attention_ref(
            query[row : row + 1], kc, vc, phys, torch.tensor(kept), num_tokens=L, first_pos=L - 1,
            scale=0.3, rope=rope, out=expected[row : row + 1],
        )
        phys_all.append(phys)
        shifts.append(evicted_after(torch.tensor(kept)) * bs)
        counts.append(len(kept))
        tails.append(L - kept[-1] * bs)
        masses.append(mass)
    width = max(counts)
    blocks = torch.stack([torch.cat((p, p[:1].expand(width - len(p)))) for p in phys_all])  # pad: own first block
    shift = torch.nn.utils.rnn.pad_sequence(shifts, batch_first=True)
    plan = plan_selected_decode(torch.tensor(rows), torch.tensor(counts), torch.tensor(tails), width=width, block_size=bs)
    got_mass = selected_decode_cpu(query, kv, plan, blocks, shift, scale=0.3, rope=rope, out=out, compiled=compiled)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)  # untouched rows stay 7.0
    for i, mass in enumerate(masses):
        torch.testing.assert_close(got_mass[i, : counts[i]], mass, atol=2e-5, rtol=2e-5)
        assert not got_mass[i, counts[i] :].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [16, 128])
def test_compiled_decode_matches_torch_on_cache_dtypes(dtype, bs):
    """The C pass against the torch ops on the same cache, in vLLM's cache dtypes (both read
    the stored values, so only the summation order differs), with ragged selections, shifts
    and a padded batch; block 128 (vLLM's CPU default) takes the four-tile score loop, a
    partial last block its single tiles and single slots."""
    from vllm_kvstream.kernels import cpu_ext, plan_selected_decode, selected_decode_cpu

    if cpu_ext.library() is None:
        # Justified: the C form exists only where a compiler does; the torch ops run regardless.
        pytest.skip("no C compiler: the torch ops serve")
    gen = torch.Generator().manual_seed(3)
    hq, hkv, d = 9, 3, 64
    rope = Rope.from_base(d, 100000.0, 4096)
    kv = torch.randn(40, hkv, bs, 2 * d, generator=gen).to(dtype)
    kept = [[0, 3, 4, 9, 10], [0, 1], [0, 5, 6, 7, 8, 9, 12, 13]]
    lens = [10 * bs + (53 if bs > 64 else 5), 2 * bs, 13 * bs + 1]  # 53: the four-tile loop, 5 lanes of its last tile
    width = max(map(len, kept))
    perm = torch.randperm(40, generator=gen)
    blocks = torch.stack([torch.cat((perm[i * 8 : i * 8 + len(k)], perm[i * 8 : i * 8 + 1].expand(width - len(k))))
                          for i, k in enumerate(kept)])
    shift = torch.nn.utils.rnn.pad_sequence([evicted_after(torch.tensor(k)) * bs for k in kept], batch_first=True)
    for i, (k, L) in enumerate(zip(kept, lens)):  # the slots after each query: huge keys (the torch ops mask them)
        kv.view(40, hkv, 2, d, bs)[int(blocks[i, len(k) - 1])][:, 0, :, L - k[-1] * bs :] = 1e2  # keys: [D][bs]
    rows = torch.tensor([1, 0, 2])
    plan = plan_selected_decode(rows, torch.tensor([len(k) for k in kept]),
                                torch.tensor([L - k[-1] * bs for k, L in zip(kept, lens)]), width=width, block_size=bs)
    query = torch.randn(3, hq, d, generator=gen)
    outs, masses = [], []
    for compiled in (False, True):
        out = torch.zeros(3, hq, d, dtype=dtype)
        masses.append(selected_decode_cpu(query, kv, plan, blocks, shift, scale=0.125, rope=rope, out=out,
                                          compiled=compiled))
        outs.append(out.float())
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    torch.testing.assert_close(outs[1], outs[0], atol=tol, rtol=tol)
    torch.testing.assert_close(masses[1], masses[0], atol=1e-5, rtol=1e-5)
