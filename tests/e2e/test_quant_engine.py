"""``--kv-quant`` end to end on a real vLLM engine (CPU): the KV capacity vLLM allocates and
admits by grows by the real byte ratio, a long INT4 streaming-sink stream stays bounded, and
quantized streams stay close to unquantized ones on a trained model, INT8 closer than INT4."""

import math

import pytest

from tests.e2e.conftest import policy_config, run_engine
from tests.e2e.greedy_compare import assert_greedy_agree
from vllm_kvstream.adapter.kv_manager import quant_layout
from vllm_kvstream.quant import parse_quant

pytestmark = pytest.mark.e2e


def test_capacity_grows_by_the_byte_ratio_against_bf16(tiny_model):
    short = {"prompts": [list(range(3000, 3200))], "sampling": {"max_tokens": 8, "temperature": 0.0}}
    base = {"model": tiny_model, "enforce_eager": True, "dtype": "bfloat16", "block_size": 128, "seed": 0}
    stock = run_engine(base, [short])
    for method, bits, need in (("int8", 8, 1.9), ("int4", 4, 3.5)):
        got = run_engine({**base, "additional_config": {"kv_quant": method}}, [short])
        ratio = got["num_blocks"] / stock["num_blocks"]
        assert ratio >= need, (method, ratio)
        # The ratio is the default layout's, metadata counted (2 layers of 2 KV heads of 64).
        layout = quant_layout(parse_quant(method), 64, 128)
        assert layout.bits == bits and ratio == pytest.approx(layout.ratio_to(2), rel=0.01)
        assert len(got["jobs"][0]["results"][0]["token_ids"]) == 8


def test_int4_streaming_sink_long_stream_bounded_and_pool_recovers(tiny_model):
    from vllm_kvstream.policies import build_policy

    sink, window, block, chunk = 4, 60, 16, 64
    bound = build_policy("streaming-sink", {"sink_tokens": sink, "window_tokens": window}).max_blocks_per_request(
        block, chunk, 1 << 40
    )
    prompt = [1000 + (7 * i) % 30000 for i in range(4 * (sink + window))]
    gen = {"prompts": [prompt], "sampling": {"max_tokens": 28 * (sink + window), "ignore_eos": True, "temperature": 0.0}}
    engine = {
        "model": tiny_model, "enforce_eager": True, "dtype": "float32", "block_size": block,
        "max_num_batched_tokens": chunk, "seed": 0,
        "additional_config": {**policy_config("streaming-sink", sink_tokens=sink, window_tokens=window), "kv_quant": "int4"},
    }
    out = run_engine(engine, [gen])["jobs"][0]
    assert len(out["results"][0]["token_ids"]) == 28 * (sink + window)  # 32x the cache in all
    assert 0 < out["peak_held"][0] <= bound
    assert out["free_end"] == out["free_start"]


@pytest.mark.slow  # the suite's time budget: INT8/INT4 quality on SmolLM2 (README Results); the
# quantization error bounds and the engine path stay in the default suite
def test_quantized_close_to_unquantized_on_smollm2(smollm2):
    from transformers import AutoTokenizer

    from vllm_kvstream.data.austen import austen_text

    tokens = AutoTokenizer.from_pretrained(smollm2)(austen_text()[20000:40000])["input_ids"][:1000]
    job = {"prompts": [tokens], "sampling": {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}}
    runs = {}
    sink = policy_config("streaming-sink", sink_tokens=4, window_tokens=252)
    topk = policy_config("topk-importance", budget_tokens=256, sink_tokens=4, recent_tokens=128, score="key-norm")
    for name, ac, quant in (("sink", sink, None), ("sink", sink, "int8"), ("sink", sink, "int4"),
                            ("topk", topk, None), ("topk", topk, "int8")):
        ac = {**ac, "kv_quant": quant} if quant else ac
        engine = {"model": smollm2, "enforce_eager": True, "dtype": "float32", "block_size": 32, "seed": 0,
                  "max_num_batched_tokens": 512, "additional_config": ac}
        runs[name, quant] = run_engine(engine, [job])["jobs"][0]["results"][0]["prompt_logprobs"][1:]
    ppl = {key: math.exp(-sum(lps) / len(lps)) for key, lps in runs.items()}

    def drift(name, quant):
        return sum(abs(a - b) for a, b in zip(runs[name, quant], runs[name, None])) / len(runs[name, None])

    # Quantization happened and costs in the order of the bit width...
    assert 0 < drift("sink", "int8") < drift("sink", "int4")
    # ...and stays small: a wrong scale, position or block would cost far more than this.
    assert ppl["sink", "int8"] < 1.01 * ppl["sink", None], ppl
    assert ppl["sink", "int4"] < 1.05 * ppl["sink", None], ppl
    # topk-importance over quantized pages (blocks selected, contents moved as pages).
    assert 0 < drift("topk", "int8") and ppl["topk", "int8"] < 1.01 * ppl["topk", None], ppl


@pytest.mark.slow  # ~3.5 min each (suite budget); run with -m slow
def test_paged16_pages_match_vllms_layout_on_smollm2(smollm2):
    """``kv_pages='paged16'`` runs on CPU the path every policy takes on CUDA (the plugin's
    16-bit pages, keys before RoPE): same page size as vLLM's layout, and the same stream —
    prefill past the window and greedy decode — up to bf16 rounding."""
    from transformers import AutoTokenizer

    from vllm_kvstream.data.austen import austen_text

    tokens = AutoTokenizer.from_pretrained(smollm2)(austen_text()[20000:40000])["input_ids"]
    jobs = [
        {"tag": "p", "prompts": [tokens[:1000]], "sampling": {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}},
        {"tag": "g", "prompts": [tokens[1000:1500]],
         "sampling": {"max_tokens": 48, "temperature": 0.0, "logprobs": 2, "ignore_eos": True}},
    ]
    sink = policy_config("streaming-sink", sink_tokens=4, window_tokens=252)
    runs = {}
    for pages in ("auto", "paged16"):
        engine = {"model": smollm2, "enforce_eager": True, "dtype": "bfloat16", "block_size": 32, "seed": 0,
                  "max_num_batched_tokens": 512, "additional_config": {**sink, "kv_pages": pages}}
        runs[pages] = run_engine(engine, jobs)
    stock, paged = runs["auto"], runs["paged16"]
    assert paged["num_blocks"] == stock["num_blocks"]  # a 16-bit page costs what vLLM's page costs
    a, b = (r["jobs"][0]["results"][0]["prompt_logprobs"][1:] for r in (stock, paged))
    ppl_a, ppl_b = (math.exp(-sum(x) / len(x)) for x in (a, b))
    assert abs(ppl_b / ppl_a - 1) < 0.01, (ppl_a, ppl_b)  # measured: +0.28%
    assert sum(abs(x - y) for x, y in zip(a, b)) / len(a) < 0.1  # measured: 0.040
    ga, gb = (r["jobs"][1]["results"][0] for r in (stock, paged))
    # Greedy decode past the window: two numerics (keys rounded to bf16 before RoPE here, after
    # it in vLLM's pages), and bf16 logits come in steps of 1/8 at SmolLM2's magnitudes: top-2
    # margins of 0.25 at positions 0 and 1, an exact tie at 11 that flips (536 vs 744), log-probs
    # up to 0.12 apart (one step) before it. So tokens are compared up to the first flip at a
    # near tie, log-probs within 0.3 (a wrong block or position costs ~1); the floor is the
    # first position only, since the reference's first margin is already within 2 * 0.3.
    report = assert_greedy_agree(ga, gb, tol=0.3, min_compared=1, label="paged16 vs vLLM's layout")
    same = report["compared"] if report["diverged_at"] is None else report["diverged_at"]
    if same:  # the chosen tokens' log-probs, on average, where both picked the same (measured: 0.036 over 11)
        assert sum(abs(x - y) for x, y in zip(ga["logprobs"][:same], gb["logprobs"][:same])) / same < 0.1, report
    assert paged["jobs"][1]["peak_held"] == stock["jobs"][1]["peak_held"]  # the same blocks kept: 16


def _mean_abs(a, b):
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


@pytest.mark.slow  # ~3.5 min each (suite budget); run with -m slow
def test_cuda_kernel_path_inside_a_real_engine_matches_the_torch_path(tiny_model):
    """``VLLM_KVSTREAM_KERNELS=triton`` (with ``TRITON_INTERPRET=1``, set by tests/conftest.py)
    runs every Triton store, prefill and batched decode launch the CUDA path makes, inside a
    real vLLM engine on CPU, with its own block tables, slots and chunked batches of two
    streams that evict: the same streams as the torch path. 16-bit pages in float16 store the
    same bytes on both paths, so they agree to float32 summation order; INT4 codes may differ
    by a rounding step between the kernel and the reference. Two kernels, two numerics: greedy
    tokens are compared up to a flip at a near tie (tests/e2e/greedy_compare.py)."""
    sink = policy_config("streaming-sink", sink_tokens=4, window_tokens=60)
    prompts = [[1000 + (7 * i + 13 * r) % 30000 for i in range(150 + 37 * r)] for r in range(2)]
    job = {"prompts": prompts,
           "sampling": {"max_tokens": 24, "temperature": 0.0, "logprobs": 2, "ignore_eos": True, "prompt_logprobs": 0}}
    for extra, dtype in (({"kv_pages": "paged16"}, "float16"), ({"kv_quant": "int4"}, "bfloat16")):
        engine = {"model": tiny_model, "enforce_eager": True, "dtype": dtype, "block_size": 16, "seed": 0,
                  "max_num_batched_tokens": 64, "additional_config": {**sink, **extra}}
        torch_run, triton_run = (
            run_engine(engine, [job], env={"VLLM_KVSTREAM_KERNELS": kernels})["jobs"][0] for kernels in ("torch", "triton")
        )
        assert torch_run["peak_held"] == triton_run["peak_held"]
        for r, (a, b) in enumerate(zip(torch_run["results"], triton_run["results"])):
            prompt_diff = _mean_abs(a["prompt_logprobs"][1:], b["prompt_logprobs"][1:])
            label = f"{extra} request {r}"
            if "kv_pages" in extra:
                # measured: prompt 0.0019 on average; generated log-probs 0.008 apart at most, all 24
                # tokens equal, but request 0 has a top-2 margin of 0.023 at position 11 (within
                # 2 * 0.03); every earlier margin is >= 0.27, so at least 12 positions compare.
                assert 0 < prompt_diff < 0.01, prompt_diff
                assert_greedy_agree(a, b, tol=0.03, min_compared=12, label=label)
            else:
                # measured: prompt 0.014-0.019 on average, 0.18 at most (a wrong block or position
                # costs ~1). Generated: within 0.07 over the first 8 positions, then the two caches
                # drift apart (1.2 at position 16): only the first 8 are compared, within the
                # prompt's 0.25; the reference's first margin (0.125) is within 2 * 0.25 already.
                assert prompt_diff < 0.05, prompt_diff
                assert_greedy_agree(a, b, tol=0.25, min_compared=1, max_positions=8, label=label)
