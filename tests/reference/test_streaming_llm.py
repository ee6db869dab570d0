"""Tests for the independent StreamingLLM oracle in ``vllm_kvstream.reference.streaming_llm``."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vllm_kvstream.reference.streaming_llm import (
    full_logprobs,
    kept_token_indices,
    streaming_logprobs,
    streaming_logprobs_stepwise,
    streaming_perplexity,
)

ATOL = 1e-4
VOCAB = 1000


def _tiny_llama(num_layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=256,
        max_position_embeddings=512,
        rope_theta=10000.0,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).to(torch.float32).eval()


def _tokens(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def _row_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().amax(dim=-1)


@pytest.fixture(scope="module", autouse=True)
def _single_intra_op_thread():
    # The oracle issues many tiny ops; on a small CPU shared with other processes, intra-op
    # threads waiting for each other make them up to ~100x slower. Restored after this module.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model2() -> LlamaForCausalLM:
    return _tiny_llama(num_layers=2)


@pytest.fixture(scope="module")
def model1() -> LlamaForCausalLM:
    return _tiny_llama(num_layers=1, seed=3)


def test_kept_token_indices():
    assert kept_token_indices(0, sink_tokens=4, window_tokens=3) == [0]
    assert kept_token_indices(2, sink_tokens=4, window_tokens=3) == [0, 1, 2]
    assert kept_token_indices(5, sink_tokens=4, window_tokens=3) == [0, 1, 2, 3, 4, 5]
    assert kept_token_indices(6, sink_tokens=4, window_tokens=3) == [0, 1, 2, 3, 4, 5, 6]
    assert kept_token_indices(7, sink_tokens=4, window_tokens=3) == [0, 1, 2, 3, 5, 6, 7]
    assert kept_token_indices(20, sink_tokens=2, window_tokens=1) == [0, 1, 20]
    assert kept_token_indices(20, sink_tokens=0, window_tokens=4) == [17, 18, 19, 20]


def test_invalid_arguments(model2):
    with pytest.raises(ValueError):
        streaming_logprobs(model2, [1, 2, 3], sink_tokens=-1, window_tokens=4)
    with pytest.raises(ValueError):
        streaming_logprobs(model2, [1, 2, 3], sink_tokens=1, window_tokens=0)
    with pytest.raises(ValueError):
        streaming_perplexity(model2, [1], sink_tokens=1, window_tokens=4)


def test_full_logprobs_is_plain_forward(model2):
    ids = _tokens(17)
    lp = full_logprobs(model2, ids)
    assert lp.shape == (17, VOCAB) and lp.dtype == torch.float32
    with torch.no_grad():
        ref = torch.log_softmax(model2(torch.tensor([ids])).logits[0].float(), dim=-1)
    # A near-exact bound is valid: full_logprobs is this very forward (same ops, same shapes).
    torch.testing.assert_close(lp, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("sinks", "window", "length"), [(4, 36, 40), (4, 100, 40), (0, 40, 40), (40, 1, 41)]
)
def test_a_no_eviction_equals_full(model2, sinks, window, length):
    # (a) T <= S + W: nothing is ever evicted and cache positions are the true positions.
    ids = _tokens(length)
    stream = streaming_logprobs(model2, ids, sink_tokens=sinks, window_tokens=window)
    assert stream.shape == (length, VOCAB) and stream.dtype == torch.float32
    torch.testing.assert_close(stream, full_logprobs(model2, ids), atol=ATOL, rtol=0)


def test_b_prefix_equal_then_differs(model2):
    # (b) T > S + W: rows before the first eviction (p < S + W) equal the full model, every later
    # row differs from it.
    sinks, window, length = 4, 32, 120
    ids = _tokens(length)
    stream = streaming_logprobs(model2, ids, sink_tokens=sinks, window_tokens=window)
    full = full_logprobs(model2, ids)
    diff = _row_diff(stream, full)
    assert diff[: sinks + window].max().item() < ATOL
    assert diff[sinks + window :].min().item() > 1e-3
    # Proper distributions.
    torch.testing.assert_close(stream.exp().sum(-1), torch.ones(length), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("sinks", "window"), [(4, 16), (1, 5), (3, 1)])
def test_c_one_layer_equals_truncated_sequence(model1, sinks, window):
    # (c) Row p equals the full model run on [x_0..x_{S-1}, x_{p-W+1}..x_p] at its last position.
    #
    # Why this is exact only for a 1-layer model: in layer 0 the cached (pre-RoPE) K/V of a token
    # is a function of that token's embedding alone, so the kept K/V at step p are the same
    # whether they come from the stream or from the truncated sequence; with cache-relative
    # positions 0..n-1 (query n-1) the RoPE'd keys/query are identical too, hence the single
    # attention + MLP + head yield the same row. In a model with >= 2 layers, the layer-l (l >= 1)
    # K/V of a window token x_q were computed when x_q was the query, i.e. after attending to
    # *its* window x_{q-W+1}..x_q (tokens that are already evicted at step p), whereas in the
    # truncated sequence x_q only sees the sinks and the window tokens before it. So the identity
    # is exact for one layer and (in general) false for more; both facts are asserted.
    length = 70
    ids = _tokens(length, seed=7)
    stream = streaming_logprobs(model1, ids, sink_tokens=sinks, window_tokens=window)
    for p in range(sinks + window, length, 3):
        truncated = ids[:sinks] + ids[p - window + 1 : p + 1]
        ref = full_logprobs(model1, truncated)[-1]
        torch.testing.assert_close(stream[p], ref, atol=ATOL, rtol=0)


def test_c_multi_layer_truncation_is_not_an_identity(model2):
    # Contrast with the 1-layer case: the oracle keeps the K/V computed at the time (no
    # recomputation), so in 2 layers row p is NOT the truncated-sequence forward.
    sinks, window, length = 4, 16, 60
    ids = _tokens(length, seed=7)
    stream = streaming_logprobs(model2, ids, sink_tokens=sinks, window_tokens=window)
    p = length - 1
    ref = full_logprobs(model2, ids[:sinks] + ids[p - window + 1 : p + 1])[-1]
    assert _row_diff(stream[p], ref).item() > 1e-3


@pytest.mark.parametrize("sinks", [0, 3])
def test_multi_layer_receptive_field(model2, sinks):
    # Exact multi-layer check of the eviction semantics: with L layers, row p can only depend on
    # the sinks and on tokens >= p - L*(W-1) (each layer reaches at most W-1 tokens further back
    # through the cached K/V). Perturbing a non-sink token just outside that range must leave row
    # p bit-for-bit unchanged; perturbing the boundary token must change it.
    window, layers, length = 8, 2, 48
    p = length - 1
    boundary = p - layers * (window - 1)
    assert boundary - 1 >= sinks
    ids = _tokens(length, seed=11)
    base = streaming_logprobs(model2, ids, sink_tokens=sinks, window_tokens=window)

    outside = list(ids)
    outside[boundary - 1] = (outside[boundary - 1] + 1) % VOCAB
    out_lp = streaming_logprobs(model2, outside, sink_tokens=sinks, window_tokens=window)
    # Exact equality is valid: the same code on the same shapes, only an input row p never reads.
    assert _row_diff(out_lp[p], base[p]).item() <= 1e-6

    inside = list(ids)
    inside[boundary] = (inside[boundary] + 1) % VOCAB
    in_lp = streaming_logprobs(model2, inside, sink_tokens=sinks, window_tokens=window)
    assert _row_diff(in_lp[p], base[p]).item() > 1e-4

    # A sink, however old, is always visible.
    if sinks:
        sink_changed = list(ids)
        sink_changed[0] = (sink_changed[0] + 1) % VOCAB
        s_lp = streaming_logprobs(model2, sink_changed, sink_tokens=sinks, window_tokens=window)
        assert _row_diff(s_lp[p], base[p]).item() > 1e-4


def test_d_zero_sinks_is_plain_sliding_window(model1, model2):
    # (d) S = 0: a plain sliding window of the last W tokens with positions 0..W-1.
    window, length = 10, 50
    ids = _tokens(length, seed=5)

    # 1 layer: row p is exactly the full model on the last W tokens (see test (c) for why).
    stream1 = streaming_logprobs(model1, ids, sink_tokens=0, window_tokens=window)
    for p in range(length):
        ref = full_logprobs(model1, ids[max(0, p - window + 1) : p + 1])[-1]
        torch.testing.assert_close(stream1[p], ref, atol=ATOL, rtol=0)

    # 2 layers: the first W rows are the full model; later rows differ; and token 0 is not a sink,
    # so once it is out of the receptive field it has no influence at all.
    stream2 = streaming_logprobs(model2, ids, sink_tokens=0, window_tokens=window)
    diff = _row_diff(stream2, full_logprobs(model2, ids))
    assert diff[:window].max().item() < ATOL
    assert diff[window:].min().item() > 1e-3
    changed = list(ids)
    changed[0] = (changed[0] + 1) % VOCAB
    stream2b = streaming_logprobs(model2, changed, sink_tokens=0, window_tokens=window)
    far = 2 * (window - 1) + 1  # first row whose 2-layer receptive field excludes token 0
    # Exact equality is valid: the same code on the same shapes, only an input these rows never read.
    assert _row_diff(stream2b[far:], stream2[far:]).max().item() <= 1e-6
    assert _row_diff(stream2b[:far], stream2[:far]).min().item() > 0.0


@pytest.mark.parametrize(
    ("sinks", "window", "length"), [(4, 12, 40), (0, 7, 30), (2, 1, 20), (25, 3, 20)]
)
def test_stepwise_stream_matches_layerwise_oracle(model2, sinks, window, length):
    # The literal token-by-token stream (explicit cache with append + evict, whole model run per
    # token) and the layer-by-layer evaluation order used by streaming_logprobs agree.
    ids = _tokens(length, seed=13)
    stepwise = streaming_logprobs_stepwise(model2, ids, sink_tokens=sinks, window_tokens=window)
    layerwise = streaming_logprobs(model2, ids, sink_tokens=sinks, window_tokens=window)
    assert stepwise.shape == layerwise.shape == (length, VOCAB)
    torch.testing.assert_close(stepwise, layerwise, atol=1e-5, rtol=0)


def test_computes_in_model_dtype(model2):
    # A bfloat16 copy of the model: the oracle computes in bf16 (it matches the bf16 forward, not
    # the float32 one, when nothing is evicted) and still returns float32 log-probabilities.
    ids = _tokens(40, seed=17)
    bf16 = _tiny_llama(num_layers=2)
    bf16.load_state_dict(model2.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    stream = streaming_logprobs(bf16, ids, sink_tokens=4, window_tokens=40)
    assert stream.dtype == torch.float32
    full_bf16 = full_logprobs(bf16, ids)
    full_fp32 = full_logprobs(model2, ids)
    assert _row_diff(full_bf16, full_fp32).max().item() > 1e-3  # bf16 rounding is visible ...
    torch.testing.assert_close(stream, full_bf16, atol=1e-3, rtol=0)  # ... and reproduced


def test_empty_stream(model2):
    assert streaming_logprobs(model2, [], sink_tokens=1, window_tokens=4).shape == (0, VOCAB)
    stepwise = streaming_logprobs_stepwise(model2, [], sink_tokens=1, window_tokens=4)
    assert stepwise.shape == (0, VOCAB)


def test_perplexity(model2):
    ids = _tokens(80, seed=9)
    sinks, window = 2, 20
    lp = streaming_logprobs(model2, ids, sink_tokens=sinks, window_tokens=window)
    nll = -lp[torch.arange(79), torch.tensor(ids[1:])]
    ppl = streaming_perplexity(model2, ids, sink_tokens=sinks, window_tokens=window)
    assert math.isfinite(ppl)
    # A near-exact bound is valid: streaming_perplexity reduces this very streaming_logprobs call.
    assert ppl == pytest.approx(math.exp(nll.double().mean().item()), rel=1e-9)
    # Without eviction the perplexity is the full model's.
    full = full_logprobs(model2, ids)
    full_ppl = math.exp((-full[torch.arange(79), torch.tensor(ids[1:])]).double().mean().item())
    assert streaming_perplexity(model2, ids, sink_tokens=4, window_tokens=76) == pytest.approx(
        full_ppl, rel=1e-4
    )
