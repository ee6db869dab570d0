"""Per-request policies on a real engine: one batch mixes the server's policy, a smaller window
and another policy; each request follows its own (compared with a server running that policy,
through ``greedy_compare``), holds no more blocks than its own bound, and nothing leaks. Bad
per-request fields are refused before the request reaches the engine, naming the value."""

import math

import pytest

from tests.e2e.conftest import policy_config, run_engine
from tests.e2e.greedy_compare import assert_greedy_agree

pytestmark = pytest.mark.e2e

BLOCK = 16
SERVER = {"sink_tokens": 4, "window_tokens": 124}
TOL = 2e-3


def _engine(tiny_model, name, **params):
    return {"model": tiny_model, "dtype": "float32", "enforce_eager": True, "block_size": BLOCK, "seed": 0,
            "max_num_batched_tokens": 64, "enable_prefix_caching": False,
            "additional_config": policy_config(name, **params)}


def test_each_request_follows_its_own_policy_within_the_servers_memory(tiny_model):
    prompt = [5 + (i * 37) % 40000 for i in range(200)]
    own = [None, {"kv_policy_config": {"window_tokens": 60}}, {"kv_policy": "sliding-window"}]
    alike = [("streaming-sink", SERVER), ("streaming-sink", {"sink_tokens": 4, "window_tokens": 60}),
             ("sliding-window", {"window_tokens": 128})]
    sampling = {"temperature": 0.0, "max_tokens": 80, "ignore_eos": True, "logprobs": 2}
    bad = [
        ({"kv_policy_config": {"window_tokens": 500}}, "holds up to"),
        ({"kv_policy": "topk-importance"}, "allowed: streaming-sink, sliding-window"),
        ({"kv_policy_config": {"max_stream_tokens": 9}}, "max_stream_tokens=9 is not allowed"),
        ({"kv_windw": 60}, "unknown per-request field(s) 'kv_windw'"),
    ]
    mixed = run_engine(_engine(tiny_model, "streaming-sink", **SERVER), [
        {"prompts": [prompt] * 3, "sampling": sampling, "extra_args_each": own, "tag": "mixed"},
        *[{"prompts": [prompt], "sampling": sampling, "extra_args_each": [b], "expect_error": True, "tag": f"bad{i}"}
          for i, (b, _) in enumerate(bad)],
        {"prompts": [prompt], "sampling": sampling, "tag": "after"},  # the engine keeps serving
    ])
    job = mixed["jobs"][0]
    assert job["free_end"] == job["free_start"]
    for (extra, message), refused in zip(bad, mixed["jobs"][1:-1]):
        assert refused["error_type"] == "VLLMValidationError" and message in refused["error"], refused
    assert len(mixed["jobs"][-1]["results"][0]["token_ids"]) == 80
    for i, (name, params) in enumerate(alike):
        if i:  # the requests with a policy of their own against a server running it (the server's
            # own policy is checked against stock and the oracle by the other e2e tests)
            ref = run_engine(_engine(tiny_model, name, **params), [{"prompts": [prompt], "sampling": sampling}])
            assert_greedy_agree(ref["jobs"][0]["results"][0], job["results"][i], tol=TOL, min_compared=20,
                                label=f"request {i} ({own[i]})")
        window = params["window_tokens"] + params.get("sink_tokens", 0)
        # Decoding, a request holds its sink block, its window's blocks and one being filled.
        bound = math.ceil(params.get("sink_tokens", 0) / BLOCK) + math.ceil(params["window_tokens"] / BLOCK) + 1
        assert job["peak_held_decode"][i] <= bound, (i, job["peak_held_decode"], window)
    assert job["peak_held_decode"][1] < job["peak_held_decode"][0]  # the smaller window freed more
