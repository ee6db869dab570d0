"""Where a policy's blocks live: vLLM's own layout (CPU, unquantized) or the plugin's pages
(quantized; 16-bit off CPU or with ``kv_pages='paged16'``), their page size, and the backend
the platform wrapper picks for each. The off-CPU cases run here with ``cpu=False`` (what the
CUDA platform answers) — the choice is a pure function of the setting and the platform."""

from types import SimpleNamespace

import pytest
import torch

from vllm_kvstream.adapter import attention
from vllm_kvstream.adapter.kv_manager import KVStreamAttentionSpec, make_spec, page_layout, plugin_pages
from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.policies import build_policy
from vllm_kvstream.quant import parse_quant


def _spec(dtype=torch.bfloat16, block=64, heads=3, head=64):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=block, num_kv_heads=heads, head_size=head, dtype=dtype)


@pytest.mark.parametrize(
    "quant, pages, cpu, plugin",
    [(None, "auto", True, False), (None, "paged16", True, True), (None, "auto", False, True),
     ("int8", "auto", True, True), ("int4", "auto", False, True)],
)
def test_which_blocks_live_in_plugin_pages(quant, pages, cpu, plugin):
    q = parse_quant(quant)
    assert plugin_pages(q, pages, cpu) is plugin
    layout = page_layout(q, pages, 64, 64, torch.float16, cpu=cpu)
    assert (layout is not None) is plugin
    if plugin:
        assert layout.bits == (q.bits if q else 16)


def test_16bit_pages_cost_what_vllms_layout_costs_and_keep_the_model_dtype():
    policy = build_policy("streaming-sink", {"sink_tokens": 4, "window_tokens": 252})
    for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        stock = _spec(dtype)
        for cpu, pages in ((False, "auto"), (True, "paged16")):
            spec = make_spec(stock, policy, 256, None, pages, cpu=cpu)
            assert isinstance(spec, KVStreamAttentionSpec) and spec.kv_pages == name and spec.kv_quant == ""
            assert spec.dtype == torch.uint8 and spec.page_size_bytes == stock.page_size_bytes
            assert spec.quant_layout.bits == 16 and spec.quant_layout.float_dtype == name
            assert KVStreamAttentionSpec.merge([spec, spec]) == spec
        # On CPU by default the blocks stay in vLLM's layout.
        plain = make_spec(stock, policy, 256, None, "auto", cpu=True)
        assert plain.kv_pages == "" and plain.dtype == dtype and plain.quant_layout is None
    # Quantized pages are smaller whatever the platform (3.3x at block 64; 3.5x at 128).
    int4 = make_spec(_spec(), policy, 256, parse_quant("int4"), "auto", cpu=False)
    assert int4.kv_pages == "" and int4.page_size_bytes * 3.3 < _spec().page_size_bytes


def test_float32_model_is_refused_16bit_pages_naming_dtype_and_allowed():
    with pytest.raises(KVStreamConfigError, match=r"off CPU stores 16-bit floats; the model's dtype is torch.float32. "
                       r"Allowed: --dtype float16 or bfloat16, or --kv-quant int8\|int4"):
        page_layout(None, "auto", 64, 64, torch.float32, cpu=False)
    with pytest.raises(KVStreamConfigError, match=r"kv_pages='paged16' stores 16-bit floats"):
        page_layout(None, "paged16", 64, 64, torch.float32, cpu=True)
    assert page_layout(None, "auto", 64, 64, torch.float32, cpu=True) is None  # CPU: vLLM's float32 layout
    assert page_layout(parse_quant("int8"), "auto", 64, 64, torch.float32, cpu=False).bits == 8


@pytest.mark.parametrize(
    "quant, pages, cpu, expect",
    [(None, "auto", True, attention.BACKEND_PATH), (None, "paged16", True, attention.QUANT_BACKEND_PATH),
     (None, "auto", False, attention.QUANT_BACKEND_PATH), ("int4", "auto", True, attention.QUANT_BACKEND_PATH)],
)
def test_platform_wrapper_routes_policies_by_where_their_blocks_live(monkeypatch, quant, pages, cpu, expect):
    from vllm.platforms import current_platform

    attention.route_backend()
    attention.route_backend()  # idempotent
    policy = build_policy("streaming-sink", {})
    monkeypatch.setattr(attention, "active_policy", lambda: policy)
    monkeypatch.setattr(attention, "active_quant", lambda: parse_quant(quant))
    monkeypatch.setattr(attention, "active_pages", lambda: pages)
    monkeypatch.setattr(attention, "on_cpu", lambda: cpu)
    selector = SimpleNamespace(
        use_sparse=False, use_mla=False, attn_type=attention.AttentionType.DECODER, kv_cache_dtype="auto",
        has_sliding_window=False,
    )
    assert type(current_platform).get_attn_backend_cls(None, selector) == expect
    # A model's own sliding-window layers: the paged backend where blocks live in the plugin's
    # pages (one page size per model), else the platform's own backend (vLLM's semantics).
    sliding = SimpleNamespace(**{**vars(selector), "has_sliding_window": True})
    got = type(current_platform).get_attn_backend_cls(None, sliding)
    if expect == attention.QUANT_BACKEND_PATH:
        assert got == expect
    else:
        assert got not in (attention.BACKEND_PATH, attention.QUANT_BACKEND_PATH)
    # Without a policy the platform's own answer passes through.
    monkeypatch.setattr(attention, "active_policy", lambda: None)
    assert type(current_platform).get_attn_backend_cls(None, selector) not in (attention.BACKEND_PATH, attention.QUANT_BACKEND_PATH)


def test_paged_backend_head_sizes_follow_the_platform(monkeypatch):
    from vllm_kvstream.adapter import quant_attention

    monkeypatch.setattr(quant_attention, "on_cpu", lambda: False)
    assert quant_attention.KVStreamQuantBackend.get_supported_head_sizes() == [32, 64, 128, 256]
    monkeypatch.setattr(quant_attention, "on_cpu", lambda: True)
    assert 80 in quant_attention.KVStreamQuantBackend.get_supported_head_sizes()  # the torch path takes any even size
