"""``split_cpu_kv_cache`` describes the layout vLLM's own CPU cache writer produces, for the
ISAs the backend pins (the decode path and the reference read the cache through it)."""

import pytest
import torch

from vllm_kvstream.kernels import split_cpu_kv_cache


@pytest.mark.parametrize(("isa", "block_size"), [("vec", 32), ("vec", 128), ("vec16", 16), ("vec16", 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_matches_vllm_cpu_writer(isa, block_size, dtype):
    from vllm import _custom_ops as ops

    gen = torch.Generator().manual_seed(block_size)
    num_blocks, heads, head_size, tokens = 5, 3, 64, 70
    kv = torch.zeros(num_blocks, heads, block_size, 2 * head_size, dtype=dtype)
    stock_k, stock_v = kv.view(num_blocks, heads, 2 * block_size, head_size).chunk(2, dim=2)
    key = torch.randn(tokens, heads, head_size, generator=gen).to(dtype)
    value = torch.randn(tokens, heads, head_size, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    ops.cpu_attn_reshape_and_cache(
        key, value, stock_k, stock_v, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"
    )
    keys, values = split_cpu_kv_cache(kv)
    blocks, offsets = slots // block_size, slots % block_size
    assert torch.equal(keys[blocks, :, offsets], key)
    assert torch.equal(values[blocks, :, offsets], value)
