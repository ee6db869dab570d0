"""Tensor parallelism (``tensor_parallel_size=2``) on vLLM's CPU backend, ranks in worker
processes of the multiprocessing executor, the scheduler in the test's engine process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as every e2e test runs, so its block pool is read):
for every policy, both ranks take the same per-step decisions, the outputs equal TP=1's
within float32 error, and the blocks stay bounded.

Decisions are read from the opt-in worker trace (``VLLM_KVSTREAM_TRACE_DIR``,
``vllm_kvstream/adapter/trace.py``): one line per step and rank. Position policies derive
their blocks from sequence lengths, the same on every rank by construction; the trace
checks it. ``topk-importance`` scores blocks by attention over the heads a rank holds: it
needs the tensor-parallel sum of the scores (``adapter/tensor_parallel.py``), without which
the ranks kept different blocks and the prompt log-probs moved by up to 12 nats from TP=1
(key-norm, or ``decay`` 0.9; with ``decay`` 1 on this random model every head happened to
favour the same oldest blocks, which is why those configurations are the ones tested).

Running TP on a CPU machine with one NUMA node: vLLM's automatic OpenMP binding wants a NUMA
node per rank and refuses otherwise ("Not enough allowed NUMA nodes to bind threads of 2
local CPUWorkers. Allowed NUMA nodes are [0]."). Binding by hand (``VLLM_CPU_OMP_THREADS_BIND
="0|1"``) works, but on a shared machine a rank pinned to a core that another process keeps
busy can starve (measured once: the second rank took 16 minutes to start). The test runs its
TP engine with ``nobind`` and ``OMP_NUM_THREADS`` = CPUs / ranks, so the OS places the ranks.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from tests.e2e.conftest import policy_config, run_engine
from tests.e2e.greedy_compare import assert_greedy_agree
from vllm_kvstream.policies import build_policy

pytestmark = pytest.mark.e2e

BLOCK, CHUNK, TP = 16, 64, 2
PROMPT, GENERATED = 300, 100  # well past every configuration's sink + window (64 or 80 tokens)
#: Per log-probability, TP=2 against TP=1 in float32: the ranks' matmuls and vLLM's all-reduce
#: sum in other orders (measured: 3.4e-5 at most, prompt and generated, every policy). A wrong
#: kept block costs whole units (12 nats measured, topk-importance scored per rank).
TOL = 5e-4
#: INT4 pages: keys equal up to float32 rounding can still round to codes one step apart, or
#: to another float16 channel range, now and then (the quantization is head-local, the ranks'
#: decisions are the same: checked by the trace). Such flips show as isolated spikes, not a
#: drift: measured on both INT4 cases and two streams each, prompt mean |diff| <= 2.7e-4 and
#: max <= 0.052, generated mean <= 1e-3 and max 0.078 (one position; most are 0 to 4 decimals).
INT4_MEAN, INT4_MAX = 5e-3, 0.25

SINK, WINDOW = 4, 60
TOPK = {"budget_tokens": SINK + WINDOW + BLOCK, "sink_tokens": SINK, "recent_tokens": 32}

CASES = {
    "streaming-sink": policy_config("streaming-sink", sink_tokens=SINK, window_tokens=WINDOW),
    "sliding-window": policy_config("sliding-window", window_tokens=SINK + WINDOW),
    "topk-attention-decay": policy_config("topk-importance", **TOPK, decay=0.9),
    "topk-key-norm": policy_config("topk-importance", **TOPK, score="key-norm"),
    "streaming-sink-int4": {**policy_config("streaming-sink", sink_tokens=SINK, window_tokens=WINDOW), "kv_quant": "int4"},
    "topk-key-norm-int4": {**policy_config("topk-importance", **TOPK, score="key-norm"), "kv_quant": "int4"},
}


def _tp_env(tp: int) -> dict[str, str]:
    """The TP engine's OpenMP settings (module docstring): no pinning, CPUs shared by the ranks."""
    return {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // tp))}


def _engine(model, config: dict, tp: int) -> dict:
    engine = {
        "model": model, "enforce_eager": True, "dtype": "float32", "block_size": BLOCK,
        "max_num_batched_tokens": CHUNK, "max_num_seqs": 16, "seed": 0, "additional_config": config,
    }
    if tp > 1:
        engine |= {"tensor_parallel_size": tp, "distributed_executor_backend": "mp"}
    return engine


def _trace(directory) -> dict[str, list[dict]]:
    return {
        name: [json.loads(line) for line in (directory / name).read_text().splitlines()]
        for name in sorted(os.listdir(directory))
    }


def run_tp_pair(model, config: dict, tmp_path) -> dict:
    """The same stream through TP=1 and TP=2 engines, each with the worker trace on."""
    rng = random.Random(11)
    job = {"prompts": [[rng.randrange(100, 40000) for _ in range(PROMPT)]],
           "sampling": {"max_tokens": GENERATED, "temperature": 0.0, "ignore_eos": True,
                        "prompt_logprobs": 0, "logprobs": 2}}
    out = {}
    for tp in (1, TP):
        trace_dir = tmp_path / f"trace-tp{tp}"
        env = {"VLLM_KVSTREAM_TRACE_DIR": str(trace_dir)}
        if tp > 1:
            env |= _tp_env(tp)
        run = run_engine(_engine(model, config, tp), [job], env=env)["jobs"][0]
        out[tp] = {"run": run, "result": run["results"][0], "trace": _trace(trace_dir)}
    return out


def check_tp_pair(pair: dict, config: dict) -> dict:
    one, two = pair[1], pair[TP]
    quantized = "kv_quant" in config
    # Every rank took the same decision at every step, and TP=1's.
    assert sorted(two["trace"]) == [f"rank{r}.jsonl" for r in range(TP)], sorted(two["trace"])
    assert list(one["trace"]) == ["rank0.jsonl"]
    every = one["trace"]["rank0.jsonl"]
    # The decisions, one line per step; "decode" lines (which read path each step's decode took)
    # ride beside them.
    lines = [x for x in every if x["kind"] != "decode"]
    assert len(lines) == one["run"]["steps"]  # one line per step
    for r in range(TP):
        assert two["trace"][f"rank{r}.jsonl"] == every, f"rank {r}'s decisions differ from TP=1's"
    # ... and the stream ran well past eviction: the trace shows blocks dropped.
    last = lines[-1]["requests"][0]
    kept = last["blocks"] if lines[-1]["kind"] == "position" else next(iter(last["kept"].values()))
    assert last["seq_len"] == PROMPT + GENERATED - 1 and len(kept) < last["seq_len"] // BLOCK // 2

    a, b = one["result"], two["result"]
    assert len(b["token_ids"]) == GENERATED
    prompt = [abs(x - y) for x, y in zip(a["prompt_logprobs"][1:], b["prompt_logprobs"][1:])]
    if not quantized:
        assert max(prompt) < TOL, f"prompt log-probs {max(prompt):.3g} apart (tol {TOL})"
        # Never exact token equality: a near tie may break either way. Every measured top-2
        # margin of these streams is >= 0.0013 (sliding-window, position 9) > 2 * TOL, so every
        # position compares.
        report = assert_greedy_agree(a, b, tol=TOL, min_compared=GENERATED, label="TP=2 vs TP=1")
        generated = report["max_diff"]
    else:
        assert sum(prompt) / len(prompt) < INT4_MEAN and max(prompt) < INT4_MAX, (
            f"prompt log-probs {sum(prompt) / len(prompt):.3g} apart on average, {max(prompt):.3g} at most")
        # The same walk at the spikes' tolerance (a near tie below 2 * INT4_MAX may end it early:
        # the trace above already compared every decision), and on average as close as the prompt.
        report = assert_greedy_agree(a, b, tol=INT4_MAX, min_compared=1, label="TP=2 vs TP=1 (int4)")
        n = report["compared"]
        gen = [abs(x - y) for x, y in zip(a["logprobs"][:n], b["logprobs"][:n])]
        assert sum(gen) / n < INT4_MEAN, f"generated log-probs {sum(gen) / n:.3g} apart on average over {n}"
        generated = max(gen)

    # Blocks: the one scheduler holds the policy's bound for TP=2 as for TP=1 (decoding: one
    # token a step; during a prefill chunk, the chunk's blocks on top), and every block goes
    # back to the pool.
    policy = build_policy(config["kv_policy"], config["kv_policy_config"])
    for run in (one["run"], two["run"]):
        assert 0 < run["peak_held_decode"][0] <= policy.max_blocks_per_request(BLOCK, 1, 1 << 40)
        assert run["peak_held"][0] <= policy.max_blocks_per_request(BLOCK, CHUNK, 1 << 40)
        assert run["free_end"] == run["free_start"]
    assert two["run"]["peak_held"] == one["run"]["peak_held"]
    assert two["run"]["peak_held_decode"] == one["run"]["peak_held_decode"]
    return {"prompt": max(prompt), "generated": generated, "held": two["run"]["peak_held_decode"][0]}


def test_streaming_sink_tp2_matches_tp1(tiny_model, tmp_path):
    config = CASES["streaming-sink"]
    check_tp_pair(run_tp_pair(tiny_model, config, tmp_path), config)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c != "streaming-sink"])
def test_policy_tp2_matches_tp1(tiny_model, tmp_path, case):
    config = CASES[case]
    check_tp_pair(run_tp_pair(tiny_model, config, tmp_path), config)
