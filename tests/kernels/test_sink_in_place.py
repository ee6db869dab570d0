"""The in-place decode layout (``kernels/sink_in_place.py``) against the gathering decode path
(``sink_window_decode``, itself checked against the per-request reference): after the sink
copies are staged, a paged kernel with a sliding window of S + W tokens reading the planned
block tables gives the policy's attention. Freed blocks are NaN, block tables shuffled; the
test also checks the plan writes nothing but dead slots of a window's first block and free
slots of its last, and leaves to the gathering path exactly the requests it has no room for."""

import pytest
import torch

from tests.kernels.test_sink_decode import build_batch
from vllm_kvstream.kernels import Rope, plan_decode, sink_window_decode, split_cpu_kv_cache
from vllm_kvstream.kernels.sink_in_place import in_place_decode_ref, plan_in_place, stage_sinks_
from vllm_kvstream.policies import build_policy

POLICIES = [
    ("streaming-sink", {"sink_tokens": 8, "window_tokens": 24}),  # align=block at 8: S one block, W 3 blocks
    ("streaming-sink", {"sink_tokens": 4, "window_tokens": 20}),
    ("streaming-sink", {"sink_tokens": 11, "window_tokens": 9}),  # sinks over two blocks
    ("streaming-sink", {"sink_tokens": 1, "window_tokens": 5}),  # window inside one block
    ("sliding-window", {"window_tokens": 13}),
]
SEQ_LENS = list(range(1, 90, 1)) + [300, 301, 1000]


def _case(policy_name, params, block_size, private, dtype=torch.float32, softcap=None):
    gen = torch.Generator().manual_seed(block_size + 7 * private)
    policy = build_policy(policy_name, params)
    hq, hkv, d = 6, 2, 16
    rope = Rope.from_base(d, 10000.0, 64)
    kv, kc, vc, tables = build_batch(policy, SEQ_LENS, block_size, hq, hkv, d, dtype, gen, rope)
    rows = torch.arange(len(SEQ_LENS)) * 2 + 1  # each decode row after a row of something else
    query = (torch.randn(2 * len(SEQ_LENS), hq, d, generator=gen) * 2).to(dtype)
    pat = policy.pattern
    kw = dict(sink_tokens=pat.sink_tokens, window_tokens=pat.window_tokens, block_size=block_size, rope=rope)
    expected = torch.full_like(query, 7.0)
    sink_window_decode(query, kv, plan_decode(rows, torch.tensor(SEQ_LENS), tables, **kw), scale=0.3, rope=rope,
                       out=expected, softcap=softcap)
    plan = plan_in_place(rows, torch.tensor(SEQ_LENS), tables, private_blocks=private, **kw)
    return policy, kv, tables, rows, query, rope, plan, expected


@pytest.mark.parametrize(("policy_name", "params"), POLICIES)
@pytest.mark.parametrize("block_size", [8, 5])
@pytest.mark.parametrize("private", [True, False])
def test_in_place_layout_matches_gathering_decode(policy_name, params, block_size, private):
    policy, kv, tables, rows, query, rope, plan, expected = _case(policy_name, params, block_size, private)
    before = kv.clone()
    stage_sinks_(kv, plan, rope)
    out = torch.full_like(query, 7.0)
    in_place_decode_ref(query, kv, plan, scale=0.3, out=out)
    served = plan.rows
    assert len(served) + len(plan.rest) == len(SEQ_LENS)
    assert not torch.isnan(out[served]).any()
    torch.testing.assert_close(out[served], expected[served], atol=1e-5, rtol=1e-5)

    # Written: only dead slots of F (when private) and free slots of L, of evicting requests.
    pat = policy.pattern
    S, W, B = pat.sink_tokens, pat.window_tokens, block_size
    allowed = set()
    for r, seq in enumerate(SEQ_LENS):
        p = seq - 1
        if p - W + 1 - S <= 0:
            continue
        lo = p - W + 1
        for pos in range(p + 1, (p // B + 1) * B):  # L's free slots
            allowed.add(int(tables[r, pos // B]) * B + pos % B)
        if private:
            for pos in range((lo // B) * B, lo):  # F's dead slots
                allowed.add(int(tables[r, pos // B]) * B + pos % B)
    written = set()
    for now, then in zip(split_cpu_kv_cache(kv), split_cpu_kv_cache(before)):  # [blocks, heads, slots, D]
        changed = (now != then) & ~(torch.isnan(now) & torch.isnan(then))
        blocks, _, slots, _ = torch.nonzero(changed, as_tuple=True)
        written |= set((blocks * B + slots).tolist())
    assert written <= allowed
    if S and len(plan.sink_dst):
        assert set(plan.sink_dst.tolist()) <= allowed


@pytest.mark.parametrize("block_size", [8, 5])
def test_rest_is_exactly_the_requests_without_room(block_size):
    """Block-aligned sinks (S = B) fit only where F's dead slots are private: shared blocks
    leave every evicting request to the gathering path, private ones all but the aligned step."""
    S, W = block_size, 3 * block_size
    for private in (False, True):
        _, _, _, rows, _, _, plan, _ = _case("streaming-sink", {"sink_tokens": S, "window_tokens": W}, block_size, private)
        evicting = {i for i, n in enumerate(SEQ_LENS) if n > S + W}
        rest = set(plan.rest.tolist())
        if not private:
            assert rest == evicting
        else:  # no room only when the window is block aligned: t = B
            assert rest == {i for i in evicting if SEQ_LENS[i] % block_size == 0}


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_in_place_layout_dtypes_and_softcap(dtype, tol, softcap):
    _, kv, _, _, query, rope, plan, expected = _case(
        "streaming-sink", {"sink_tokens": 4, "window_tokens": 20}, 8, True, dtype=dtype, softcap=softcap
    )
    stage_sinks_(kv, plan, rope)
    out = torch.full_like(query, 7.0)
    in_place_decode_ref(query, kv, plan, scale=0.3, out=out, softcap=softcap)
    torch.testing.assert_close(out[plan.rows].float(), expected[plan.rows].float(), atol=tol, rtol=tol)


def _staged(kv, plan, rope, compiled):
    out = kv.clone()
    stage_sinks_(out, plan, rope, compiled=compiled)
    return out


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 0.0), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize(("params", "block_size"), [
    ({"sink_tokens": 8, "window_tokens": 24}, 8),  # S = B: every evicting decode is case B
    ({"sink_tokens": 7, "window_tokens": 22}, 5),  # sinks over two blocks
    ({"sink_tokens": 4, "window_tokens": 20}, 8),
])
@pytest.mark.parametrize(("neox", "rotary_dim"), [(True, 16), (False, 16), (True, 8)])
def test_compiled_staging_writes_the_torch_staging(dtype, tol, params, block_size, neox, rotary_dim):
    """``csrc/stage_sinks.c`` (one pass: gather, rotate, scatter) against the torch path, on
    shuffled block tables with NaN in freed blocks: the same slots written with the same values
    (float32 bit for bit: the same products and sums, no fused multiply-add; bfloat16 rounds
    once in C where torch rounds after each op), GPT-J and partial rotary layouts included."""
    from vllm_kvstream.kernels import cpu_ext

    if cpu_ext.library() is None:
        # Justified: the C form exists only where a compiler does; the torch path is tested above.
        pytest.skip("no C compiler: the torch path serves (tested above)")
    _, kv, tables, rows, _, _, _, _ = _case("streaming-sink", params, block_size, True, dtype=dtype)
    rope = Rope.from_base(rotary_dim, 10000.0, 64, is_neox_style=neox)
    plan = plan_in_place(rows, torch.tensor(SEQ_LENS), tables, sink_tokens=params["sink_tokens"],
                         window_tokens=params["window_tokens"], block_size=block_size, rope=rope, private_blocks=True)
    assert plan.sink_dst.numel() > 0 and cpu_ext.can_stage(kv)
    got, want = _staged(kv, plan, rope, True), _staged(kv, plan, rope, False)
    assert torch.equal(torch.isnan(got), torch.isnan(want))  # the same slots written
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)
    assert not torch.equal(got.nan_to_num(), kv.nan_to_num())


def test_staging_without_the_compiled_helper_falls_back_to_torch(monkeypatch):
    """``VLLM_KVSTREAM_CPU_EXT=0`` (as where no compiler exists): no library, the torch path
    writes the same copies."""
    from vllm_kvstream.kernels import cpu_ext

    _, kv, _, _, _, rope, plan, _ = _case("streaming-sink", {"sink_tokens": 8, "window_tokens": 24}, 8, True)
    want = _staged(kv, plan, rope, False)
    monkeypatch.setenv("VLLM_KVSTREAM_CPU_EXT", "0")
    cpu_ext.library.cache_clear()
    try:
        assert cpu_ext.library() is None and not cpu_ext.can_stage(kv)
        torch.testing.assert_close(_staged(kv, plan, rope, True), want, atol=0, rtol=0, equal_nan=True)
    finally:
        monkeypatch.delenv("VLLM_KVSTREAM_CPU_EXT")
        cpu_ext.library.cache_clear()


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(("S", "W", "B"), [(8, 24, 8), (6, 24, 5), (3, 13, 8)])  # S = B; sinks over 2 blocks; case A and B
def test_step_after_step_value_copies_stay_valid(compiled, S, W, B):
    """A few requests decoding step after step in one cache, as vLLM runs them: each step writes
    its token, frees the blocks the window left (NaN: another request's data), plans with the
    last step's ``staged`` and stages (compiled: only the value copies not already in place).
    Every served step equals the gathering decode over the same cache, across block boundaries
    and case A/B changes; the reuse happens (values skipped)."""
    gen = torch.Generator().manual_seed(S * 100 + W)
    H, G, D, n_req, steps = 2, 3, 16, 3, 3 * B + 5
    policy = build_policy("streaming-sink", {"sink_tokens": S, "window_tokens": W})
    assert (policy.pattern.sink_tokens, policy.pattern.window_tokens) == (S, W)
    rope = Rope.from_base(D, 10000.0, 4096)
    nb = n_req * 40 + 1
    kv = torch.randn(nb, H, B, 2 * D, generator=gen)  # stale data in unwritten slots
    kv[0] = 0  # vLLM's null block (the gathering plan pads with it)
    keys, values = split_cpu_kv_cache(kv)
    tables = (torch.randperm(nb - 1, generator=gen) + 1).view(n_req, 40)
    p = torch.tensor([S + W + 3, S + W + B + 1, S + W + 2 * B - 2])  # evicting from the start

    def write(r, pos):
        blk, off = int(tables[r, pos // B]), pos % B
        keys[blk, :, off] = torch.randn(H, D, generator=gen)
        values[blk, :, off] = torch.randn(H, D, generator=gen)

    for r in range(n_req):
        for pos in list(range(S)) + list(range(int(p[r]) - W, int(p[r]))):
            write(r, pos)
    previous, skipped, served_steps = None, 0, 0
    kw = dict(sink_tokens=S, window_tokens=W, block_size=B, rope=rope)
    for _ in range(steps):
        for r in range(n_req):
            write(r, int(p[r]))
            first, last = policy.freeable_block_range(int(p[r]), B)
            for blk in range(first, last):  # left by the window: freed, reused
                keys[int(tables[r, blk])] = float("nan")
                values[int(tables[r, blk])] = float("nan")
        seq = p + 1
        rows = torch.arange(n_req)
        plan = plan_in_place(rows, seq, tables, private_blocks=True, previous=previous, **kw)
        if plan.value_mask is not None:
            skipped += int((~plan.value_mask).sum())
        stage_sinks_(kv, plan, rope, compiled=compiled)
        query = torch.randn(n_req, H * G, D, generator=gen)
        out = torch.full_like(query, 7.0)
        in_place_decode_ref(query, kv, plan, scale=0.3, out=out)
        expected = torch.full_like(query, 7.0)
        sink_window_decode(query, kv, plan_decode(rows, seq, tables, **kw), scale=0.3, rope=rope, out=expected)
        served = plan.rows
        torch.testing.assert_close(out[served], expected[served], atol=1e-5, rtol=1e-5)
        served_steps += len(served)
        previous = plan.staged
        p = p + 1
    assert served_steps > n_req * steps // 3
    assert skipped > 0  # the plan reuses value copies (the torch path writes them all anyway)
