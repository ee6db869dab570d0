"""The worker-side selection store against a cache where nothing is ever freed: with the
scheduler freeing blocks by the policy's rule and handing them straight to another request
(which overwrites them with large random data), the store's block copies must keep every output identical to
reading the never-freed blocks directly."""

import math
import random

import pytest
import torch

from vllm_kvstream.adapter import selection as selection_mod
from vllm_kvstream.adapter.selection import SelectionStore, SelectRequest
from vllm_kvstream.kernels import Rope, selected_attention_ref, split_cpu_kv_cache, write_kv_ref
from vllm_kvstream.policies import build_policy
from vllm_kvstream.policies.base import cdiv

BS, HQ, HKV, D = 8, 4, 2, 16


class Scheduler:
    """Block bookkeeping as vLLM's manager does it for this policy: free what the policy
    frees before allocating, LIFO reuse, append-only worker rows."""

    def __init__(self, policy, num_blocks, reuse: bool):
        self.policy, self.reuse = policy, reuse
        self.free = list(range(num_blocks - 1, 0, -1))
        self.rows: dict[str, list[int]] = {}
        self.freed_upto: dict[str, int] = {}

    def step(self, rid, computed, new_tokens, poison):
        row = self.rows.setdefault(rid, [])
        first, last = self.policy.freeable_block_range(computed, BS)
        for b in range(max(first, self.freed_upto.get(rid, first)), last):
            if self.reuse:
                self.free.append(row[b])
                poison(row[b])  # another request takes it at once and writes its own data
        self.freed_upto[rid] = max(last, self.freed_upto.get(rid, first))
        while len(row) < cdiv(computed + new_tokens, BS):
            row.append(self.free.pop())
        return row


def _stock_attention(query, kc, vc, reqs, out, rope):
    """What vLLM's stock kernel computes: causal attention over each request's row, in place."""
    for r in reqs:
        n_blocks = cdiv(r.seq_len, BS)
        selected_attention_ref(
            query[r.q_start : r.q_end], kc, vc, torch.tensor(r.row[:n_blocks]), torch.arange(n_blocks),
            num_tokens=r.seq_len, first_pos=r.first_pos, scale=1 / math.sqrt(D), rope=rope, out=out[r.q_start : r.q_end],
        )


def _stream(reuse: bool, score: str, seed: int = 0, batch_decode: bool = True, decay: float = 1.0,
            budget: int = 48, kv_heads: slice = slice(None), rank_sum=None, trajectory: list | None = None):
    """``kv_heads``: the KV heads this store holds (and their query heads), as one
    tensor-parallel rank holds them; ``rank_sum`` its ``tensor_parallel.RankSum``.
    ``trajectory``: appended each step's kept blocks per request."""
    policy = build_policy("topk-importance", {"budget_tokens": budget, "sink_tokens": 3, "recent_tokens": 12, "score": score, "decay": decay})
    kv_idx = torch.arange(HKV)[kv_heads]
    q_idx = (kv_idx[:, None] * (HQ // HKV) + torch.arange(HQ // HKV)).flatten()
    kv = torch.zeros(200, len(kv_idx), BS, 2 * D)
    kc, vc = split_cpu_kv_cache(kv)
    rope = Rope.from_base(D, 10000.0, 4096)
    sched = Scheduler(policy, 200, reuse)
    store = SelectionStore(policy, BS, batch_decode=batch_decode, rank_sum=rank_sum)
    if not reuse:
        store._relocate = lambda *a, **k: None  # nothing is freed: read every block where it was written
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = {"A": 300, "B": 170}
    computed = {r: 0 for r in lengths}
    outs = []

    junk = torch.Generator().manual_seed(seed + 1)

    def poison(block):  # another request's data: finite, far off any real key or value
        kv[block] = 1e3 * torch.randn(kv[block].shape, generator=junk)

    while any(computed[r] < lengths[r] for r in lengths):
        reqs, qs, ks, vs, slots = [], [], [], [], []
        start = 0
        for rid in lengths:
            if computed[rid] >= lengths[rid]:
                continue
            n = min(lengths[rid] - computed[rid], rng.choice([1, 1, 1, 1, 1, 3, 8, 21]))
            row = sched.step(rid, computed[rid], n, poison)
            pos = torch.arange(computed[rid], computed[rid] + n)
            k = rope.rotate(torch.randn(n, HKV, D, generator=gen), pos)[:, kv_idx]
            q = rope.rotate(torch.randn(n, HQ, D, generator=gen), pos)[:, q_idx]
            v = torch.randn(n, HKV, D, generator=gen)[:, kv_idx]
            slots.append(torch.tensor(row)[pos // BS] * BS + pos % BS)
            qs.append(q), ks.append(k), vs.append(v)
            seq = computed[rid] + n
            reqs.append(SelectRequest(start, start + n, seq, tuple(row[: cdiv(seq, BS)])))
            start += n
            computed[rid] = seq
        write_kv_ref(torch.cat(ks), torch.cat(vs), kc, vc, torch.cat(slots))
        query = torch.cat(qs)
        out = torch.empty_like(query)
        step = store.begin_step(reqs)
        if trajectory is not None:
            trajectory.append([list(state.layers["layer0"].selection.kept) for _, state in step if state.layers])
        if store.reads_in_place(step):  # the backend runs the stock kernel, the store records
            _stock_attention(query, kc, vc, reqs, out, rope)
            store.record("layer0", query, kv, step, scale=1 / math.sqrt(D), rope=rope)
        else:
            store.run("layer0", query, kv, step, scale=1 / math.sqrt(D), rope=rope, out=out)
        outs.append(out)
    return torch.cat(outs), store, sched


def test_block_copies_keep_outputs_identical_when_freed_blocks_are_reused():
    for score in ("attention", "key-norm"):
        reference, _, _ = _stream(reuse=False, score=score)
        got, store, sched = _stream(reuse=True, score=score)
        assert not torch.isnan(got).any()
        assert store.block_copies > 0  # the stream did need copies
        torch.testing.assert_close(got, reference, atol=1e-6, rtol=1e-6)
        # The scheduler side stayed within budget / block + 1 per request after each decode.
        for rid, row in sched.rows.items():
            assert len(row) - (sched.freed_upto[rid] - 1) <= 48 // BS + 1 + 21 // BS + 1


@pytest.mark.parametrize(("score", "decay"), [("attention", 1.0), ("attention", 0.9), ("key-norm", 1.0)])
def test_batched_steady_decode_equals_general_path(score, decay):
    """Steady decode steps of all requests run as one batch; outputs, kept blocks and scores
    equal the general per-request path's."""
    reference, ref_store, _ = _stream(reuse=True, score=score, decay=decay, batch_decode=False)
    got, store, _ = _stream(reuse=True, score=score, decay=decay, batch_decode=True)
    torch.testing.assert_close(got, reference, atol=2e-6, rtol=2e-6)
    assert store.steady_steps > 0  # the batch path did run
    assert ref_store.steady_steps == 0
    for key, state in store.requests.items():
        ref = ref_store.requests[key].layers["layer0"].selection
        sel = state.layers["layer0"].selection
        assert sel.kept == ref.kept and sel.num_tokens == ref.num_tokens
        assert sel.scores.keys() == ref.scores.keys()
        for b in sel.scores:
            assert math.isclose(sel.scores[b], ref.scores[b], rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("mass_batch", [16, 2])
@pytest.mark.parametrize(("score", "decay"), [("attention", 1.0), ("attention", 0.9), ("key-norm", 1.0)])
def test_in_place_steps_with_deferred_scores_equal_general_path(score, decay, mass_batch, monkeypatch):
    """Inside the budget steady decode steps run the stock kernel and only record their
    queries; scored later in chunks (at the next general step, or every MASS_BATCH), the
    scores, hence the kept blocks and every later output, equal scoring each query at once."""
    monkeypatch.setattr(selection_mod, "MASS_BATCH", mass_batch)
    reference, ref_store, _ = _stream(reuse=True, score=score, decay=decay, batch_decode=False, budget=96)
    got, store, _ = _stream(reuse=True, score=score, decay=decay, batch_decode=True, budget=96)
    assert store.recorded_steps > 0 and ref_store.recorded_steps == 0
    torch.testing.assert_close(got, reference, atol=2e-6, rtol=2e-6)
    for key, state in store.requests.items():
        ref = ref_store.requests[key].layers["layer0"].selection
        layer = state.layers["layer0"]
        assert not layer.pending  # both streams went past their budget: every query scored
        sel = layer.selection
        assert sel.kept == ref.kept and sel.num_tokens == ref.num_tokens
        assert sel.scores.keys() == ref.scores.keys()
        for b in sel.scores:
            assert math.isclose(sel.scores[b], ref.scores[b], rel_tol=1e-5, abs_tol=1e-6)


def test_a_step_mixing_in_place_and_evicting_requests_runs_the_general_path():
    policy = build_policy("topk-importance", {"budget_tokens": 48, "sink_tokens": 3, "recent_tokens": 12})
    store = SelectionStore(policy, BS)
    kv = torch.randn(40, HKV, BS, 2 * D)
    query = torch.randn(2, HQ, D)
    rope = Rope.from_base(D, 10000.0, 4096)
    # A: a fresh request prefilled to 10 tokens; B: one prefilled to 100 (past its budget).
    rows = {"A": tuple(range(1, 3)), "B": tuple(range(3, 3 + 13))}
    for name, n in (("A", 10), ("B", 100)):
        step = store.begin_step([SelectRequest(0, n, n, rows[name][: cdiv(n, BS)])])
        store.run("layer0", torch.randn(n, HQ, D), kv, step, scale=0.25, rope=rope, out=torch.empty(n, HQ, D))
    a = SelectRequest(0, 1, 11, rows["A"])
    b = SelectRequest(1, 2, 101, rows["B"])
    assert store.reads_in_place(store.begin_step([a]))
    assert not store.reads_in_place(store.begin_step([b]))  # steady, but blocks were evicted
    assert not store.reads_in_place(store.begin_step([a, b]))
