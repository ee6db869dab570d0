"""The paged sink-window attention reference against a dense, per-query oracle written
independently (explicit token lists, StreamingLLM positions, plain softmax)."""

import math

import pytest
import torch

from vllm_kvstream.kernels import RequestSlice, Rope, sink_window_attention_ref, write_kv_ref
from vllm_kvstream.policies import build_policy


def dense_oracle(q, k, v, policy, scale, rope, first_pos):
    """q: [n, Hq, D] for positions first_pos..; k, v: [L, Hkv, D] for positions 0..L-1 (pre-RoPE)."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty(n, hq, d, dtype=torch.float64)
    for i in range(n):
        p = first_pos + i
        toks = [t for r in policy.attended_ranges(p) for t in r]
        # StreamingLLM: cache holds `toks` in order; positions 0..len-1; query at len-1.
        cache_pos = torch.arange(len(toks))
        kk = rope.rotate(k[toks].float(), cache_pos).double()
        qq = rope.rotate(q[i : i + 1].float(), torch.tensor([len(toks) - 1])).double()[0]
        for h in range(hq):
            kh = h // (hq // hkv)
            s = (kk[:, kh] @ qq[h]) * scale
            w = torch.softmax(s, dim=0)
            out[i, h] = w @ v[toks, kh].double()
    return out


def make_paged(k, v, block_size, num_blocks, gen):
    """Scatter [L, H, D] into a shuffled paged cache with garbage elsewhere; return caches and row."""
    L, h, d = k.shape
    nblk = -(-L // block_size)
    kv = torch.randn(num_blocks, h, block_size, 2 * d, generator=gen) * 100  # garbage
    row = torch.randperm(num_blocks, generator=gen)[:nblk]
    kc, vc = kv[..., :d], kv[..., d:]
    slots = row.repeat_interleave(block_size)[:L] * block_size + torch.arange(L) % block_size
    write_kv_ref(k, v, kc, vc, slots)
    return kv, kc, vc, row


#: Policies at small sizes: sinks that fill a block or not, windows of odd lengths.
SMALL_POLICIES = [
    ("streaming-sink", {"sink_tokens": 4, "window_tokens": 20}),
    ("streaming-sink", {"sink_tokens": 3, "window_tokens": 17}),
    ("sliding-window", {"window_tokens": 19}),
    ("full", None),
]


@pytest.mark.parametrize(("policy_name", "params"), SMALL_POLICIES)
@pytest.mark.parametrize(("seq_len", "n_query"), [(1, 1), (23, 23), (70, 1), (70, 9), (131, 40)])
@pytest.mark.parametrize(("hq", "hkv", "d", "block_size"), [(4, 2, 16, 8), (3, 3, 24, 5)])
def test_reference_matches_dense_oracle(policy_name, params, seq_len, n_query, hq, hkv, d, block_size):
    gen = torch.Generator().manual_seed(seq_len * 31 + n_query)
    policy = build_policy(policy_name, params)
    k = torch.randn(seq_len, hkv, d, generator=gen)
    v = torch.randn(seq_len, hkv, d, generator=gen)
    q = torch.randn(n_query, hq, d, generator=gen)
    kv, kc, vc, row = make_paged(k, v, block_size, num_blocks=64, gen=gen)
    # Evicted blocks: overwrite every block the policy has freed with garbage (another request's
    # data); the kernel must not read it.
    first, last = policy.freeable_block_range(seq_len - n_query, block_size)
    for b in range(first, last):
        kv[row[b]] = float("nan")
    table = torch.full((2, 40), 63, dtype=torch.int32)
    table[1, : len(row)] = row.to(torch.int32)
    rope = Rope.from_base(d, 10000.0, 256)
    scale = 1 / math.sqrt(d)
    out = sink_window_attention_ref(
        q, kc, vc, table, [RequestSlice(0, n_query, seq_len, block_row=1)],
        sink_tokens=policy.pattern.sink_tokens, window_tokens=policy.pattern.window_tokens,
        scale=scale, rope=rope,
    )
    expected = dense_oracle(q, k, v, policy, scale, rope, seq_len - n_query)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_batch_of_requests_and_dtypes(dtype, atol):
    gen = torch.Generator().manual_seed(7)
    policy = build_policy("streaming-sink", {"sink_tokens": 2, "window_tokens": 12})
    d, h = 16, 2
    lens = [(5, 5), (40, 1), (33, 7)]  # (seq_len, n_query)
    kv = torch.zeros(48, h, 8, 2 * d, dtype=dtype)
    kc, vc = kv[..., :d], kv[..., d:]
    table = torch.zeros(len(lens), 8, dtype=torch.int32)
    perm = torch.randperm(48, generator=gen)
    qs, reqs, expected, start = [], [], [], 0
    for r, (L, n) in enumerate(lens):
        k = torch.randn(L, h, d, generator=gen)
        v = torch.randn(L, h, d, generator=gen)
        row = perm[r * 8 : r * 8 + 8]
        table[r] = row.to(torch.int32)
        slots = row.repeat_interleave(8)[:L] * 8 + torch.arange(L) % 8
        write_kv_ref(k, v, kc, vc, slots)
        q = torch.randn(n, h, d, generator=gen)
        qs.append(q)
        reqs.append(RequestSlice(start, start + n, L, block_row=r))
        rope = Rope.from_base(d, 10000.0, 128)
        expected.append(dense_oracle(q, k.to(dtype), v.to(dtype), policy, 0.25, rope, L - n))
        start += n
    out = sink_window_attention_ref(
        torch.cat(qs).to(dtype), kc, vc, table, reqs, sink_tokens=2, window_tokens=12, scale=0.25, rope=rope
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), torch.cat(expected), atol=atol, rtol=atol)


def test_rope_beyond_table_uses_exact_angles():
    rope = Rope.from_base(8, 10000.0, 16)
    far = Rope.from_base(8, 10000.0, 5000)
    pos = torch.tensor([3, 15, 16, 4999])
    x = torch.randn(4, 1, 8)
    torch.testing.assert_close(rope.rotate(x, pos), far.rotate(x, pos), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("policy_name", "params"),
    [
        ("streaming-sink", {"sink_tokens": 4, "window_tokens": 20}),
        ("streaming-sink", {"sink_tokens": 11, "window_tokens": 9}),
        ("sliding-window", {"window_tokens": 19}),
        ("full", None),
    ],
)
@pytest.mark.parametrize(("seq_len", "n_query"), [(1, 1), (23, 23), (70, 1), (131, 40), (3000, 3)])
def test_post_rope_cache_matches_dense_oracle(policy_name, params, seq_len, n_query):
    """Keys cached rotated at absolute positions (past the rope table too) and queries rotated at
    theirs: the same outputs as StreamingLLM's cache-relative positions."""
    gen = torch.Generator().manual_seed(seq_len + n_query)
    hq, hkv, d, block_size = 4, 2, 16, 8
    policy = build_policy(policy_name, params)
    k = torch.randn(seq_len, hkv, d, generator=gen)
    v = torch.randn(seq_len, hkv, d, generator=gen)
    q = torch.randn(n_query, hq, d, generator=gen)
    rope = Rope.from_base(d, 10000.0, 256)  # positions up to 3000 are past this table
    pos = torch.arange(seq_len)
    kv, kc, vc, row = make_paged(rope.rotate(k, pos), v, block_size, num_blocks=400, gen=gen)
    first, last = policy.freeable_block_range(seq_len - n_query, block_size)
    for b in range(first, last):
        kv[row[b]] = float("nan")
    table = row.to(torch.int32)[None, :]
    out = sink_window_attention_ref(
        rope.rotate(q, pos[seq_len - n_query :]), kc, vc, table, [RequestSlice(0, n_query, seq_len, block_row=0)],
        sink_tokens=policy.pattern.sink_tokens, window_tokens=policy.pattern.window_tokens,
        scale=0.25, rope=rope, rope_applied=True,
    )
    expected = dense_oracle(q, k, v, policy, 0.25, rope, seq_len - n_query)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), expected, atol=5e-5, rtol=5e-5)
