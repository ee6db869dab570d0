"""vLLM's own CPU attention kernel reading the in-place layout (``adapter.attention.
in_place_decode`` over ``kernels/sink_in_place.py``'s plan) against the gathering decode path:
block sizes the pinned ISAs serve, align=block and token-level sinks, sinks over two blocks,
sliding-window, private and shared blocks, dtypes with paired tolerances, soft-capping."""

import pytest
import torch

from tests.kernels.test_sink_decode import build_batch
from vllm_kvstream.kernels import Rope, plan_decode, sink_window_decode
from vllm_kvstream.kernels.sink_in_place import plan_in_place
from vllm_kvstream.policies import build_policy

CASES = [
    ("streaming-sink", {"sink_tokens": 32, "window_tokens": 96}, 32),  # align=block: S one block
    ("streaming-sink", {"sink_tokens": 4, "window_tokens": 60}, 32),
    ("streaming-sink", {"sink_tokens": 20, "window_tokens": 44}, 16),  # sinks over two blocks
    ("sliding-window", {"window_tokens": 40}, 16),
]


@pytest.mark.parametrize(("policy_name", "params", "block_size"), CASES)
@pytest.mark.parametrize("private", [True, False])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_stock_kernel_in_place_matches_gathering_decode(policy_name, params, block_size, private, dtype, tol, softcap):
    seq_lens = [1, 31, 32, 33, 127, 128, 129, 130, 160, 161, 200, 255, 256, 257, 1000, 1001]
    check_in_place(policy_name, params, block_size, private, dtype, tol, softcap, seq_lens)


@pytest.mark.parametrize(("policy_name", "params", "block_size"), CASES)
def test_one_evicting_request(policy_name, params, block_size):
    """One request past eviction (its sink copies a single block's: the gathered tensors' views
    are not contiguous unless made so, and vLLM's cache writer refuses them)."""
    check_in_place(policy_name, params, block_size, True, torch.float32, 2e-5, None, [1001])


def check_in_place(policy_name, params, block_size, private, dtype, tol, softcap, seq_lens):
    from vllm_kvstream.adapter.attention import in_place_decode, in_place_metadata

    gen = torch.Generator().manual_seed(block_size + private)
    policy = build_policy(policy_name, params)
    hq, hkv, d = 6, 2, 64
    rope = Rope.from_base(d, 10000.0, 128)
    kv, _, _, tables = build_batch(policy, seq_lens, block_size, hq, hkv, d, dtype, gen, rope)
    rows = torch.arange(len(seq_lens)) * 2 + 1
    query = (torch.randn(2 * len(seq_lens), hq, d, generator=gen) * 2).to(dtype)
    pat = policy.pattern
    kw = dict(sink_tokens=pat.sink_tokens, window_tokens=pat.window_tokens, block_size=block_size, rope=rope)
    expected = torch.full_like(query, 7.0)
    sink_window_decode(query, kv, plan_decode(rows, torch.tensor(seq_lens), tables, **kw), scale=0.125, rope=rope,
                       out=expected, softcap=softcap)
    plan = plan_in_place(rows, torch.tensor(seq_lens), tables, private_blocks=private, **kw)
    isa = "vec" if block_size % 32 == 0 else "vec16"
    plan = in_place_metadata(plan, num_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype, isa=isa)
    out = torch.full_like(query, 7.0)
    in_place_decode(query, kv, plan, scale=0.125, rope=rope, out=out, isa=isa, softcap=softcap)
    served = plan.rows
    if private:  # with private blocks only a block-aligned window (or one block of it) lacks room
        assert len(plan.rest) <= sum(n % block_size in (0, 1) for n in seq_lens)
    assert not torch.isnan(out[served]).any()
    torch.testing.assert_close(out[served].float(), expected[served].float(), atol=tol, rtol=tol)
    untouched = torch.ones(len(query), dtype=torch.bool).index_fill_(0, served, False)
    assert bool((out[untouched] == 7.0).all())
