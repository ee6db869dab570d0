"""The direct decode read (``kernels/sink_direct.py``: the compiled pass over each request's
sink and window slots in place) against the per-request reference, its oracle, on mixed
batches: requests before and after eviction, block-boundary lengths, sinks spanning blocks,
windows starting in the sink block, shuffled block tables, every slot no query attends (dead
slots, free slots, evicted tokens, freed and unheld blocks) filled with NaN, query rows
interleaved with other rows, NeoX / GPT-J / partial / no rotary, float32 and bfloat16."""

import pytest
import torch

from vllm_kvstream.kernels import RequestSlice, Rope, cpu_ext, sink_window_attention_ref, split_cpu_kv_cache, write_kv_ref
from vllm_kvstream.kernels.sink_direct import can_read_direct, plan_direct, sink_direct_decode

# Justified: the direct read exists only where a C compiler does; without one the adapter takes
# the in-place and gathering paths, tested in test_sink_in_place.py and test_sink_decode.py.
pytestmark = pytest.mark.skipif(
    cpu_ext.library() is None, reason="the direct read is the compiled pass; this machine builds no C helpers")

PATTERNS = [(4, 20), (11, 9), (1, 8), (0, 13), (20, 5), (4, None)]  # (sinks, window); None: full
SEQ_LENS = [1, 7, 8, 9, 24, 25, 26, 33, 40, 41, 97, 300]


def attended(p: int, sinks: int, window: int | None) -> range | list[int]:
    if window is None or p - window + 1 - sinks <= 0:
        return range(p + 1)
    return [*range(sinks), *range(p - window + 1, p + 1)]


def build_batch(seq_lens, sinks, window, block_size, hkv, d, dtype, gen, rope):
    """A paged cache holding each request's keys rotated at absolute positions; every slot of
    every block that no query of its request attends is NaN (keys and values), and so are
    the blocks no request holds."""
    max_blocks = max(-(-s // block_size) for s in seq_lens) + 2
    num_blocks = len(seq_lens) * max_blocks + 1
    kv = torch.full((num_blocks, hkv, block_size, 2 * d), float("nan"), dtype=dtype)
    kc, vc = split_cpu_kv_cache(kv)
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1
    tables = perm[: len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks).to(torch.int32)
    for r, seq in enumerate(seq_lens):
        row = tables[r].long()
        pos = torch.tensor(list(attended(seq - 1, sinks, window)))
        k = rope.rotate(torch.randn(len(pos), hkv, d, generator=gen), pos) if rope else torch.randn(len(pos), hkv, d, generator=gen)
        v = torch.randn(len(pos), hkv, d, generator=gen)
        write_kv_ref(k, v, kc, vc, row[pos // block_size] * block_size + pos % block_size)
    return kv, kc, vc, tables


ROPES = {
    "neox": lambda d: Rope.from_base(d, 10000.0, 64),  # positions past the table too
    "gptj": lambda d: Rope.from_base(d, 10000.0, 512, is_neox_style=False),
    "partial": lambda d: Rope.from_base(d // 2, 10000.0, 512),
    "none": lambda d: None,
}


@pytest.mark.parametrize(("sinks", "window"), PATTERNS)
@pytest.mark.parametrize("block_size", [8, 5, 16])
@pytest.mark.parametrize("rope_kind", list(ROPES))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_direct_decode_matches_reference(sinks, window, block_size, rope_kind, dtype, tol):
    gen = torch.Generator().manual_seed(block_size * 31 + sinks)
    hq, hkv, d = 6, 2, 16
    rope = ROPES[rope_kind](d)
    kv, kc, vc, tables = build_batch(SEQ_LENS, sinks, window, block_size, hkv, d, dtype, gen, rope)
    rows = torch.arange(len(SEQ_LENS)) * 3 + 2  # each decode row after two rows of something else
    query = (torch.randn(3 * len(SEQ_LENS), hq, d, generator=gen) * 2).to(dtype)
    plan = plan_direct(rows, torch.tensor(SEQ_LENS), tables, sink_tokens=sinks, window_tokens=window,
                       block_size=block_size, rope=rope)
    out = torch.full_like(query, 7.0)
    sink_direct_decode(query, kv, plan, scale=0.3, out=out)
    expected = sink_window_attention_ref(
        query, kc, vc, tables, [RequestSlice(int(q), int(q) + 1, s, block_row=r) for r, (q, s) in enumerate(zip(rows, SEQ_LENS))],
        sink_tokens=sinks, window_tokens=window, scale=0.3, rope=rope, rope_applied=True,
    )
    assert out.dtype == dtype
    assert not torch.isnan(out[rows]).any()
    torch.testing.assert_close(out[rows].float(), expected[rows].float(), atol=tol, rtol=tol)
    others = torch.ones(len(query), dtype=torch.bool)
    others[rows] = False
    assert bool((out[others] == 7.0).all()), "rows of other requests must be left untouched"
    sink_direct_decode(query, kv, plan, scale=0.3, out=out)  # the bound call, as a second layer runs it
    torch.testing.assert_close(out[rows].float(), expected[rows].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("threads", [1, 2])
def test_direct_decode_at_vllm_block_size(threads):
    """Block 128 with SmolLM2's geometry (3 KV heads of 3 queries, D 64) and sinks 4 + window
    1020: the four-tile score loop, windows starting at every offset class of a tile."""
    gen = torch.Generator().manual_seed(threads)
    hq, hkv, d, bs = 9, 3, 64, 128
    rope = Rope.from_base(d, 100000.0, 8192)
    seq_lens = [1025, 1030, 1100, 1151, 1152, 1153, 1300, 2050, 600]
    kv, kc, vc, tables = build_batch(seq_lens, 4, 1020, bs, hkv, d, torch.float32, gen, rope)
    rows = torch.arange(len(seq_lens))
    query = torch.randn(len(seq_lens), hq, d, generator=gen)
    plan = plan_direct(rows, torch.tensor(seq_lens), tables, sink_tokens=4, window_tokens=1020, block_size=bs, rope=rope)
    out = torch.zeros_like(query)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sink_direct_decode(query, kv, plan, scale=0.125, out=out)
    finally:
        torch.set_num_threads(before)
    expected = sink_window_attention_ref(
        query, kc, vc, tables, [RequestSlice(r, r + 1, s, block_row=r) for r, s in enumerate(seq_lens)],
        sink_tokens=4, window_tokens=1020, scale=0.125, rope=rope, rope_applied=True,
    )
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_plan_names_only_attended_slots():
    """Entries cover exactly the attended positions, each once, on the request's own blocks."""
    B, S, W = 8, 4, 20
    tables = torch.arange(1, 1 + 3 * 20, dtype=torch.int32).view(3, 20)
    seq_lens = [100, 12, 29]
    plan = plan_direct(torch.arange(3), torch.tensor(seq_lens), tables, sink_tokens=S, window_tokens=W, block_size=B,
                       rope=None)
    for r, seq in enumerate(seq_lens):
        slots = []
        for b, lo, hi in zip(plan.blocks[r].tolist(), plan.lo[r].tolist(), plan.hi[r].tolist()):
            logical = int(torch.nonzero(tables[r] == b)[0])
            slots += [logical * B + s for s in range(lo, hi)]
        assert sorted(slots) == list(attended(seq - 1, S, W))


def test_direct_read_refuses_caches_it_does_not_serve():
    plan = plan_direct(torch.arange(1), torch.tensor([40]), torch.arange(8, dtype=torch.int32)[None], sink_tokens=4,
                       window_tokens=20, block_size=8, rope=None)
    kv = torch.zeros(8, 2, 8, 32, dtype=torch.float16)
    assert not can_read_direct(torch.float16)
    with pytest.raises(ValueError, match="float16"):
        sink_direct_decode(torch.zeros(1, 4, 16, dtype=torch.float16), kv, plan, scale=1.0, out=torch.zeros(1, 4, 16))
