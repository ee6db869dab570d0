"""Shared prefix blocks under an evicting policy: with prefix caching on, many requests share a
long cached prefix while some of them evict past their window and others arrive later and hit
the blocks still referenced. Every block is poisoned the moment no request references it
(``engine_runner._poison_freed_blocks``: dropped from the prefix cache and filled with keys of
1e4 that take the whole softmax), so a request that reads a block another request gave up, or
a block freed while it still references it, moves its log-probabilities by whole units. Each
output must equal that request run alone on a fresh engine (same float32 kernels; compared
through ``greedy_compare``), and the pool must hold nothing at the end."""

import math
import random

import pytest

from tests.e2e.conftest import policy_config, run_engine
from tests.e2e.greedy_compare import assert_greedy_agree

pytestmark = pytest.mark.e2e

SINK, WINDOW, BLOCK = 4, 124, 16
PREFIX = 96  # 6 full blocks, shared and cached
TOL = 2e-3  # float32, one batch shape against another


def _requests():
    rng = random.Random(7)
    prefix = [rng.randrange(3, 49152) for _ in range(PREFIX)]
    prompts = [prefix + [rng.randrange(3, 49152) for _ in range(8 + 4 * i)] for i in range(6)]
    # Long outputs run past sink + window (evicting, some of the prefix's blocks among them);
    # short ones stay inside it. Some arrive while the first are decoding, to hit the cache.
    max_tokens = [100, 12, 100, 12, 100, 12]
    arrive = [0, 0, 10, 20, 40, 60]
    return prompts, max_tokens, arrive


def _engine(tiny_model, prefix_caching: bool) -> dict:
    return {
        "model": tiny_model, "dtype": "float32", "enforce_eager": True, "block_size": BLOCK, "seed": 0,
        "max_num_batched_tokens": 64, "enable_prefix_caching": prefix_caching,
        "additional_config": policy_config("streaming-sink", sink_tokens=SINK, window_tokens=WINDOW),
    }


def test_shared_prefix_blocks_are_never_freed_while_referenced(tiny_model):
    prompts, max_tokens, arrive = _requests()
    sampling = {"temperature": 0.0, "max_tokens": 100, "ignore_eos": True, "logprobs": 2}
    shared = run_engine(
        {**_engine(tiny_model, True), "poison_freed": True},
        [{"prompts": prompts, "sampling": sampling, "arrive_at_steps": arrive, "max_tokens_each": max_tokens, "tag": "shared"}],
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    alone = run_engine(
        _engine(tiny_model, False),
        [{"prompts": [p], "sampling": {**sampling, "max_tokens": m}, "tag": f"alone{i}"}
         for i, (p, m) in enumerate(zip(prompts, max_tokens))],
    )
    job = shared["jobs"][0]
    assert shared["poisoned_blocks"] > 0, "nothing was poisoned: the test would not see a stale read"
    assert job["free_end"] == job["free_start"], "blocks leaked"
    # The policy evicted inside the shared run (held fewer blocks than a whole stream needs).
    longest = PREFIX + 8 + 4 * 5 + 100
    assert max(job["peak_held_decode"]) < math.ceil(longest / BLOCK)
    # The later arrivals hit the shared prefix blocks that running requests still reference.
    assert all(job["results"][i]["cached_tokens"] >= PREFIX - BLOCK for i in range(3, len(prompts))), \
        [r["cached_tokens"] for r in job["results"]]
    for i, (got, ref) in enumerate(zip(job["results"], (j["results"][0] for j in alone["jobs"]))):
        assert got is not None and len(got["token_ids"]) == max_tokens[i]
        assert all(math.isfinite(pos[0][1]) for pos in got["top_logprobs"]), f"request {i}: non-finite log-probs"
        assert_greedy_agree(ref, got, tol=TOL, min_compared=min(max_tokens[i], 10))
