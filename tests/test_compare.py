"""The comparison's planning, analytical-model fit and report (vllm_kvstream/compare.py);
the runs themselves are covered by tests/loadtest/test_loadtest.py."""

import json
import math

import pytest

from vllm_kvstream.compare import (
    Stage,
    cache_tokens_of,
    fit_context_model,
    fit_window_model,
    parse_metrics,
    plan_serve_runs,
    rebuild_report,
    stream_bound,
    write_report,
)
from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.eval.ppl import Cache


def test_plan_turns_specs_into_serve_flags():
    runs = plan_serve_runs(["stock", "full", "streaming-sink", "streaming-sink:kv_quant=int4"], Cache(4, 508))
    assert [r.label for r in runs] == ["stock", "full", "streaming-sink 4+508", "streaming-sink:kv_quant=int4 4+508"]
    assert runs[0].flags == ()
    assert runs[1].flags[:2] == ("--kv-policy", "full")
    sink = runs[2].flags
    assert sink[:2] == ("--kv-policy", "streaming-sink")
    assert json.loads(sink[3]) == {"sink_tokens": 4, "window_tokens": 508}
    quant = runs[3].flags
    assert quant[4:6] == ("--kv-quant", "int4") and isinstance(json.loads(quant[7]), dict)


def test_stream_bound_is_what_admission_checks_after_alignment():
    """One stream's most blocks, per policy, at block 64 and chunk 128: the block-aligned
    sink + window (the default) holds ceil((S+W)/bs)+1 decoding, the token-exact one a block
    more; stock the whole stream."""
    runs = {r.label: r for r in plan_serve_runs(
        ["stock", "streaming-sink", "streaming-sink:align=token", "sliding-window", "topk-importance"], Cache(4, 252))}
    got = {label: stream_bound(run, 64, 128, 1152) for label, run in runs.items()}
    assert got["stock"] == {"decode": 18, "prefill": 18}
    assert got["streaming-sink 4+252"] == {"decode": 5, "prefill": 7}
    assert got["streaming-sink:align=token 4+252"]["decode"] == 6
    assert got["sliding-window 4+252"]["decode"] == 5
    assert got["topk-importance 4+252"]["decode"] == 5


def test_plan_rejects_unknown_policy_before_anything_starts():
    with pytest.raises(KVStreamConfigError, match="nope"):
        plan_serve_runs(["stock", "nope"], Cache(4, 508))


def test_fit_recovers_the_window_model():
    w, l_w, t_comm = 256, 0.8, 0.05
    samples = [(t, math.ceil(t / w) * l_w + (math.ceil(t / w) - 1) * t_comm) for t in (512, 1000, 2048, 4096)]
    fit = fit_window_model(w, samples)
    assert fit.l_w == pytest.approx(l_w) and fit.t_comm == pytest.approx(t_comm)
    assert fit.mean_abs_error == pytest.approx(0.0, abs=1e-9)
    assert fit.points[0]["predicted_throughput"] == pytest.approx(512 / (2 * l_w + t_comm))


def test_fit_reports_the_error_of_a_curve_it_cannot_follow():
    # Full attention: later windows attend to more, so the latency grows faster than N.
    samples = [(t, 0.001 * t + 1e-6 * t * t) for t in (512, 1024, 2048, 4096)]
    fit = fit_window_model(256, samples)
    assert fit.l_w > 0 and fit.t_comm >= 0
    assert fit.mean_abs_error > 0.01
    assert fit_window_model(256, []) is None
    one = fit_window_model(256, [(512, 2.0)])
    assert one.l_w == pytest.approx(1.0) and one.t_comm == 0.0


def test_context_model_follows_full_attention_and_a_bounded_cache():
    samples = [(t, 0.001 * t + 1e-6 * t * t) for t in (512, 1024, 2048, 4096)]
    full = fit_context_model(256, None, samples)
    assert full.mean_abs_error == pytest.approx(0.0, abs=1e-6)
    assert full.c_att == pytest.approx(2e-6) and full.c_ff == pytest.approx(0.001 - 2e-6 * 128)
    # A bounded cache: past the cache every window costs the same, so the time is linear in T.
    bounded = fit_context_model(256, 512, [(t, 0.5 * math.ceil(t / 256)) for t in (1024, 2048, 4096)])
    assert bounded.mean_abs_error < 0.01
    assert cache_tokens_of("stock", "4+508") is None and cache_tokens_of("full", "4+508") is None
    assert cache_tokens_of("streaming-sink:kv_quant=int4 4+508", "4+508") == 512


def test_parse_metrics_sums_label_sets():
    text = (
        "# TYPE vllm:num_preemptions counter\n"
        'vllm:num_preemptions_total{engine="0",model_name="m"} 3.0\n'
        'vllm:num_preemptions_total{engine="1",model_name="m"} 2.0\n'
        "# TYPE kvstream_blocks_held gauge\n"
        'kvstream_blocks_held{policy="streaming-sink",kv_quant="none"} 9.0\n'
    )
    m = parse_metrics(text)
    assert m["vllm:num_preemptions_total"] == 5.0 and m["kvstream_blocks_held"] == 9.0


def _stage(policy, stage, c, t, ttft_ms, ok=True, preempt=0.0, running=None):
    summary = {"requests": c, "completed": c if ok else c - 1, "failed": 0 if ok else 1, "request_throughput": 0.5,
               "output_throughput": 10.0, "not_ended": 0}
    for k in ("ttft", "itl", "tpot", "e2e"):
        for q in ("p50", "p90", "p99", "mean"):
            summary[f"{k}_{q}_ms"] = ttft_ms if k == "ttft" else 50.0
    deltas = {"vllm:num_preemptions_total": preempt, "kvstream_request_blocks_kept_sum": 9.0 * c,
              "kvstream_request_blocks_kept_count": float(c), "kvstream_blocks_evicted_total": 10.0}
    peaks = {"vllm:kv_cache_usage_perc": 0.5, "vllm:num_requests_running": float(running or c),
             "vllm:num_requests_waiting": 0.0, "kvstream_blocks_held": 9.0}
    s = Stage(policy, stage, c, t, 64, summary, deltas, peaks)
    s.sustained = ok and preempt == 0 and (running or c) >= c
    return s


def test_report_shows_sustained_streams_and_model_error(tmp_path):
    stages = [
        _stage("stock", "length", 1, 512, 1000.0), _stage("stock", "length", 1, 1024, 2100.0),
        _stage("stock", "concurrency", 1, 2048, 4000.0), _stage("stock", "concurrency", 2, 2048, 4000.0),
        _stage("stock", "concurrency", 4, 2048, 9000.0, preempt=3.0),
        _stage("streaming-sink 4+508", "length", 1, 512, 1000.0), _stage("streaming-sink 4+508", "length", 1, 1024, 2000.0),
        _stage("streaming-sink 4+508", "concurrency", 1, 2048, 4000.0),
        _stage("streaming-sink 4+508", "concurrency", 2, 2048, 4000.0),
        _stage("streaming-sink 4+508", "concurrency", 4, 2048, 4500.0),
    ]
    meta = {"model_name": "m", "machine": "test", "kv_memory_mib": 256, "dtype": "float32", "block_size": 128,
            "chunk": 256, "cache": "4+508", "long_prompt_tokens": 2048, "output_tokens": 64, "command": "x",
            "pools": {"stock": {"pool_blocks": 40, "decode": 17, "prefill": 17},
                      "streaming-sink 4+508": {"pool_blocks": 40, "decode": 5, "prefill": 7}}}
    report = write_report(tmp_path, stages, meta).read_text()
    assert "| stock | **2** | 1, 2, 4 | 4 | 50.0% | 40 | 17 / 17 | 2 | 1.00 |" in report
    assert "| streaming-sink 4+508 | **4** | 1, 2, 4 | 4 | 50.0% | 40 | 5 / 7 | 8 | 0.50 |" in report
    assert "| stock | 4 | 4 / 0 | no |" in report
    assert "mean abs error" in report
    for png in ("sustained.png", "latency_vs_concurrency.png", "model_fit.png"):
        assert (tmp_path / png).stat().st_size > 1000
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["stages"]) == len(stages) and data["fits"]["stock"]["window"] == 256
    assert data["context_fits"]["streaming-sink 4+508"]["cache_tokens"] == 512
    (tmp_path / "report.md").unlink()
    assert rebuild_report(tmp_path).read_text() == report
