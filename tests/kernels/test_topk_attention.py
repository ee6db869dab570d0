"""Attention over a block selection against a dense per-query oracle written from the
definition: explicit kept-token lists, cache-relative RoPE positions, plain softmax, and the
attention mass summed per block by hand."""

import math

import pytest
import torch

from vllm_kvstream.kernels import Rope, block_key_norms, selected_attention_ref, write_kv_ref
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


def test_evicted_after_and_key_norms():
    assert evicted_after(torch.tensor([0, 3, 4, 9, 10])).tolist() == [6, 4, 4, 0, 0]
    kc = torch.zeros(3, 2, 4, 8)
    kc[1, :, :, 0] = 3.0
    kc[2, 0, :, 1] = 4.0
    assert block_key_norms(kc, torch.tensor([2, 1])).tolist() == [2.0, 3.0]
