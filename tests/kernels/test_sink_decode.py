"""The batched decode path against the per-request reference (its oracle) on a mixed batch:
vLLM's CPU cache layout, requests before and after eviction starts, block-boundary lengths, sinks spanning several
blocks, shuffled block tables, freed blocks filled with NaN, query rows interleaved with
prefill rows, and dtypes with paired tolerances."""

import pytest
import torch

from vllm_kvstream.kernels import (
    RequestSlice,
    Rope,
    plan_decode,
    sink_window_attention_ref,
    sink_window_decode,
    split_cpu_kv_cache,
    write_kv_ref,
)
from vllm_kvstream.policies import build_policy

POLICIES = [
    ("streaming-sink", {"sink_tokens": 4, "window_tokens": 20}),
    ("streaming-sink", {"sink_tokens": 11, "window_tokens": 9}),
    ("streaming-sink", {"sink_tokens": 1, "window_tokens": 8}),
    ("sliding-window", {"window_tokens": 13}),
    ("full", None),
]


def build_batch(policy, seq_lens, block_size, hq, hkv, d, dtype, gen, rope):
    """A paged cache holding each request's keys rotated at absolute positions, with every block
    the policy freed overwritten by NaN, and garbage in unused blocks."""
    max_blocks = max(-(-s // block_size) for s in seq_lens) + 2
    num_blocks = len(seq_lens) * max_blocks + 1
    kv = (torch.randn(num_blocks, hkv, block_size, 2 * d, generator=gen) * 50).to(dtype)
    kv[0] = 0  # the null block
    kc, vc = split_cpu_kv_cache(kv)
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for r, seq in enumerate(seq_lens):
        row = perm[r * max_blocks : (r + 1) * max_blocks]
        tables[r] = row.to(torch.int32)
        k = rope.rotate(torch.randn(seq, hkv, d, generator=gen), torch.arange(seq))
        v = torch.randn(seq, hkv, d, generator=gen)
        slots = row.repeat_interleave(block_size)[:seq] * block_size + torch.arange(seq) % block_size
        write_kv_ref(k, v, kc, vc, slots)
        first, last = policy.freeable_block_range(seq - 1, block_size)
        for b in range(first, last):
            kv[row[b]] = float("nan")
    return kv, kc, vc, tables


@pytest.mark.parametrize(("policy_name", "params"), POLICIES)
@pytest.mark.parametrize("block_size", [8, 5])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("softcap", [None, 5.0])  # Gemma-2's logit soft-capping: scores here spread over several units
def test_decode_matches_reference(policy_name, params, block_size, dtype, tol, softcap):
    gen = torch.Generator().manual_seed(block_size)
    policy = build_policy(policy_name, params)
    hq, hkv, d = 6, 2, 16
    rope = Rope.from_base(d, 10000.0, 64)  # lengths past the table too
    seq_lens = [1, 7, 8, 9, 24, 25, 26, 40, 41, 97, 300]
    kv, kc, vc, tables = build_batch(policy, seq_lens, block_size, hq, hkv, d, dtype, gen, rope)
    # Packed batch: each decode row is preceded by two rows of some other request's prefill.
    rows = torch.arange(len(seq_lens)) * 3 + 2
    query = (torch.randn(3 * len(seq_lens), hq, d, generator=gen) * 2).to(dtype)
    pattern = policy.pattern
    plan = plan_decode(
        rows, torch.tensor(seq_lens), tables,
        sink_tokens=pattern.sink_tokens, window_tokens=pattern.window_tokens, block_size=block_size, rope=rope,
    )
    out = torch.full_like(query, 7.0)
    sink_window_decode(query, kv, plan, scale=0.3, rope=rope, out=out, softcap=softcap)
    expected = sink_window_attention_ref(
        query, kc, vc, tables, [RequestSlice(int(q), int(q) + 1, s, block_row=r) for r, (q, s) in enumerate(zip(rows, seq_lens))],
        sink_tokens=pattern.sink_tokens, window_tokens=pattern.window_tokens, scale=0.3, rope=rope, rope_applied=True,
        softcap=softcap,
    )
    assert out.dtype == dtype
    assert not torch.isnan(out[rows]).any()
    torch.testing.assert_close(out[rows].float(), expected[rows].float(), atol=tol, rtol=tol)
    others = torch.ones(len(query), dtype=torch.bool)
    others[rows] = False
    assert bool((out[others] == 7.0).all()), "rows of other requests must be left untouched"


def test_decode_reads_only_kept_blocks():
    """The plan names exactly the blocks the policy keeps (plus the null block as padding)."""
    policy = build_policy("streaming-sink", {"sink_tokens": 4, "window_tokens": 20})
    block_size = 8
    tables = torch.arange(1, 1 + 2 * 20, dtype=torch.int32).view(2, 20)
    plan = plan_decode(
        torch.tensor([0, 1]), torch.tensor([100, 12]), tables,
        sink_tokens=4, window_tokens=20, block_size=block_size, rope=None,
    )
    for r, seq in enumerate([100, 12]):
        first, last = policy.freeable_block_range(seq - 1, block_size)
        kept = {int(tables[r, b]) for b in range(-(-seq // block_size)) if not first <= b < last}
        read = {int(b) for b in plan.blocks[r]} - {0}
        assert read == kept


def test_cpu_layout_views_match_vllm_layout():
    """Keys transposed per (block, head), values after them: the layout vLLM's CPU kernels write."""
    kv = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(2, 1, 4, 6)  # bs 4, head_size 3
    keys, values = split_cpu_kv_cache(kv)
    flat = kv[1, 0].reshape(-1)
    assert keys[1, 0, 2, 1] == flat[1 * 4 + 2]  # key dim 1 of token 2: [D, bs] order
    assert values[1, 0, 2, 1] == flat[12 + 2 * 3 + 1]  # value token 2, dim 1: [bs, D] after the keys


def test_softcap_reference_is_capped_dense_attention():
    """With every token visible, the reference with ``softcap`` is dense causal attention over
    ``softcap * tanh(q.k * scale / softcap)``, and differs from the uncapped one."""
    gen = torch.Generator().manual_seed(0)
    n, h, d, bs = 12, 2, 8, 4
    k, v, q = (torch.randn(n, h, d, generator=gen) * 3 for _ in range(3))
    kv = torch.zeros(n // bs + 1, h, bs, 2 * d)
    kc, vc = split_cpu_kv_cache(kv)
    write_kv_ref(k, v, kc, vc, torch.arange(n) + bs)  # blocks 1.. (0 is the null block)
    table = torch.arange(1, n // bs + 1, dtype=torch.int32)[None]
    req = [RequestSlice(0, n, n, block_row=0)]
    got = sink_window_attention_ref(q, kc, vc, table, req, sink_tokens=0, window_tokens=None, scale=0.5, rope=None, softcap=2.0)
    s = torch.einsum("qhd,khd->hqk", q, k) * 0.5
    s = torch.tanh(s / 2.0) * 2.0
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    dense = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
    plain = sink_window_attention_ref(q, kc, vc, table, req, sink_tokens=0, window_tokens=None, scale=0.5, rope=None)
    assert (plain - got).abs().max() > 0.1
