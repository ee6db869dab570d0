"""The per-step plan of the quantized backend: every block a query of the step attends to is
read, no other block (evicted ids stay in vLLM's append-only table) is."""

import random

import pytest
import torch

from vllm_kvstream.adapter.quant_attention import plan_quant_step
from vllm_kvstream.policies import build_policy


@pytest.mark.parametrize(
    ("name", "params"),
    [("streaming-sink", {"sink_tokens": 4, "window_tokens": 60}), ("sliding-window", {"window_tokens": 40}), ("full", {})],
)
@pytest.mark.parametrize("seed", range(4))
def test_plan_reads_exactly_the_attended_blocks(name, params, seed):
    rng = random.Random(seed)
    bs = rng.choice([16, 32])
    policy = build_policy(name, params)
    lens = [rng.randrange(1, 400) for _ in range(rng.randrange(1, 5))]
    n_query = [rng.choice([1, min(L, rng.randrange(1, 130))]) for L in lens]
    qsl = torch.tensor([0] + list(torch.tensor(n_query).cumsum(0).tolist()))
    width = max(-(-L // bs) for L in lens)
    ids = list(range(1000, 1000 + len(lens) * width))
    rng.shuffle(ids)
    table = torch.tensor(ids).view(len(lens), width)
    positions, requests, needed, compact = plan_quant_step(qsl, torch.tensor(lens), table, policy.pattern, bs)
    assert positions.tolist() == [p for L, n in zip(lens, n_query) for p in range(L - n, L)]
    wanted = set()
    for i, (L, n) in enumerate(zip(lens, n_query)):
        blocks = {t // bs for p in range(L - n, L) for r in policy.attended_ranges(p) for t in r}
        wanted |= {int(table[i, j]) for j in blocks}
        for j in blocks:  # the compact table points at the right physical block
            assert int(needed[compact[i, j]]) == int(table[i, j])
    assert sorted(needed.tolist()) == sorted(wanted)
    assert [r.block_row for r in requests] == list(range(len(lens)))
