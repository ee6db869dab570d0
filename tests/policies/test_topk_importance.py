"""topk-importance as pure arithmetic: the budget, what is always kept, and the claim of
seed 002 (LinearKVCache) that with a static score the kept set is the TopK of the history."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.policies import BlockSelection, build_policy
from vllm_kvstream.policies.base import cdiv

configs = st.builds(
    lambda bs, sink_blocks, recent_blocks, extra_blocks, sink_fill, recent_fill: (
        bs,
        {
            "sink_tokens": (sink_blocks - 1) * bs + sink_fill,
            "recent_tokens": max(1, recent_blocks * bs - recent_fill),
            "budget_tokens": (sink_blocks + recent_blocks + extra_blocks) * bs,
        },
    ),
    bs=st.sampled_from([1, 2, 4, 16]),
    sink_blocks=st.integers(1, 3),
    recent_blocks=st.integers(1, 4),
    extra_blocks=st.integers(1, 6),
    sink_fill=st.integers(1, 1),
    recent_fill=st.integers(0, 3),
)


def _run(policy, bs, n_tokens, chunk, score_of, observe):
    """Stream ``n_tokens`` in chunks; evict at every block boundary as the adapter does."""
    sel = BlockSelection(policy, bs)
    n = 0
    while n < n_tokens:
        end = min(n_tokens, n + chunk)
        # Within a chunk the selection is brought back to budget at each block boundary.
        for m in sorted({*range((n // bs + 1) * bs, end, bs), end}):
            sel.extend(m)
            sel.set_scores({b: score_of(b) for b in sel.kept if b not in sel.scores})
            sel.evict(m)
            observe(sel, m)
        n = end
    return sel


@settings(max_examples=200, deadline=None)
@given(cfg=configs, n_tokens=st.integers(1, 400), chunk=st.integers(1, 64), seed=st.integers(0, 10**6))
def test_budget_sinks_and_recent_always_hold(cfg, n_tokens, chunk, seed):
    bs, params = cfg
    policy = build_policy("topk-importance", params)
    policy.check_engine_fit(block_size=bs, trained_context=None)
    rng = random.Random(seed)
    scores = {}

    def observe(sel, n):
        held = policy.held_blocks(n, bs)
        # The kept content is exactly what the scheduler's held blocks can hold ...
        assert len(sel.kept) == held
        # ... and never above budget / block size + 1 (decode adds one block for the next token).
        assert held <= params["budget_tokens"] // bs + 1
        assert policy.max_blocks_per_request(bs, 1, 1 << 30) <= params["budget_tokens"] // bs + 1
        kept = set(sel.kept)
        assert set(range(min(policy.sink_blocks(bs), cdiv(n, bs)))) <= kept
        assert set(range(policy.protected_from(n, bs), cdiv(n, bs))) <= kept
        assert sel.kept == sorted(kept)
        # The scheduler frees exactly the blocks the worker's content no longer needs.
        first, last = policy.freeable_block_range(n, bs)
        assert cdiv(n, bs) - (last - first) == len(sel.kept)

    _run(policy, bs, n_tokens, chunk, lambda b: scores.setdefault(b, rng.random()), observe)


@settings(max_examples=200, deadline=None)
@given(cfg=configs, n_tokens=st.integers(1, 400), chunk=st.integers(1, 64), seed=st.integers(0, 10**6))
def test_static_score_keeps_the_topk_of_the_whole_history(cfg, n_tokens, chunk, seed):
    """Seed 002's claim, checked: with a score fixed per block, greedy eviction keeps exactly
    the K highest-scoring blocks among all blocks that ever left the recent window (K = the
    slots left after sinks and recent), at every step, whatever the chunking."""
    bs, params = cfg
    policy = build_policy("topk-importance", {**params, "score": "key-norm"})
    rng = random.Random(seed)
    scores = {}

    def observe(sel, n):
        lo, hi = policy.sink_blocks(bs), policy.protected_from(n, bs)
        middle = [b for b in sel.kept if lo <= b < hi]
        history = [b for b in range(lo, min(hi, cdiv(n, bs)))]
        topk = sorted(history, key=lambda b: (scores[b], b), reverse=True)[: len(middle)]
        assert sorted(middle) == sorted(topk)

    _run(policy, bs, n_tokens, chunk, lambda b: scores.setdefault(b, rng.choice([0.0, 0.5, rng.random()])), observe)


def test_attention_mass_decays_per_query():
    policy = build_policy("topk-importance", {"budget_tokens": 8, "sink_tokens": 1, "recent_tokens": 2, "decay": 0.5})
    sel = BlockSelection(policy, 1)
    sel.extend(3)
    sel.add_mass({0: 1.0, 1: 2.0})
    sel.add_mass({1: 1.0, 2: 4.0}, queries=2)
    assert sel.scores == {0: 0.25, 1: 1.5, 2: 4.0}


def test_evicts_lowest_attention_mass_and_never_the_window():
    policy = build_policy("topk-importance", {"budget_tokens": 6, "sink_tokens": 1, "recent_tokens": 2})
    sel = BlockSelection(policy, 1)
    sel.extend(7)
    sel.add_mass({1: 5.0, 2: 0.1, 3: 3.0, 4: 0.2, 5: 0.0, 6: 0.0})
    # 7 tokens cached: the scheduler holds 5 blocks (the 6th of the budget is the next
    # token's), so two must go; block 6 is the next query's recent window (2 tokens: 6, 7).
    assert sel.evict() == [5, 2]
    assert sel.kept == [0, 1, 3, 4, 6]
    sel.extend(8)
    assert sel.evict() == [6]
    assert sel.kept == [0, 1, 3, 4, 7]


def test_bad_budget_names_values():
    policy = build_policy("topk-importance", {"budget_tokens": 256, "sink_tokens": 4, "recent_tokens": 128})
    with pytest.raises(KVStreamConfigError, match=r"budget_tokens=256 .* recent_tokens=128; allowed: recent_tokens <= 0"):
        policy.check_engine_fit(block_size=128, trained_context=8192)
    policy.check_engine_fit(block_size=32, trained_context=8192)
    with pytest.raises(KVStreamConfigError, match="budget_tokens=256 does not fit .* 128 tokens"):
        policy.check_engine_fit(block_size=32, trained_context=128)
    with pytest.raises(KVStreamConfigError, match=r"score='h2o'.*one of 'attention', 'key-norm'"):
        build_policy("topk-importance", {"score": "h2o"})
