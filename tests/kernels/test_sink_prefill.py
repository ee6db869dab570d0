"""The tiled prefill path against the untiled reference: same outputs for every tile size,
batches of requests with chunks that straddle tiles, freed blocks poisoned with NaN."""

import math

import pytest
import torch

from vllm_kvstream.kernels import (
    RequestSlice, Rope, sink_window_attention_ref, sink_window_attention_tiled,
    write_kv_ref,
)
from vllm_kvstream.kernels.sink_prefill import (
    flash_serves, sink_window_attention, sink_window_attention_flash, split_requests, tile_tokens,
)
from vllm_kvstream.policies import build_policy

from tests.kernels.test_sink_attention import SMALL_POLICIES


def test_split_requests_covers_every_query_once_with_its_own_sequence_end():
    reqs = [RequestSlice(0, 10, 50, 0), RequestSlice(10, 11, 7, 1), RequestSlice(11, 18, 7, 2)]
    tiles = split_requests(reqs, 4)
    assert [(t.q_start, t.q_end, t.seq_len, t.block_row) for t in tiles] == [
        (0, 4, 44, 0), (4, 8, 48, 0), (8, 10, 50, 0), (10, 11, 7, 1), (11, 15, 4, 2), (15, 18, 7, 2),
    ]
    with pytest.raises(ValueError, match="tile must be >= 1, got 0"):
        split_requests(reqs, 0)


def test_tile_follows_window_within_bounds():
    assert tile_tokens(3) == 64 and tile_tokens(252) == 252 and tile_tokens(4092) == 512


def _batch(policy, gen, *, hq=6, hkv=2, d=16, bs=5, lens=(131, 40, 1, 90, 300), nq=(57, 40, 1, 13, 300)):
    """A packed batch over a shuffled block table, the freed blocks poisoned with NaN."""
    table = torch.full((len(lens), 80), 255, dtype=torch.int32)
    kv = torch.randn(256, hkv, bs, 2 * d, generator=gen)
    kc, vc = kv[..., :d], kv[..., d:]
    used = torch.randperm(255, generator=gen).tolist()
    requests, start = [], 0
    for r, (L, n) in enumerate(zip(lens, nq)):
        k = torch.randn(L, hkv, d, generator=gen)
        v = torch.randn(L, hkv, d, generator=gen)
        nblk = -(-L // bs)
        row = torch.tensor([used.pop() for _ in range(nblk)])
        slots = row.repeat_interleave(bs)[:L] * bs + torch.arange(L) % bs
        write_kv_ref(k, v, kc, vc, slots)
        first, last = policy.freeable_block_range(L - n, bs)
        for b in range(first, last):
            kv[row[b]] = float("nan")
        table[r, :nblk] = row.to(torch.int32)
        requests.append(RequestSlice(start, start + n, L, r))
        start += n
    q = torch.randn(start, hq, d, generator=gen)
    return q, kc, vc, table, requests


@pytest.mark.parametrize(("policy_name", "params"), SMALL_POLICIES)
@pytest.mark.parametrize("tile", [1, 7, 16, 1000, None])
@pytest.mark.parametrize("rope_applied", [True, False])
def test_tiled_equals_reference(policy_name, params, tile, rope_applied):
    gen = torch.Generator().manual_seed(7)
    policy = build_policy(policy_name, params)
    d = 16
    q, kc, vc, table, requests = _batch(policy, gen, lens=(131, 40, 1, 90), nq=(57, 40, 1, 13))
    kw = dict(
        sink_tokens=policy.pattern.sink_tokens, window_tokens=policy.pattern.window_tokens,
        scale=1 / math.sqrt(d), rope=Rope.from_base(d, 10000.0, 256), rope_applied=rope_applied,
    )
    expected = sink_window_attention_ref(q, kc, vc, table, requests, **kw)
    got = sink_window_attention_tiled(q, kc, vc, table, requests, tile=tile, **kw)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not flash_serves(torch.zeros(1), window_tokens=1, softcap=None), reason="torch lacks the fused CPU op")
@pytest.mark.parametrize(("policy_name", "params"), [p for p in SMALL_POLICIES if build_policy(*p).pattern.window_tokens])
@pytest.mark.parametrize("tile", [1, 7, 64, None])
@pytest.mark.parametrize("rope_applied", [True, False])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(6, 2, 16), (3, 3, 8), (9, 3, 64)])
def test_flash_equals_reference(policy_name, params, tile, rope_applied, hq, hkv, d):
    gen = torch.Generator().manual_seed(11)
    policy = build_policy(policy_name, params)
    q, kc, vc, table, requests = _batch(policy, gen, hq=hq, hkv=hkv, d=d)
    kw = dict(
        sink_tokens=policy.pattern.sink_tokens, window_tokens=policy.pattern.window_tokens,
        scale=1 / math.sqrt(d), rope=Rope.from_base(d, 10000.0, 512), rope_applied=rope_applied,
    )
    expected = sink_window_attention_ref(q, kc, vc, table, requests, **kw)
    got = sink_window_attention_flash(q, kc, vc, table, requests, tile=tile, **kw)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    # the dispatcher picks it on CPU without soft-capping, the reference with it
    torch.testing.assert_close(sink_window_attention(q, kc, vc, table, requests, **kw), expected, atol=2e-5, rtol=2e-5)
    capped = sink_window_attention(q, kc, vc, table, requests, softcap=5.0, **kw)
    torch.testing.assert_close(capped, sink_window_attention_ref(q, kc, vc, table, requests, softcap=5.0, **kw))


@pytest.mark.skipif(not flash_serves(torch.zeros(1), window_tokens=1, softcap=None), reason="torch lacks the fused CPU op")
def test_flash_bf16_close_to_float32_reference():
    gen = torch.Generator().manual_seed(3)
    policy = build_policy("streaming-sink", {"sink_tokens": 4, "window_tokens": 60})
    q, kc, vc, table, requests = _batch(policy, gen)
    kw = dict(sink_tokens=4, window_tokens=60, scale=0.25, rope=Rope.from_base(16, 10000.0, 512), rope_applied=True)
    expected = sink_window_attention_ref(q, kc, vc, table, requests, **kw)
    got = sink_window_attention_flash(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), table, requests, **kw)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)
