"""Request shapes and timing of the load test (vllm_kvstream/loadgen.py)."""

import json
import math
import random

import pytest

from vllm_kvstream.loadgen import (
    LoadSpec,
    LoadSpecError,
    PromptSource,
    StreamTimer,
    check_loopback,
    percentile,
    read_records,
    sse_payloads,
    summarize,
)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_timer_follows_vllm_bench_definitions():
    clock = Clock()
    timer = StreamTimer("short", "completions", clock=clock)
    clock.t = 0.1
    timer.payload({"choices": [{"text": ""}]})  # no text: not a token
    clock.t = 0.5
    timer.payload({"choices": [{"text": "a"}]})
    clock.t = 0.6
    timer.payload({"choices": [{"text": "b"}]})
    clock.t = 0.8
    timer.payload({"choices": [{"delta": {"content": "c"}}]})
    clock.t = 0.9
    timer.payload({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    r = timer.finish()
    assert r.ok and r.ttft == pytest.approx(0.5) and r.e2e == pytest.approx(0.8)
    assert r.itl == pytest.approx([0.1, 0.2])
    assert r.tpot == pytest.approx((0.8 - 0.5) / 2)  # the first token excluded
    assert (r.prompt_tokens, r.output_tokens, r.output_chunks) == (7, 3, 3)


def test_timer_marks_empty_stream_and_errors_failed():
    r = StreamTimer("short", "chat").finish()
    assert not r.ok and "without output" in r.error
    r = StreamTimer("short", "chat").finish("HTTP 400: too long")
    assert not r.ok and r.error == "HTTP 400: too long"


def test_sse_payloads_stop_at_done():
    lines = [b"data: {\"a\": 1}", b"", b": keep-alive", "data: {\"b\": 2}", b"data: [DONE]", b"data: {\"c\": 3}"]
    assert list(sse_payloads(lines)) == [{"a": 1}, {"b": 2}]
    with pytest.raises(ValueError):
        list(sse_payloads([b"data: {oops"]))


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "", "http://0.0.0.0:8000"])
def test_only_loopback_hosts(url):
    with pytest.raises(LoadSpecError, match="not a loopback address; allowed hosts: 127.0.0.1, localhost, ::1"):
        check_loopback(url)


def test_loopback_hosts_pass():
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80"):
        assert check_loopback(url) == url


def test_spec_validation_names_bad_values():
    with pytest.raises(LoadSpecError, match="scenario 'nope' is unknown; allowed: long-stream, chat, short, mixed"):
        LoadSpec(scenario="nope")
    with pytest.raises(LoadSpecError, match="long_prompt_tokens=0 must be an integer >= 1"):
        LoadSpec(long_prompt_tokens=0)
    with pytest.raises(LoadSpecError, match="api 'grpc'"):
        LoadSpec(api="grpc")


def test_mixed_scenario_draws_every_kind():
    rng = random.Random(0)
    kinds = [LoadSpec(scenario="mixed").pick_kind(rng) for _ in range(400)]
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert set(counts) == {"long-stream", "chat", "short"}
    assert counts["short"] > counts["chat"] > counts["long-stream"]
    assert LoadSpec(scenario="chat").pick_kind(rng) == "chat"


def test_prompts_have_exact_token_counts_and_wrap():
    src = PromptSource("x" * 100, list(range(10)), 40)
    rng = random.Random(1)
    p = src.token_prompt(25, rng)
    assert len(p) == 25 and all(b == (a + 1) % 10 for a, b in zip(p, p[1:]))
    assert src.chars_per_token == 4.0
    assert len(src.text_prompt(5, rng)) == 20
    with pytest.raises(LoadSpecError):
        PromptSource("x", [], 1)


def test_percentile_matches_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert math.isnan(percentile([], 50))


def test_summary_and_records_round_trip(tmp_path):
    recs = []
    for i in range(4):
        clock = Clock()
        t = StreamTimer("long-stream", "completions", clock=clock)
        for k in range(3):
            clock.t = 1.0 + i + 0.1 * k
            t.payload({"choices": [{"text": "x"}]})
        recs.append(t.finish())
    recs.append(StreamTimer("long-stream", "completions").finish("HTTP 500"))
    path = tmp_path / "r.jsonl"
    path.write_text("".join(r.to_json() + "\n" for r in recs))
    back = read_records(path)
    assert [r.ok for r in back] == [True] * 4 + [False]
    s = summarize(back, duration_s=2.0)
    assert (s["requests"], s["completed"], s["failed"]) == (5, 4, 1)
    assert s["request_throughput"] == 2.0 and s["output_tokens"] == 12 and s["output_throughput"] == 6.0
    assert s["ttft_p50_ms"] == pytest.approx(2500.0) and s["itl_p50_ms"] == pytest.approx(100.0)
    assert s["tpot_p99_ms"] == pytest.approx(100.0)
    json.dumps(s)
